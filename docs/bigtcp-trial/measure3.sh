#!/usr/bin/env bash
set -uo pipefail
H="/work/main/.venv/bin/harness --state-dir /tmp/bigtcp-state"
R=/tmp/bigtcp/res/ctl; mkdir -p $R
export IVLOOP_IMAGE_DIR=/tmp/bigtcp/out-ctl
trap '$H down >"$R/down.log" 2>&1' EXIT
cd /work/main
echo "lock acquired $(date -u +%T)"
$H up --topology /tmp/bigtcp/two.toml >"$R/up.log" 2>&1 || { echo "up failed"; exit 1; }
g() { local vm=$1; shift; timeout 60 $H ssh "$vm" -- "$@" </dev/null; }
for vm in vm1 vm2; do timeout 60 $H ssh $vm -- 'cat > /tmp/ip615; chmod +x /tmp/ip615' < /tmp/bigtcp/ip615/bin/ip; done
for i in $(seq 1 20); do n=$(g vm1 'ethtool -S ivl0 | awk "/ peer_up:/ {print \$2}"'); [ "${n:-0}" -ge 1 ] && break; sleep 2; done
g vm1 'ethtool --set-priv-flags ivl0 force-lower on; ping -c 2 -W 2 10.77.0.2 | tail -1' || exit 1
stat() { g vm1 'ethtool -S ivl0' | awk '{gsub(":","",$1); printf "%s=%s ", $1, $2} END {print ""}'; }
for r in 1 2; do for c in "65536 0" "185000 0" "185000 1"; do
	set -- $c
	for vm in vm1 vm2; do g $vm "/tmp/ip615 link set ivl0 gso_ipv4_max_size $1 gro_ipv4_max_size $1"; done
	g vm1 "echo $2 > /sys/module/ivloop/parameters/no_cut"
	b=$(stat); g vm1 "iperf3 -c 10.77.0.2 -t 10 -J" > $R/iperf-$1-$2-$r.json; a=$(stat)
	python3 - $R/iperf-$1-$2-$r.json "$1" "$2" "$r" "$b" "$a" <<'PY' | tee -a $R/summary.txt
import json, sys
f, s, nc, r, b, a = sys.argv[1:]
d = json.load(open(f))
def kv(t): return {k: int(v) for k, v in (x.split("=") for x in t.split()) if v.isdigit()}
B, A = kv(b), kv(a); dd = {k: A[k] - B.get(k, 0) for k in A}
lp = dd.get("lower_tx_packets", 0)
print(f"force-lower size={s} no_cut={nc} rep={r} gbps={d['end']['sum_received']['bits_per_second']/1e9:.3f} lower_tx_pkts={lp} lower bytes/pkt={dd.get('lower_tx_bytes',0)/max(lp,1):.0f} lower_cut={dd.get('lower_tx_cut')} shm_tx={dd.get('shm_tx_packets')} retr={d['end']['sum_sent'].get('retransmits')}")
PY
done; done
g vm1 'dmesg | grep -iE "warn|bug|call trace" | head -5'
echo "lock released $(date -u +%T)"
