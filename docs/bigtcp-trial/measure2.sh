#!/usr/bin/env bash
# usage: measure.sh IMAGE_DIR TAG "SIZES" REPS [unplug]
set -uo pipefail
img=$1 tag=$2 sizes=$3 reps=$4 unplug=${5:-}
H="/work/main/.venv/bin/harness --state-dir /tmp/bigtcp-state"
R=/tmp/bigtcp/res/$tag
mkdir -p "$R"
export IVLOOP_IMAGE_DIR=$img
trap '$H down >"$R/down.log" 2>&1' EXIT
cd /work/main
t0=$(date +%s)
$H up --topology /tmp/bigtcp/two.toml >"$R/up.log" 2>&1 || { echo "up failed"; tail -20 "$R/up.log"; exit 1; }
echo "up in $(( $(date +%s) - t0 ))s"
g() { local vm=$1; shift; timeout 120 $H ssh "$vm" -- "$@" </dev/null; }
for vm in vm1 vm2; do
	timeout 60 $H ssh $vm -- 'cat > /tmp/ip615; chmod +x /tmp/ip615' < /tmp/bigtcp/ip615/bin/ip
	timeout 60 $H ssh $vm -- 'cat > /tmp/orig.ko' < /tmp/bigtcp/guest-driver.orig/ivloop.ko
done
g vm1 'uname -r; ethtool -i ivl0 | head -3; /tmp/ip615 -d link show ivl0 | grep -o "gso_max_size.*"; /tmp/ip615 -d link show eth0 | grep -o "gso_max_size.*"' | tee "$R/info.txt"
for i in $(seq 1 30); do
	n=$(g vm1 'ethtool -S ivl0 | awk "/ peer_up:/ {print \$2}"')
	[ "${n:-0}" -ge 1 ] && break; sleep 2
done
g vm1 'ping -c 2 -W 2 10.77.0.2 >/dev/null && ethtool -S ivl0 | grep -E "peer_up|shm_tx_packets"' || { echo 'no ping: abort'; exit 1; }
stat() { g vm1 'ethtool -S ivl0' | awk '{gsub(":","",$1); printf "%s=%s ", $1, $2} END {print ""}'; }
setsz() { for vm in vm1 vm2; do g $vm "/tmp/ip615 link set ivl0 gso_ipv4_max_size $1 gro_ipv4_max_size $1" || echo "setsz $1 failed on $vm"; done; }
order=($sizes)
for r in $(seq 1 "$reps"); do
	for j in "${!order[@]}"; do
		s=${order[$(( (j + r - 1) % ${#order[@]} ))]}
		setsz "$s"
		b=$(stat)
		g vm1 "iperf3 -c 10.77.0.2 -t 10 -J" > "$R/iperf-$s-$r.json"
		a=$(stat)
		echo "$s $r BEFORE $b" >> "$R/stats.txt"; echo "$s $r AFTER $a" >> "$R/stats.txt"
		python3 - "$R/iperf-$s-$r.json" "$s" "$r" "$b" "$a" <<'PY' | tee -a "$R/summary.txt"
import json, sys
f, s, r, b, a = sys.argv[1:]
d = json.load(open(f))
bps = d["end"]["sum_received"]["bits_per_second"] / 1e9
def kv(t): return {k: int(v) for k, v in (x.split("=") for x in t.split()) if v.isdigit()}
B, A = kv(b), kv(a)
dd = {k: A[k] - B.get(k, 0) for k in A}
p = dd.get("shm_tx_packets", 0)
print(f"size={s} rep={r} gbps={bps:.3f} shm_tx_pkts={p} bytes/pkt={dd.get('shm_tx_bytes',0)/max(p,1):.0f} big={dd.get('shm_tx_big','-')} lower_tx_pkts={dd.get('lower_tx_packets',0)} retr={d['end']['sum_sent'].get('retransmits')}")
PY
	done
done
if [ -n "$unplug" ]; then
	setsz 185000
	b=$(stat)
	g vm1 "setsid iperf3 -c 10.77.0.2 -t 25 -J --logfile /tmp/u.json </dev/null >/dev/null 2>&1 &"
	sleep 8
	$H unplug vm2 > "$R/unplug.log" 2>&1; echo "unplug rc=$?"
	sleep 22
	g vm1 'cat /tmp/u.json' > "$R/iperf-unplug.json"
	a=$(stat)
	echo "UNPLUG BEFORE $b" >> "$R/stats.txt"; echo "UNPLUG AFTER $a" >> "$R/stats.txt"
	python3 - "$R/iperf-unplug.json" "$b" "$a" <<'PY' | tee -a "$R/summary.txt"
import json, sys
f, b, a = sys.argv[1:]
d = json.load(open(f))
ints = [round(i["sum"]["bits_per_second"] / 1e9, 2) for i in d["intervals"]]
def kv(t): return {k: int(v) for k, v in (x.split("=") for x in t.split()) if v.isdigit()}
B, A = kv(b), kv(a)
dd = {k: A[k] - B.get(k, 0) for k in A}
lp = dd.get("lower_tx_packets", 0)
print("unplug: per-second Gbit/s", ints)
print(f"unplug: total gbps={d['end']['sum_received']['bits_per_second']/1e9:.3f} retr={d['end']['sum_sent'].get('retransmits')} shm_tx_pkts={dd.get('shm_tx_packets')} lower_tx_pkts={lp} lower bytes/pkt={dd.get('lower_tx_bytes',0)/max(lp,1):.0f} lower_cut={dd.get('lower_tx_cut','-')} split={dd.get('lower_tx_split','-')} chunks={dd.get('lower_tx_chunks','-')} drops={dd.get('tx_lower_drops')}")
PY
	g vm1 'ethtool -S eth0 2>/dev/null | head -20; ip -s link show eth0' > "$R/eth0.txt"
fi
if [ -n "${mixed:-}" ]; then
	# vm2 back on the unmodified driver: big frames must be cut for it
	[ -n "$unplug" ] && { $H plug vm2 > "$R/plug.log" 2>&1; echo "plug rc=$?"; sleep 3; }
	g vm2 'ip link del ivl0; rmmod ivloop && insmod /tmp/orig.ko && ip link add link eth0 name ivl0 type ivloop && ip link set ivl0 up && ip addr add 10.77.0.2/24 dev ivl0 && echo reloaded-orig'
	sleep 3
	g vm1 '/tmp/ip615 link set ivl0 gso_ipv4_max_size 185000 gro_ipv4_max_size 185000'
	g vm1 'ping -c 3 -W 2 10.77.0.2 | tail -1'
	for r in 1 2; do
		b=$(stat); b2=$(g vm2 'ethtool -S ivl0' | tr -s ' ' | tr '\n' ' ')
		g vm1 "iperf3 -c 10.77.0.2 -t 10 -J" > "$R/iperf-mixed-$r.json"
		a=$(stat); a2=$(g vm2 'ethtool -S ivl0' | tr -s ' ' | tr '\n' ' ')
		echo "MIXED $r vm1 BEFORE $b" >> "$R/stats.txt"; echo "MIXED $r vm1 AFTER $a" >> "$R/stats.txt"
		echo "MIXED $r vm2 BEFORE $b2" >> "$R/stats.txt"; echo "MIXED $r vm2 AFTER $a2" >> "$R/stats.txt"
		python3 - "$R/iperf-mixed-$r.json" "$b" "$a" <<'PY' | tee -a "$R/summary.txt"
import json, sys
f, b, a = sys.argv[1:]
d = json.load(open(f))
def kv(t): return {k: int(v) for k, v in (x.split("=") for x in t.split()) if v.isdigit()}
B, A = kv(b), kv(a)
dd = {k: A[k] - B.get(k, 0) for k in A}
p = dd.get("shm_tx_packets", 0)
print(f"mixed(vm2 old driver): gbps={d['end']['sum_received']['bits_per_second']/1e9:.3f} shm_tx_pkts={p} bytes/pkt={dd.get('shm_tx_bytes',0)/max(p,1):.0f} big={dd.get('shm_tx_big')} cut={dd.get('shm_tx_cut')} lower_tx_pkts={dd.get('lower_tx_packets')} retr={d['end']['sum_sent'].get('retransmits')}")
PY
	done
	g vm2 'ethtool -S ivl0 | grep -E "rx_bad|shm_rx"'
fi
g vm1 'dmesg | tail -40' > "$R/dmesg-vm1.txt"
g vm2 'dmesg | tail -40' > "$R/dmesg-vm2.txt"
grep -iE 'warn|bug|oops|call trace' "$R"/dmesg-*.txt | head
echo "done in $(( $(date +%s) - t0 ))s"
