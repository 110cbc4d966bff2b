"""ivl0 in a guest's own network: containers, bridges, VLANs, jumbo frames (issue 26).

One boot for the module (harness/topologies/jumbo.toml): vm1 and vm2 share
host A, vm3 lives on host B, and every bridge, tap and the wire carry
9000-byte frames.  Each test builds its configuration inside the guests,
proves traffic is answered on the path the driver's counters name (shared
memory where the receiver accepts the frame, the lower NIC everywhere
else), moves bytes with a sha256 at both ends, and takes its configuration
down again, whatever happened.  The last tests do it all again across a
move of vm2 to host B and back.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness.lab import paths
from harness.lab.guest import Guest

from .conftest import booted
from .lab import (
    Lab,
    collect,
    deltas,
    in_ns,
    kernel_trouble,
    parse_ping,
    spawn,
    start_hashing_receiver,
    topology_file,
)

REPORT: dict[str, Any] = {}
MTU = 9000
PAYLOAD_MIB = 16
PAYLOAD = "/tmp/payload.bin"
# Container and VLAN addresses: the data subnet's top, and networks of their own.
C1_IP, C2_IP = "10.77.0.201", "10.77.0.202"
VLAN = 100
VLAN_NET, VLAN_NET6 = "10.78.100", "fd78:100:"
QINQ_OUTER, QINQ_INNER, QINQ_NET = 200, 300, "10.78.230"
# Frames a TCG pair may send lower while a path is "on shared memory": ARP,
# neighbour discovery, the odd frame racing a table rebuild.
LOWER_SLACK_PACKETS = 40


@pytest.fixture(scope="module")
def stk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with booted(tmp_path_factory, "stacking", topology_file("jumbo.toml"), REPORT) as lab:
        for vm in ("vm1", "vm2"):
            paths.wait_peer(lab.guest(vm), lab.mac("vm2" if vm == "vm1" else "vm1"),
                            shm=True, timeout=60)
        yield lab


def no_trouble(lab: Lab) -> None:
    for vm in ("vm1", "vm2", "vm3"):
        bad = kernel_trouble(lab.guest(vm))
        assert not bad, f"{vm}: {bad}"


def ping(g: Guest, dst: str, *, count: int = 10, size: int = 56, ns: str | None = None,
         six: bool = False) -> int:
    """Echo requests lost out of *count*."""
    cmd = f"{'ping6' if six else 'ping'} -c {count} -i 0.1 -W 2 -s {size} {dst}"
    out = g.run(in_ns(ns, cmd) + " || true", timeout=count * 0.1 + 60)
    return parse_ping(out).lost


def payload(g: Guest) -> str:
    """PAYLOAD_MIB of random bytes in *g*'s /tmp; their sha256."""
    out = g.run(f"[ -s {PAYLOAD} ] || head -c {PAYLOAD_MIB << 20} /dev/urandom > {PAYLOAD}; "
                f"sha256sum {PAYLOAD}", timeout=120)
    return out.split()[0]


def transfer(src: Guest, dst: Guest, dst_ip: str, port: int, *, src_ns: str | None = None,
             dst_ns: str | None = None) -> None:
    """Send *src*'s payload to *dst_ip*:*port* (nc), hash it where it lands, compare."""
    want = payload(src)
    rx = f"/tmp/rx-{port}"
    start_hashing_receiver(dst, port, dst_ns)
    spawn(src, in_ns(src_ns, f"nc {dst_ip} {port} -e cat {PAYLOAD}"), f"/tmp/tx-{port}.log")
    code, out = collect(src, f"/tmp/tx-{port}.log", timeout=300)
    assert code == 0, f"{src.vm}: sender failed: {out}"
    code, out = collect(dst, f"{rx}.log", timeout=60)
    assert code == 0, f"{dst.vm}: receiver failed: {out}"
    got = dst.run(f"cat {rx}.sum").split()[0]
    assert got == want, f"{src.vm} -> {dst.vm}:{dst_ip}: sha256 {got} != {want}"


@contextlib.contextmanager
def counting(lab: Lab, *vms: str) -> Iterator[dict[str, dict[str, int]]]:
    """Counter deltas of *vms*' ivl0 over the block, filled in on exit."""
    before = {vm: paths.counters(lab.guest(vm)) for vm in vms}
    moved: dict[str, dict[str, int]] = {}
    yield moved
    for vm in vms:
        moved[vm] = deltas(before[vm], paths.counters(lab.guest(vm)))


def undo(g: Guest, *commands: str) -> None:
    """Best-effort teardown: every command runs, whatever failed before it."""
    g.run("; ".join(f"{c} 2>/dev/null" for c in commands) + "; true", timeout=60)


# ---------------------------------------------------------------------------
# a container with a MAC of its own


def add_macvlan_container(g: Guest, ns: str, ip: str) -> None:
    g.run(f"ip netns add {ns} && ip link add mv-{ns} link ivl0 type macvlan mode bridge && "
          f"ip link set mv-{ns} netns {ns} && ip -n {ns} link set lo up && "
          f"ip -n {ns} addr add {ip}/24 dev mv-{ns} && ip -n {ns} link set mv-{ns} up")


def del_container(g: Guest, ns: str) -> None:
    undo(g, f"ip netns del {ns}")


def check_macvlan_container(lab: Lab, label: str) -> None:
    g1, g2 = lab.guest("vm1"), lab.guest("vm2")
    with counting(lab, "vm1", "vm2") as moved:
        lost_out = ping(g1, lab.ip("vm2"), count=20, ns="c1")
        lost_in = ping(g2, C1_IP, count=20)
        transfer(g1, g2, lab.ip("vm2"), 6201, src_ns="c1")
        transfer(g2, g1, C1_IP, 6202, dst_ns="c1")
    REPORT.setdefault("macvlan", {})[label] = {
        "lost": [lost_out, lost_in], "vm1": pick(moved["vm1"]), "vm2": pick(moved["vm2"])}
    assert (lost_out, lost_in) == (0, 0), REPORT["macvlan"][label]
    # The container's frames went lower (counted), none into vm2's ring to be dropped.
    assert moved["vm1"]["tx_foreign_src"] >= 20 + (PAYLOAD_MIB << 20) // 65536, moved["vm1"]
    assert moved["vm1"]["lower_tx_bytes"] >= PAYLOAD_MIB << 20, moved["vm1"]
    assert moved["vm2"]["rx_bad_src"] == 0, moved["vm2"]
    assert moved["vm1"]["rx_bad_src"] == 0, moved["vm1"]


def pick(d: dict[str, int]) -> dict[str, int]:
    keys = ("shm_tx_packets", "lower_tx_packets", "shm_tx_bytes", "lower_tx_bytes",
            "tx_foreign_src", "tx_offload_lower", "rx_bad_src", "rx_bad_offload")
    return {k: d[k] for k in keys if k in d}


@pytest.mark.versions
def test_macvlan_container_talks_to_a_coresident_guest(stk: Lab) -> None:
    g1 = stk.guest("vm1")
    add_macvlan_container(g1, "c1", C1_IP)
    try:
        check_macvlan_container(stk, "home")
        # ivl0's own traffic to vm2 still takes shared memory beside it.
        with counting(stk, "vm1") as moved:
            assert ping(g1, stk.ip("vm2"), count=10) == 0
        assert moved["vm1"]["shm_tx_packets"] >= 10, moved["vm1"]
    finally:
        del_container(g1, "c1")
    no_trouble(stk)


# ---------------------------------------------------------------------------
# a bridge with ivl0 as a port


def make_bridge(lab: Lab, mac: str) -> None:
    """vm1's address moves from ivl0 to br0 (MAC *mac*); a container c2 hangs
    off br0 through a veth pair."""
    ip = lab.ip("vm1")
    lab.guest("vm1").run(
        f"ip link add br0 type bridge && ip link set br0 address {mac} && "
        f"ip link set ivl0 master br0 && ip addr flush dev ivl0 && "
        f"ip addr add {ip}/24 dev br0 && ip link set br0 up && "
        f"ip netns add c2 && ip link add vh-c2 type veth peer name vc-c2 && "
        f"ip link set vh-c2 master br0 && ip link set vh-c2 up && "
        f"ip link set vc-c2 netns c2 && ip -n c2 link set lo up && "
        f"ip -n c2 addr add {C2_IP}/24 dev vc-c2 && ip -n c2 link set vc-c2 up")


def unmake_bridge(lab: Lab) -> None:
    ip, ip6 = lab.ip("vm1"), lab.topo.vm("vm1").ip6
    undo(lab.guest("vm1"), "ip netns del c2", "ip link del vh-c2", "ip link del br0",
         f"ip addr add {ip}/24 dev ivl0", f"ip -6 addr add {ip6}/64 dev ivl0 nodad")


def check_bridge(lab: Lab, label: str, br_mac: str) -> dict[str, dict[str, int]]:
    g1, g2 = lab.guest("vm1"), lab.guest("vm2")
    # vm2 learns br0's MAC afresh: it may still hold ivl0's or an older one
    g2.run("ip neigh flush all")
    with counting(lab, "vm1", "vm2") as moved:
        lost = [ping(g1, lab.ip("vm2"), count=10), ping(g1, lab.ip("vm2"), count=10, ns="c2"),
                ping(g2, lab.ip("vm1"), count=10), ping(g2, C2_IP, count=10)]
        transfer(g1, g2, lab.ip("vm2"), 6211, src_ns="c2")
        transfer(g1, g2, lab.ip("vm2"), 6212)
        transfer(g2, g1, lab.ip("vm1"), 6213)
    REPORT.setdefault("bridge", {})[label] = {
        "br0_mac": br_mac, "lost": lost, "vm1": pick(moved["vm1"]), "vm2": pick(moved["vm2"])}
    assert lost == [0, 0, 0, 0], REPORT["bridge"][label]
    assert moved["vm2"]["rx_bad_src"] == 0 and moved["vm1"]["rx_bad_src"] == 0, moved
    return moved


def test_bridge_over_ivl0_carries_the_guest_and_a_container(stk: Lab) -> None:
    lab = stk
    own = "02:00:00:77:00:01"  # a MAC of the bridge's own, as systemd gives one
    make_bridge(lab, own)
    try:
        moved = check_bridge(lab, "own_mac", own)
        # Every frame from br0 or c2 to vm2 carries a MAC that is not ivl0's:
        # all lower, counted, none lost.
        assert moved["vm1"]["tx_foreign_src"] >= 2 * (PAYLOAD_MIB << 20) // 65536, moved["vm1"]
        assert moved["vm1"]["shm_tx_bytes"] < 1 << 20, moved["vm1"]

        # A bridge that carries ivl0's MAC is accelerated (README's advice).
        lab.guest("vm1").run(f"ip link set br0 address {lab.mac('vm1')}")
        moved = check_bridge(lab, "ivl0_mac", lab.mac("vm1"))
        # br0's own transfer rode shared memory; the container's went lower.
        assert moved["vm1"]["shm_tx_bytes"] >= PAYLOAD_MIB << 20, moved["vm1"]
        assert moved["vm1"]["lower_tx_bytes"] >= PAYLOAD_MIB << 20, moved["vm1"]
        assert moved["vm2"]["shm_tx_bytes"] >= PAYLOAD_MIB << 20, moved["vm2"]
    finally:
        unmake_bridge(lab)
    assert ping(lab.guest("vm1"), lab.ip("vm2"), count=3) == 0
    no_trouble(lab)


# ---------------------------------------------------------------------------
# bonding


def test_bond_over_ivl0_keeps_shared_memory_while_it_carries_ivl0s_mac(stk: Lab) -> None:
    """balance-rr needs a port that takes a MAC (ndo_set_mac_address): the
    bond takes ivl0's, and rides shared memory; another MAC on the bond goes
    to the NIC, ivl0's slot goes DOWN, and traffic takes the lower NIC."""
    lab = stk
    g1, g2 = lab.guest("vm1"), lab.guest("vm2")
    ip, ip6 = lab.ip("vm1"), lab.topo.vm("vm1").ip6
    other = "02:00:00:77:00:0b"
    g1.run(f"ip link add bond0 type bond mode balance-rr && ip addr flush dev ivl0 && "
           f"ip link set ivl0 down && ip link set ivl0 master bond0 && "
           f"ip link set bond0 up && ip addr add {ip}/24 dev bond0")
    try:
        assert g1.run("cat /sys/class/net/bond0/address").strip() == lab.mac("vm1")
        paths.wait_peer(g2, lab.mac("vm1"), shm=True, timeout=30)
        with counting(lab, "vm1") as on_shm:
            assert ping(g1, lab.ip("vm2"), count=10) == 0
            transfer(g1, g2, lab.ip("vm2"), 6241)
        g1.run(f"ip link set bond0 address {other}")
        assert g1.run("cat /sys/class/net/eth0/address").strip() == other
        paths.wait_peer(g2, lab.mac("vm1"), shm=False, timeout=30)
        g2.run("ip neigh flush all")
        with counting(lab, "vm1") as off_shm:
            assert ping(g1, lab.ip("vm2"), count=10) == 0
            transfer(g1, g2, lab.ip("vm2"), 6242)
    finally:
        undo(g1, "ip link del bond0", "ip link set ivl0 up", f"ip addr add {ip}/24 dev ivl0",
             f"ip -6 addr add {ip6}/64 dev ivl0 nodad")
        g2.run("ip neigh flush all")
    REPORT["bond"] = {"ivl0_mac": pick(on_shm["vm1"]), "other_mac": pick(off_shm["vm1"])}
    assert on_shm["vm1"]["shm_tx_bytes"] >= PAYLOAD_MIB << 20, REPORT["bond"]
    assert off_shm["vm1"]["shm_tx_bytes"] == 0, REPORT["bond"]
    assert off_shm["vm1"]["lower_tx_bytes"] >= PAYLOAD_MIB << 20, REPORT["bond"]
    # released, the NIC has its own MAC again and vm1 is back on shared memory
    assert g1.run("cat /sys/class/net/eth0/address").strip() == lab.mac("vm1")
    paths.wait_peer(g2, lab.mac("vm1"), shm=True, timeout=30)
    assert ping(g1, lab.ip("vm2"), count=3) == 0
    no_trouble(lab)


# ---------------------------------------------------------------------------
# VLANs


def add_vlans(lab: Lab) -> None:
    for n, vm in ((1, "vm1"), (2, "vm2")):
        lab.guest(vm).run(
            f"ip link add link ivl0 name ivl0.{VLAN} type vlan id {VLAN} && "
            f"ip addr add {VLAN_NET}.{n}/24 dev ivl0.{VLAN} && "
            f"ip -6 addr add {VLAN_NET6}:{n}/64 dev ivl0.{VLAN} nodad && "
            f"ip link set ivl0.{VLAN} up && "
            # QinQ: an 802.1ad outer tag, an 802.1Q inner one
            f"ip link add link ivl0 name ivl0.{QINQ_OUTER} type vlan proto 802.1ad "
            f"id {QINQ_OUTER} && ip link set ivl0.{QINQ_OUTER} up && "
            f"ip link add link ivl0.{QINQ_OUTER} name qinq type vlan id {QINQ_INNER} && "
            f"ip addr add {QINQ_NET}.{n}/24 dev qinq && ip link set qinq up")


def del_vlans(lab: Lab) -> None:
    for vm in ("vm1", "vm2"):
        undo(lab.guest(vm), "ip link del qinq", f"ip link del ivl0.{QINQ_OUTER}",
             f"ip link del ivl0.{VLAN}")


def check_vlans(lab: Lab, label: str) -> None:
    g1, g2 = lab.guest("vm1"), lab.guest("vm2")
    with counting(lab, "vm1", "vm2") as moved:
        lost = [ping(g1, f"{VLAN_NET}.2"), ping(g2, f"{VLAN_NET}.1"),
                ping(g1, f"{VLAN_NET6}:2", six=True), ping(g2, f"{VLAN_NET6}:1", six=True)]
        transfer(g1, g2, f"{VLAN_NET}.2", 6221)
        transfer(g2, g1, f"{VLAN_NET6}:1", 6222)
    with counting(lab, "vm1") as qmoved:
        qinq_lost = ping(g1, f"{QINQ_NET}.2", count=10)
    REPORT.setdefault("vlan", {})[label] = {
        "lost": lost, "qinq_lost": qinq_lost, "vm1": pick(moved["vm1"]),
        "vm2": pick(moved["vm2"]), "qinq_vm1": pick(qmoved["vm1"])}
    assert lost == [0, 0, 0, 0] and qinq_lost == 0, REPORT["vlan"][label]
    # Tagged frames rode shared memory, both ways.
    for vm in ("vm1", "vm2"):
        d = moved[vm]
        assert d["shm_tx_bytes"] >= PAYLOAD_MIB << 20, (vm, d)
        assert d["lower_tx_packets"] <= LOWER_SLACK_PACKETS, (vm, d)
        assert d["rx_bad_offload"] == 0 and d["rx_bad_src"] == 0, (vm, d)


@pytest.mark.versions
def test_vlan_between_coresident_guests_rides_shared_memory(stk: Lab) -> None:
    add_vlans(stk)
    try:
        check_vlans(stk, "home")
        # The VID reached the lower NIC's filter: a tagged frame to a guest
        # on the other host (the wire, never shared memory) is answered too.
        stk.guest("vm3").run(
            f"ip link add link ivl0 name ivl0.{VLAN} type vlan id {VLAN} && "
            f"ip addr add {VLAN_NET}.3/24 dev ivl0.{VLAN} && ip link set ivl0.{VLAN} up")
        try:
            assert ping(stk.guest("vm1"), f"{VLAN_NET}.3") == 0
        finally:
            undo(stk.guest("vm3"), f"ip link del ivl0.{VLAN}")
    finally:
        del_vlans(stk)
    no_trouble(stk)


# ---------------------------------------------------------------------------
# jumbo frames


def check_jumbo(lab: Lab, label: str) -> None:
    g1, g2 = lab.guest("vm1"), lab.guest("vm2")
    size = MTU - 28  # one unfragmented frame of the full MTU
    with counting(lab, "vm1", "vm2") as moved:
        lost = [ping(g1, lab.ip("vm2"), size=size), ping(g2, lab.ip("vm1"), size=size)]
        transfer(g1, g2, lab.ip("vm2"), 6231)
    REPORT.setdefault("jumbo", {})[label] = {
        "lost": lost, "vm1": pick(moved["vm1"]), "vm2": pick(moved["vm2"])}
    assert lost == [0, 0], REPORT["jumbo"][label]
    assert moved["vm1"]["shm_tx_bytes"] >= (PAYLOAD_MIB << 20) + 10 * MTU, moved["vm1"]
    assert moved["vm1"]["lower_tx_packets"] <= LOWER_SLACK_PACKETS, moved["vm1"]


def test_jumbo_frames_cross_shared_memory(stk: Lab) -> None:
    g1 = stk.guest("vm1")
    for vm in ("vm1", "vm2", "vm3"):
        out = stk.guest(vm).run("cat /sys/class/net/eth0/mtu /sys/class/net/ivl0/mtu")
        assert out.split() == [str(MTU)] * 2, (vm, out)
    check_jumbo(stk, "home")
    # Across the wire (lower path) the same frames arrive whole.
    assert ping(g1, stk.ip("vm3"), size=MTU - 28) == 0

    # An ivloop link is created with any MTU its lower device has, and none above.
    g1.run("ip link add vj0 mtu 9000 type veth peer name vj1")
    try:
        g1.run("ip link add link vj0 name ivlj mtu 9000 type ivloop && "
               "test $(cat /sys/class/net/ivlj/mtu) = 9000")
        code, out = g1.status("ip link add link vj0 name ivlk mtu 9001 type ivloop 2>&1")
        assert code != 0 and "lower device" in out, out
    finally:
        undo(g1, "ip link del ivlj", "ip link del vj0")
    no_trouble(stk)


# ---------------------------------------------------------------------------
# the same, across a move of vm2 to host B and back


def ping_log(g: Guest, dst: str, log: str, *, ns: str | None = None, size: int = 56,
             six: bool = False) -> None:
    """Ping *dst* every 50 ms for as long as the move takes (ended by SIGINT)."""
    cmd = f"{'ping6' if six else 'ping'} -i 0.05 -W 2 -s {size} {dst}"
    spawn(g, in_ns(ns, cmd), log)


def stop_pings(g: Guest, logs: list[str]) -> dict[str, Any]:
    """Sent and lost of each ping :func:`ping_log` started, and which echo
    requests went unanswered (at 50 ms each, seq says when)."""
    g.run("killall -q -INT ping ping6; true")
    runs = {}
    for log in logs:
        _, out = collect(g, log, timeout=30)
        run = parse_ping(out)
        answered = {int(n) for n in re.findall(r"seq=(\d+) ", out)}
        runs[log] = {"sent": run.sent, "lost": run.lost,
                     "unanswered": sorted(set(range(run.sent)) - answered)}
    return runs


# QEMU before 8.1 clears virtio-net's VLAN filter when the moved guest
# resumes; ivl0 gives it the IDs again when virtio-net announces the guest.
# Tagged echo requests in between are lost: 0-4 of them at 50 ms in most
# runs, but 17 and 19 (v4) in two of about ten, unexplained.  One ARP
# retransmit interval (1 s) on top of the moves' own budget covers those,
# and still fails the filter left empty (97 of 179 lost while vm2 was on B).
VLAN_RESUME_SLACK = 20


def pings_across_a_round_trip(lab: Lab, label: str,
                              pings: dict[str, dict[str, Any]]) -> None:
    """vm1 pings (log -> ping_log's arguments, plus an optional "slack" of
    probes) while vm2 moves to host B and back; none may lose more than the
    moves' own downtime and its slack."""
    g1 = lab.guest("vm1")
    slack = {log: int(args.pop("slack", 0)) for log, args in pings.items()}
    for log, args in pings.items():
        ping_log(g1, log=log, **args)
    moves = round_trip(lab)
    time.sleep(1)
    runs = stop_pings(g1, list(pings))
    REPORT[label] = {"moves": moves, "pings": runs}
    budget = loss_budget(moves)
    for log, run in runs.items():
        assert run["sent"] > 20 and run["lost"] <= budget + slack[log], (
            log, run, budget + slack[log], moves)


def round_trip(lab: Lab) -> list[dict[str, Any]]:
    out = []
    for src, dst in (("A", "B"), ("B", "A")):
        report = lab.migrate("vm2", src, dst)
        assert report.ok, report.error
        out.append({"to": dst, "downtime_ms": report.downtime_ms,
                    "migrate_s": round(report.total_s, 2)})
        time.sleep(2)
    paths.wait_peer(lab.guest("vm1"), lab.mac("vm2"), shm=True, timeout=30)
    paths.wait_peer(lab.guest("vm2"), lab.mac("vm1"), shm=True, timeout=30)
    return out


def loss_budget(moves: list[dict[str, Any]]) -> int:
    """50 ms probes lost to the moves' own downtime, plus TCG's slack."""
    return int(sum((m["downtime_ms"] or 0) / 50 for m in moves)) + 2 * len(moves) + 6


def test_container_vlan_and_jumbo_survive_a_round_trip_migration(stk: Lab) -> None:
    lab = stk
    g1 = lab.guest("vm1")
    add_macvlan_container(g1, "c1", C1_IP)
    add_vlans(lab)
    try:
        pings_across_a_round_trip(lab, "round_trip", {
            "/tmp/p-c1.log": {"dst": lab.ip("vm2"), "ns": "c1"},
            "/tmp/p-vlan.log": {"dst": f"{VLAN_NET}.2", "slack": VLAN_RESUME_SLACK},
            "/tmp/p-vlan6.log": {"dst": f"{VLAN_NET6}:2", "six": True,
                                 "slack": VLAN_RESUME_SLACK},
            "/tmp/p-jumbo.log": {"dst": lab.ip("vm2"), "size": MTU - 28},
        })
        # Back home, each configuration is where it was: on its path, whole.
        check_macvlan_container(lab, "after_round_trip")
        check_vlans(lab, "after_round_trip")
        check_jumbo(lab, "after_round_trip")
    finally:
        del_vlans(lab)
        del_container(g1, "c1")
    no_trouble(lab)


def test_bridge_survives_a_round_trip_migration(stk: Lab) -> None:
    lab = stk
    make_bridge(lab, lab.mac("vm1"))
    try:
        pings_across_a_round_trip(lab, "bridge_round_trip", {
            "/tmp/p-br.log": {"dst": lab.ip("vm2")},
            "/tmp/p-c2.log": {"dst": lab.ip("vm2"), "ns": "c2"},
        })
        moved = check_bridge(lab, "after_round_trip", lab.mac("vm1"))
        assert moved["vm1"]["shm_tx_bytes"] >= PAYLOAD_MIB << 20, moved["vm1"]
    finally:
        unmake_bridge(lab)
    no_trouble(lab)


def test_htb_root_qdisc_survives_a_round_trip_migration(stk: Lab) -> None:
    """A rate limiter's classful root on ivl0: shaped traffic keeps its paths
    across the move (test_isolation.py has it beside a deaf peer)."""
    lab = stk
    g1 = lab.guest("vm1")
    g1.run("tc qdisc add dev ivl0 root handle 1: htb default 1 && "
           "tc class add dev ivl0 parent 1: classid 1:1 htb rate 10gbit")
    try:
        pings_across_a_round_trip(lab, "htb_round_trip", {
            "/tmp/p-htb2.log": {"dst": lab.ip("vm2")},
            "/tmp/p-htb3.log": {"dst": lab.ip("vm3")},
        })
        with counting(lab, "vm1") as moved:
            transfer(g1, lab.guest("vm2"), lab.ip("vm2"), 6251)
        qdisc = g1.run("tc qdisc show dev ivl0")
    finally:
        undo(g1, "tc qdisc del dev ivl0 root")
    REPORT["htb_round_trip"]["vm1"] = pick(moved["vm1"])
    assert "htb" in qdisc, qdisc
    assert moved["vm1"]["shm_tx_bytes"] >= PAYLOAD_MIB << 20, moved["vm1"]
    no_trouble(lab)
