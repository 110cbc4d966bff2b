"""Four co-resident guests (issue 16): a full mesh of shared-memory pairs.

One boot for the module (harness/topologies/mesh.toml): vm1..vm4, one vCPU
and as little memory as the image allows, all on host A; vm4 moves to the
empty host B and back.  The tests run in file order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from harness.lab import paths

from .conftest import booted
from .lab import (
    Lab,
    PeerRow,
    collect,
    deltas,
    kernel_trouble,
    parse_ping,
    peer_rows,
    row_deltas,
    rows_for,
    spawn,
    topology_file,
)

VMS = ("vm1", "vm2", "vm3", "vm4")
PAIRS = [(a, b) for a in VMS for b in VMS if a != b]  # the 12 ordered pairs
PINGS = 3
STREAM_S = 6
# ARP broadcasts and IPv6 multicast take the lower NIC; a unicast flow
# between two of these guests must not.
LOWER_SLACK_PACKETS = 10
REPORT: dict[str, object] = {}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with booted(tmp_path_factory, "mesh", topology_file("mesh.toml"), REPORT) as lab:
        yield lab


def wait_mesh(lab: Lab, timeout: float = 60) -> float:
    """Wait until every guest routes every other over shared memory; seconds."""
    t0 = time.monotonic()
    for a, b in PAIRS:
        paths.wait_peer(lab.guest(a), lab.mac(b), shm=True, timeout=timeout)
    return time.monotonic() - t0


Tables = dict[str, list[PeerRow]]


def tables(lab: Lab) -> Tables:
    return {a: peer_rows(lab.guest(a)) for a in VMS}


def pair_deltas(lab: Lab, before: Tables, after: Tables) -> dict[tuple[str, str], tuple[int, int]]:
    """(tx, rx) packets *a* counted for *b* between two snapshots, per ordered
    pair: summed over *a*'s rows (slots) that now hold *b*'s MAC."""
    out = {}
    for a, b in PAIRS:
        rows = rows_for(row_deltas(before[a], after[a]), lab.mac(b))
        out[(a, b)] = (sum(r.tx_packets for r in rows), sum(r.rx_packets for r in rows))
    return out


def check_every_pair(lab: Lab, label: str) -> None:
    """Each guest pings the other three; every ordered pair's frames use its ring."""
    before_c = {a: paths.counters(lab.guest(a)) for a in VMS}
    before = tables(lab)
    lost = {}
    for a in VMS:
        others = " ".join(lab.ip(b) for b in VMS if b != a)
        out = lab.guest(a).run(
            f"for ip in {others}; do echo \"== $ip\"; ping -c {PINGS} -i 0.2 -W 2 $ip; done; true",
            timeout=60)
        for chunk in out.split("== ")[1:]:
            ip, _, text = chunk.partition("\n")
            lost[(a, ip.strip())] = parse_ping(text).lost
    after = tables(lab)
    per_pair = pair_deltas(lab, before, after)
    lower = {a: deltas(before_c[a], paths.counters(lab.guest(a)))["lower_tx_packets"]
             for a in VMS}
    REPORT[label] = {"per_pair_tx_rx": {f"{a}->{b}": v for (a, b), v in per_pair.items()},
                     "lower_tx_packets": lower}
    assert len(lost) == len(PAIRS) and not any(lost.values()), lost
    for (a, b), (tx, _) in per_pair.items():
        # a sent b its echo requests and its replies to b's, all through a->b
        assert tx >= 2 * PINGS, (a, b, per_pair)
        assert per_pair[(b, a)][1] >= 2 * PINGS, (a, b, per_pair)  # and b read them there
    for a, n in lower.items():
        assert n <= LOWER_SLACK_PACKETS, (a, lower)


def test_all_twelve_ordered_pairs_use_shared_memory(mesh: Lab) -> None:
    REPORT["mesh_formed_s"] = round(wait_mesh(mesh), 1)
    check_every_pair(mesh, "pairs")


def test_four_streams_at_once_all_on_shared_memory(mesh: Lab) -> None:
    lab = mesh
    wait_mesh(lab)
    # a ring of streams, so each guest sends one and its iperf3 server takes one
    ring = [(VMS[i], VMS[(i + 1) % len(VMS)]) for i in range(len(VMS))]
    before = {a: paths.counters(lab.guest(a)) for a in VMS}
    for a, b in ring:
        spawn(lab.guest(a), f"iperf3 -c {lab.ip(b)} -t {STREAM_S} -J", "/tmp/ring.json")
    received = {}
    for a, _ in ring:
        code, out = collect(lab.guest(a), "/tmp/ring.json", timeout=STREAM_S + 60)
        assert code == 0, (a, out[-2000:])
        received[a] = int(json.loads(out)["end"]["sum_received"]["bytes"])
    d = {a: deltas(before[a], paths.counters(lab.guest(a))) for a in VMS}
    REPORT["ring_mbps"] = {f"{a}->{b}": round(received[a] * 8 / STREAM_S / 1e6) for a, b in ring}
    for a, b in ring:
        assert received[a] > 1_000_000, (a, b, received)
        assert d[a]["shm_tx_bytes"] >= received[a], (a, d[a], received[a])
        assert d[a]["lower_tx_packets"] <= LOWER_SLACK_PACKETS, (a, d[a])
    for a in VMS:
        assert not kernel_trouble(lab.guest(a)), a


def test_mesh_reforms_after_one_guest_moves_away_and_back(mesh: Lab) -> None:
    lab = mesh
    wait_mesh(lab)
    there = lab.migrate("vm4", "A", "B")
    assert there.ok, there.error
    stay = [a for a in VMS if a != "vm4"]
    for a in stay:
        paths.wait_peer(lab.guest(a), lab.mac("vm4"), shm=False, timeout=15)
    # the three left behind still form their own mesh, and reach vm4 by wire
    for a in stay:
        for b in stay:
            if a != b:
                paths.wait_peer(lab.guest(a), lab.mac(b), shm=True, timeout=15)
        assert lab.ping(a, lab.ip("vm4"), count=3) == 0, a
    assert not any(r.state == "up" for r in peer_rows(lab.guest("vm4")))

    t0 = time.monotonic()
    back = lab.migrate("vm4", "B", "A")
    assert back.ok, back.error
    wait_mesh(lab)
    REPORT["reformed_after_return_s"] = round(time.monotonic() - t0, 1)
    REPORT["migrate_s"] = [round(there.total_s, 2), round(back.total_s, 2)]
    check_every_pair(lab, "pairs_after_return")
    for a in VMS:
        assert not kernel_trouble(lab.guest(a)), a
