"""A peer that misbehaves costs only its own pair (issue 16).

One boot for the module (harness/topologies/isolation.toml): victims vm1
and vm2 (ivloop.ko) share host A with `evil`, a guest whose ivshmem device
no driver claims, where `ivl-hostile` plays the bad peer; vm3 on host B
answers vm1's pings.  Every test starts from a freshly plugged device in
evil (a new slot, zeroed rings) and checks every guest's kernel log.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from harness import cluster
from harness.lab import paths

from .conftest import booted
from .lab import (
    Lab,
    PeerRow,
    PingRun,
    collect,
    deltas,
    kernel_trouble,
    parse_ping,
    peer_rows,
    received_bytes,
    row_deltas,
    rows_for,
    server_log,
    spawn,
    topology_file,
)

VMS = ("vm1", "vm2", "evil", "vm3")
REPORT: dict[str, Any] = {}
HOSTILE_LOG = "/tmp/hostile.log"
PHASE_S = 10  # the victim's stream; the 1000 pings take as long
PINGS = 1000
FLOOD_MPS = 5000  # 1400-byte datagrams from vm1 to evil: ~56 Mbit/s
FLOOD_PORT = 11111
FLAKY = "-o 300 -f 1500"  # consume 0.3 s, then nothing for 1.5 s (> stall_ms)


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with booted(tmp_path_factory, "isolation", topology_file("isolation.toml"), REPORT) as lab:
        yield lab


def wait_pair(lab: Lab, timeout: float = 30) -> None:
    paths.wait_peer(lab.guest("vm1"), lab.mac("vm2"), shm=True, timeout=timeout)
    paths.wait_peer(lab.guest("vm2"), lab.mac("vm1"), shm=True, timeout=timeout)


def fresh_evil(lab: Lab) -> None:
    """No ivl-hostile running, and a new ivshmem device: a new slot (DOWN),
    zeroed rings, and no verdict the victims kept about the old slot."""
    lab.guest("evil").run("killall -q -KILL ivl-hostile; true")
    for attached in (False, True):
        with lab.sd:
            cluster.set_ivshmem(lab.sd, "evil", attached=attached)


def start_hostile(lab: Lab, args: str) -> None:
    spawn(lab.guest("evil"), f"ivl-hostile {args}", HOSTILE_LOG)
    lab.guest("evil").run(f"t=0; until grep -q published {HOSTILE_LOG}; do sleep 0.1; "
                          f"t=$((t + 1)); [ $t -gt 100 ] && {{ cat {HOSTILE_LOG}; exit 1; }}; "
                          "done; true", timeout=60)


def stop_hostile(lab: Lab) -> str:
    g = lab.guest("evil")
    g.run("killall -q -INT ivl-hostile; true")
    code, out = collect(g, HOSTILE_LOG, timeout=30)
    assert code == 0, out
    return out


def consumed_records(hostile_out: str) -> int:
    m = re.search(r"consumed (\d+) records", hostile_out)
    assert m, hostile_out
    return int(m.group(1))


def no_trouble(lab: Lab) -> None:
    for vm in VMS:
        bad = kernel_trouble(lab.guest(vm))
        assert not bad, f"{vm}: {bad}"


# ---------------------------------------------------------------------------
# no stall


@dataclass
class Phase:
    label: str
    ping: PingRun
    stream_bytes: int
    stream_intervals: list[int]  # bytes per second of the stream
    vm1: dict[str, int]  # vm1's counter deltas
    evil_states: list[str]  # how vm1's peer table saw evil at the end
    hostile: str = ""

    def summarise(self) -> dict[str, Any]:
        keys = ("shm_tx_packets", "lower_tx_packets", "ring_full", "peer_stalled",
                "tx_stalled_lower", "tx_lower_drops")
        return {"lost": f"{self.ping.lost}/{self.ping.sent}",
                "rtt_max_ms": self.ping.max_ms, "rtt_p99_ms": self.ping.percentile(0.99),
                "rtt_p50_ms": self.ping.percentile(0.5),
                "stream_mib": self.stream_bytes >> 20,
                "stream_min_interval_kib": min(self.stream_intervals, default=0) >> 10,
                "evil_states": self.evil_states,
                "vm1": {k: self.vm1.get(k) for k in keys}}


def run_phase(lab: Lab, label: str, hostile: str | None) -> Phase:
    """vm1 streams to vm2, pings vm3 every 10 ms and floods evil, while evil
    runs *hostile* (None: evil stays DOWN, so the flood takes the lower NIC
    from the start, which is the baseline)."""
    g1, evil = lab.guest("vm1"), lab.guest("evil")
    fresh_evil(lab)
    wait_pair(lab)
    evil.run(f"(sockperf server -i {lab.ip('evil')} -p {FLOOD_PORT} > /dev/null 2>&1 &)")
    if hostile:
        start_hostile(lab, f"-t {PHASE_S + 60} {hostile}")
        # the attack reaches vm1: it routes evil over shared memory
        paths.wait_peer(g1, lab.mac("evil"), shm=True, timeout=15)
    before = paths.counters(g1)
    spawn(g1, f"ping -c {PINGS} -i 0.01 -W 2 {lab.ip('vm3')}", "/tmp/ping.log")
    spawn(g1, f"sockperf tp -i {lab.ip('evil')} -p {FLOOD_PORT} -m 1400 --mps={FLOOD_MPS} "
              f"-t {PHASE_S + 4}", "/tmp/flood.log")
    stream = lab.iperf3("vm1", "vm2", seconds=PHASE_S, extra="-i 1")
    _, ping_out = collect(g1, "/tmp/ping.log", timeout=60)
    collect(g1, "/tmp/flood.log", timeout=60)
    after = paths.counters(g1)
    states = [r.state for r in rows_for(peer_rows(g1), lab.mac("evil"))]
    out = stop_hostile(lab) if hostile else ""
    evil.run("killall -q sockperf; true")
    phase = Phase(label=label, ping=parse_ping(ping_out), stream_bytes=received_bytes(stream),
                  stream_intervals=[int(i["sum"]["bytes"] / i["sum"]["seconds"])
                                    for i in stream["intervals"] if i["sum"]["seconds"] >= 0.5],
                  vm1=deltas(before, after), evil_states=states, hostile=out)
    REPORT.setdefault("no_stall", {})[label] = phase.summarise()
    return phase


# What "within noise" means here.  Four TCG guests share the build
# machine's two cores, and a guest that loses its core for a moment stalls
# a round trip by up to ~100 ms: in one boot three baselines (no attack)
# peaked at 107, 59 and 29 ms, with medians of 1.5-2.5 ms, and the deaf and
# flaky phases beside them stayed in the same range (44-114 ms peaks).  A
# victim stuck behind a peer's full ring waits for stall_ms (1 s) instead;
# today's main lost 25 of 1000 pings and peaked at 277 ms.
RTT_NOISE_MS = 100


def check_unharmed(base: Phase, attacked: Phase) -> None:
    info = {"baseline": base.summarise(), attacked.label: attacked.summarise()}
    assert attacked.ping.lost == 0, info
    assert attacked.ping.max_ms <= max(2 * base.ping.max_ms,
                                       base.ping.max_ms + RTT_NOISE_MS), info
    assert attacked.ping.percentile(0.5) <= 2 * base.ping.percentile(0.5) + 2, info
    # The stream carries on: no second of it stalled (a victim waiting on a
    # full ring loses whole seconds), and its total within TCG's noise (in
    # the boot above, baselines moved 1.3 to 2.2 GiB in 10 s).
    floor = sum(base.stream_intervals) // max(1, len(base.stream_intervals)) // 10
    assert min(attacked.stream_intervals, default=0) >= floor, (attacked.stream_intervals, info)
    assert attacked.stream_bytes >= base.stream_bytes // 3, info


def test_a_peer_that_stops_reading_costs_only_its_own_frames(iso: Lab) -> None:
    lab = iso
    base = run_phase(lab, "baseline", None)
    assert base.ping.lost == 0, f"no attack yet, and pings to vm3 lost: {base.summarise()}"
    assert base.vm1["shm_tx_packets"] > 1000, base.summarise()  # the stream used shm

    deaf = run_phase(lab, "deaf", "deaf")
    check_unharmed(base, deaf)
    assert deaf.vm1["peer_stalled"] >= 1, deaf.summarise()
    assert deaf.vm1["tx_stalled_lower"] > 0, deaf.summarise()  # evil's frames went lower
    assert "stalled" in deaf.evil_states, deaf.summarise()

    flaky = run_phase(lab, "flaky", f"{FLAKY} flaky")
    REPORT["no_stall"]["flaky"]["hostile_consumed_records"] = consumed_records(flaky.hostile)
    check_unharmed(base, flaky)
    assert flaky.vm1["peer_stalled"] >= 1, flaky.summarise()
    assert flaky.vm1["tx_stalled_lower"] > 0, flaky.summarise()
    no_trouble(lab)


HTB = ("tc qdisc add dev ivl0 root handle 1: htb default 1 && "
       "tc class add dev ivl0 parent 1: classid 1:1 htb rate 10gbit")


def test_a_deaf_peer_behind_a_classful_root_qdisc_holds_no_other_flow(iso: Lab) -> None:
    """htb as ivl0's root (what rate limiters install) is one qdisc for every
    queue: a queue stopped on the deaf peer's full ring would hold the
    stream to vm2 and the pings to host B behind it for stall_ms."""
    lab = iso
    g1 = lab.guest("vm1")
    g1.run(HTB)
    try:
        base = run_phase(lab, "htb_baseline", None)
        assert base.ping.lost == 0, base.summarise()
        deaf = run_phase(lab, "htb_deaf", "deaf")
        qdisc = g1.run("tc qdisc show dev ivl0")
    finally:
        g1.run("tc qdisc del dev ivl0 root; true")
    assert "htb" in qdisc, qdisc
    check_unharmed(base, deaf)
    assert deaf.vm1["peer_stalled"] >= 1, deaf.summarise()
    # the flood's frames that found the ring full went lower, none waited
    assert deaf.vm1["tx_no_room"] + deaf.vm1["tx_stalled_lower"] > 0, deaf.summarise()
    assert deaf.vm1["ring_full"] == 0, deaf.summarise()  # no queue was stopped
    no_trouble(lab)


# ---------------------------------------------------------------------------
# offload metadata a strict receiver refuses


@pytest.mark.versions
def test_bad_offload_metadata_never_reaches_a_forwarding_victim(iso: Lab) -> None:
    """evil's records carry offloads that do not fit their frames (a checksum
    starting in the Ethernet or IP header, a GSO type of the wrong protocol);
    vm1 forwards what it accepts towards vm3, and runs with panic_on_warn=1,
    so one accepted record that reached segmentation would take it down."""
    lab = iso
    g1, g2 = lab.guest("vm1"), lab.guest("vm2")
    assert g1.run("cat /proc/sys/kernel/panic_on_warn").strip() == "1"
    boot_id = g1.run("cat /proc/sys/kernel/random/boot_id").strip()
    fresh_evil(lab)
    wait_pair(lab)
    g1.run("sysctl -q -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
    try:
        b1, b2 = paths.counters(g1), paths.counters(g2)
        start_hostile(lab, f"-t 8 -a {lab.ip('vm3')} -b {lab.topo.vm('vm3').ip6} bad-offload")
        for g in (g1, g2):
            paths.wait_peer(g, lab.mac("evil"), shm=True, timeout=15)
        code, out = collect(lab.guest("evil"), HOSTILE_LOG, timeout=60)
        time.sleep(1)  # the victims' NAPI has read the last round
        d1, d2 = deltas(b1, paths.counters(g1)), deltas(b2, paths.counters(g2))
    finally:
        g1.run("sysctl -q -w net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0")
    sent = re.findall(r"bad-offload slot (\d+) kind (\S+) sent (\d+)", out)
    keys = ("rx_bad_offload", "rx_bad_record", "rx_bad_src", "shm_rx_packets")
    REPORT["bad_offload"] = {"sent": sent, "vm1": {k: d1[k] for k in keys},
                             "vm2": {k: d2[k] for k in keys}}
    assert code == 0, out
    per_victim = {slot: 0 for slot, _, _ in sent}
    for slot, _, n in sent:
        per_victim[slot] += int(n)
    assert len(per_victim) >= 2 and min(per_victim.values()) >= 30, REPORT["bad_offload"]
    # every record refused and counted, in both victims; no ring declared broken
    for d in (d1, d2):
        assert d["rx_bad_offload"] >= min(per_victim.values()), REPORT["bad_offload"]
        assert d["rx_bad_record"] == 0, REPORT["bad_offload"]
    # vm1 is the same boot, without a warning
    assert g1.run("cat /proc/sys/kernel/random/boot_id").strip() == boot_id
    no_trouble(lab)


# ---------------------------------------------------------------------------
# a peer that dies in the middle of writing its slot


def test_a_peer_stuck_mid_write_neither_delays_a_leave_nor_hides_its_own(iso: Lab) -> None:
    """evil starts a write of its slot's guest half and never ends it (seq
    left odd, as a guest that died or was evicted mid-write leaves it).  Its
    half says nothing any more: after a heartbeat timeout it counts as DOWN,
    so vm2's leave handshake waits for nobody; and when its device goes, the
    server's half says so, and vm1 sees it leave."""
    lab = iso
    g1, g2 = lab.guest("vm1"), lab.guest("vm2")
    evil_mac = lab.mac("evil")
    fresh_evil(lab)
    wait_pair(lab)
    start_hostile(lab, "-t 60 -o 3000 stuck")
    paths.wait_peer(g1, evil_mac, shm=True, timeout=10)
    # evil's slot, as each victim numbers it (its MAC is unreadable once stuck)
    slot = {vm: rows_for(peer_rows(lab.guest(vm)), evil_mac)[0].id for vm in ("vm1", "vm2")}
    lab.guest("evil").run(f"t=0; until grep -q 'stuck slot' {HOSTILE_LOG}; do sleep 0.1; "
                          "t=$((t + 1)); [ $t -gt 100 ] && exit 1; done; true", timeout=30)
    t_stuck = time.monotonic()
    paths.wait_peer(g1, evil_mac, shm=False, timeout=10)
    judged_s = time.monotonic() - t_stuck
    states = [r.state for r in peer_rows(g2) if r.id == slot["vm2"]]

    b2 = paths.counters(g2)
    with lab.sd:
        cluster.set_ivshmem(lab.sd, "vm2", attached=False)
    with lab.sd:
        cluster.set_ivshmem(lab.sd, "vm2", attached=True)
    d2 = deltas(b2, paths.counters(g2))

    out = stop_hostile(lab)  # exits with its seq still odd
    with lab.sd:
        cluster.set_ivshmem(lab.sd, "evil", attached=False)
    t_gone = time.monotonic()
    def evil_rows() -> list[PeerRow]:
        return [r for r in peer_rows(g1) if r.id == slot["vm1"]]

    rows = evil_rows()
    deadline = t_gone + 10
    while any(r.state != "down" for r in rows) and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = evil_rows()
    gone_s = time.monotonic() - t_gone
    with lab.sd:
        cluster.set_ivshmem(lab.sd, "evil", attached=True)
    REPORT["stuck"] = {"off_shm_after_s": round(judged_s, 2), "vm2_saw": states,
                       "vm2_leave_ack_timeouts": d2["leave_ack_timeouts"],
                       "vm2_rx_leave_lost": d2["rx_leave_lost"],
                       "vm1_rows_after_unplug": [r.state for r in rows],
                       "gone_after_s": round(gone_s, 2)}
    assert "stuck slot" in out, out
    # a broken entry within a heartbeat timeout (1 s) and a few refresh ticks
    assert judged_s < 4 and states == ["bad-entry"], REPORT["stuck"]
    assert d2["leave_ack_timeouts"] == 0, REPORT["stuck"]
    assert all(r.state == "down" for r in rows) and gone_s < 4, REPORT["stuck"]
    wait_pair(lab)
    no_trouble(lab)


# ---------------------------------------------------------------------------
# detach under load


def test_detach_under_load_loses_no_frame(iso: Lab) -> None:
    lab = iso
    fresh_evil(lab)  # evil DOWN: vm2 waits for nobody's leave_ack but vm1's
    wait_pair(lab)
    g1, g2 = lab.guest("vm1"), lab.guest("vm2")
    b1, b2 = paths.counters(g1), paths.counters(g2)
    spawn(g1, f"iperf3 -c {lab.ip('vm2')} -t 12 -J", "/tmp/detach.json")
    time.sleep(3)
    with lab.sd:
        cluster.set_ivshmem(lab.sd, "vm2", attached=False)
    try:
        paths.wait_peer(g1, lab.mac("vm2"), shm=False, timeout=10)
        time.sleep(1)  # anything vm1 still had in flight is counted by now
        d1, d2 = deltas(b1, paths.counters(g1)), deltas(b2, paths.counters(g2))
        code, out = collect(g1, "/tmp/detach.json", timeout=60)
    finally:
        with lab.sd:
            cluster.set_ivshmem(lab.sd, "vm2", attached=True)
    keys = ("shm_tx_packets", "shm_rx_packets", "rx_leave_lost", "leave_ack_timeouts",
            "lower_tx_packets")
    REPORT["detach"] = {"vm1": {k: d1.get(k) for k in keys}, "vm2": {k: d2.get(k) for k in keys},
                        # the other direction, for the record: vm2's ACKs to vm1
                        "reverse_sent_minus_received": d2["shm_tx_packets"] - d1["shm_rx_packets"]}
    assert code == 0, out[-2000:]
    assert received_bytes(json.loads(out)) > 1_000_000
    assert d1["shm_tx_packets"] > 1000, REPORT["detach"]  # it was under load
    # every frame vm1 put in vm2's ring was read by vm2 or counted lost ...
    assert d1["shm_tx_packets"] == d2["shm_rx_packets"] + d2["rx_leave_lost"], REPORT["detach"]
    # ... and in a normal unplug none is lost: vm1 acknowledged the leave
    assert d2["rx_leave_lost"] == 0, REPORT["detach"]
    assert d2["leave_ack_timeouts"] == 0, REPORT["detach"]
    wait_pair(lab)
    no_trouble(lab)


# ---------------------------------------------------------------------------
# no impersonation (last: the server may have cut evil off)


def evil_slot_flags(lab: Lab) -> int:
    """srv_flags of evil's own slot, as ivl-hostile reads it."""
    out = lab.guest("evil").run("ivl-hostile info")
    my = re.search(r"^ivposition \d+ slot (\d+)", out, re.M)
    assert my, out
    row = re.search(rf"^slot {my.group(1)} .* srv_flags (0x[0-9a-f]+)", out, re.M)
    assert row, out
    return int(row.group(1), 16)


def test_a_peer_claiming_another_vms_mac_gets_none_of_its_frames(iso: Lab) -> None:
    lab = iso
    victim_mac = lab.mac("vm3")  # the VM on host B
    fresh_evil(lab)
    g1 = lab.guest("vm1")
    b1, rows0 = paths.counters(g1), peer_rows(g1)
    t0 = time.time()
    start_hostile(lab, f"-t 60 -m {victim_mac} claim")
    # at once, while the claim is fresh: before any eviction could help
    lost = lab.ping("vm1", lab.ip("vm3"), count=50, interval=0.1)
    rows = rows_for(row_deltas(rows0, peer_rows(g1)), victim_mac)
    d1 = deltas(b1, paths.counters(g1))
    out = stop_hostile(lab)
    flags = evil_slot_flags(lab)
    warnings = [r for r in server_log(lab.sd, "A", since=t0 - 1)
                if r.get("level") == "warning"
                and (victim_mac in json.dumps(r).lower()
                     or victim_mac.replace(":", "") in json.dumps(r).lower())]
    REPORT["claim"] = {"lost": f"{lost}/50", "rows": [r.__dict__ for r in rows],
                       "vm1": {k: d1.get(k) for k in ("shm_tx_packets", "lower_tx_packets",
                                                      "peer_bad_mac")},
                       "claimant_consumed_records": consumed_records(out),
                       "evil_srv_flags": flags, "server_warnings": [w.get("msg") for w in warnings]}
    assert lost == 0, REPORT["claim"]
    # not one frame into the claimant's ring: vm1 counted none for that
    # MAC, and the claimant found none
    assert all(r.tx_packets == 0 for r in rows), REPORT["claim"]
    assert consumed_records(out) == 0, REPORT["claim"]
    assert d1["lower_tx_packets"] >= 50, REPORT["claim"]  # the pings took the wire
    # the claim was noticed: by vm1's driver or by the server's eviction
    assert (d1["peer_bad_mac"] >= 1 or any(r.state == "bad-mac" for r in rows)
            or flags & 0x2), REPORT["claim"]  # 0x2: IVL_SLOT_F_EVICTED
    assert warnings, f"server-A.log has no WARNING naming {victim_mac}"
    no_trouble(lab)
