"""Eight co-resident guests (issue 29): every pair, streams at once, a move, churn.

One boot for the module (harness/topologies/many.toml): vm1..vm8, one vCPU
and as little memory as the image allows, all on host A (16 slots); vm8
moves to the empty host B and back.  The tests run in file order.

Every stream here is checked, not assumed: the sender writes copies of a
1 MiB random file into ``nc -e`` and records how many it sent; the
receiver hashes what arrives; the sender then hashes that many copies of
the file, and the two digests must match.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from harness import cluster
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
    server_log,
    spawn,
    start_hashing_receiver,
    topology_file,
)

VMS = tuple(f"vm{i}" for i in range(1, 9))
MOVER = "vm8"
PAIRS = [(a, b) for a in VMS for b in VMS if a != b]  # the 56 ordered pairs
RING = [(VMS[i], VMS[(i + 1) % len(VMS)]) for i in range(len(VMS))]
PINGS = 3
CHUNK = "/tmp/chunk"  # 1 MiB of /dev/urandom in each guest's tmpfs
RING_COPIES = 12  # MiB per stream when eight run at once
CHURN_ROUNDS = 2
LONG_PAUSE_S = 0.5  # between 1 MiB copies of the streams that outlast a move or churn
# ARP broadcasts and IPv6 multicast take the lower NIC; a unicast flow
# between two of these guests must not.
LOWER_SLACK_PACKETS = 20
REPORT: dict[str, object] = {}


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with booted(tmp_path_factory, "many", topology_file("many.toml"), REPORT) as lab:
        for vm in VMS:
            lab.guest(vm).run(f"[ -s {CHUNK} ] || head -c 1048576 /dev/urandom > {CHUNK}")
        yield lab


def wait_all_pairs(lab: Lab, vms: tuple[str, ...] = VMS, timeout: float = 90) -> float:
    """Wait until every guest of *vms* routes every other over shared memory; seconds."""
    t0 = time.monotonic()
    for a in vms:
        for b in vms:
            if a != b:
                paths.wait_peer(lab.guest(a), lab.mac(b), shm=True, timeout=timeout)
    return time.monotonic() - t0


def rx_state(lab: Lab, vm: str) -> int:
    """Peers *vm* holds a NAPI instance and a page pool for."""
    c = paths.counters(lab.guest(vm))
    return c["peer_rx_made"] - c["peer_rx_freed"]


def no_trouble(lab: Lab) -> None:
    for vm in VMS:
        assert not kernel_trouble(lab.guest(vm)), (vm, kernel_trouble(lab.guest(vm)))


# ---------------------------------------------------------------------------
# checked streams


@dataclass(frozen=True)
class Stream:
    src: str
    dst: str
    port: int

    @property
    def stop(self) -> str:
        return f"/tmp/stop-{self.port}"


def start_streams(lab: Lab, pairs: list[tuple[str, str]], *, copies: int,
                  pause: float = 0.0, base_port: int = 6200) -> list[Stream]:
    """One checked stream per pair: at most *copies* MiB, or until stopped
    (:func:`stop_streams`); *pause* seconds between copies keeps a long
    stream light enough for eight guests on two cores."""
    streams = [Stream(a, b, base_port + i) for i, (a, b) in enumerate(pairs)]
    for s in streams:
        start_hashing_receiver(lab.guest(s.dst), s.port)
    for s in streams:
        nap = f"; sleep {pause}" if pause else ""
        body = (f"n=0; while [ $n -lt {copies} ] && [ ! -e {s.stop} ]; do "
                f"cat {CHUNK}{nap}; n=$((n + 1)); done; echo $n > /tmp/n-{s.port}")
        src = lab.guest(s.src)
        src.run(f"rm -f {s.stop} /tmp/n-{s.port}")
        spawn(src, f"nc {lab.ip(s.dst)} {s.port} -e sh -c '{body}'", f"/tmp/tx-{s.port}.log")
    return streams


def stop_streams(lab: Lab, streams: list[Stream]) -> None:
    for s in streams:
        lab.guest(s.src).run(f"touch {s.stop}")


def finish_streams(lab: Lab, streams: list[Stream], timeout: float = 300) -> dict[str, int]:
    """Wait for every stream to end; assert both ends' digests match.  MiB
    each sender sent, by "src->dst".  The senders hash at once, each its own."""
    for s in streams:
        code, out = collect(lab.guest(s.src), f"/tmp/tx-{s.port}.log", timeout)
        assert code == 0, f"{s.src} -> {s.dst}: sender failed: {out}"
        code, out = collect(lab.guest(s.dst), f"/tmp/rx-{s.port}.log", timeout=60)
        assert code == 0, f"{s.src} -> {s.dst}: receiver failed: {out}"
    for s in streams:
        spawn(lab.guest(s.src),
              f"n=$(cat /tmp/n-{s.port}); i=0; while [ $i -lt $n ]; do cat {CHUNK}; "
              f"i=$((i + 1)); done | sha256sum", f"/tmp/want-{s.port}")
    sent = {}
    for s in streams:
        src = lab.guest(s.src)
        code, out = collect(src, f"/tmp/want-{s.port}", timeout=120)
        assert code == 0, f"{s.src}: hashing what it sent failed: {out}"
        n = int(src.run(f"cat /tmp/n-{s.port}").strip())
        want = out.split()[0]
        got = lab.guest(s.dst).run(f"cat /tmp/rx-{s.port}.sum").split()[0]
        assert n > 0 and got == want, f"{s.src} -> {s.dst}: {n} MiB sent, sha256 {got} != {want}"
        sent[f"{s.src}->{s.dst}"] = n
    return sent


# ---------------------------------------------------------------------------
# the tests


def test_all_56_ordered_pairs_use_shared_memory(many: Lab) -> None:
    lab = many
    REPORT["all_pairs_formed_s"] = round(wait_all_pairs(lab), 1)
    before_c = {a: paths.counters(lab.guest(a)) for a in VMS}
    before = {a: peer_rows(lab.guest(a)) for a in VMS}
    lost = {}
    for a in VMS:
        others = " ".join(lab.ip(b) for b in VMS if b != a)
        out = lab.guest(a).run(
            f"for ip in {others}; do echo \"== $ip\"; ping -c {PINGS} -i 0.2 -W 2 $ip; done; true",
            timeout=120)
        for chunk in out.split("== ")[1:]:
            ip, _, text = chunk.partition("\n")
            lost[(a, ip.strip())] = parse_ping(text).lost
    assert len(lost) == len(PAIRS) and not any(lost.values()), lost
    tx: dict[tuple[str, str], int] = {}
    rx: dict[tuple[str, str], int] = {}
    for a in VMS:
        moved: list[PeerRow] = row_deltas(before[a], peer_rows(lab.guest(a)))
        for b in VMS:
            if b != a:
                rows = rows_for(moved, lab.mac(b))
                tx[(a, b)] = sum(r.tx_packets for r in rows)
                rx[(a, b)] = sum(r.rx_packets for r in rows)
    for a, b in PAIRS:
        # a sent b its echo requests and its replies to b's, all through a->b ...
        assert tx[(a, b)] >= 2 * PINGS, (a, b, tx)
        # ... and b read them from that ring
        assert rx[(b, a)] >= 2 * PINGS, (a, b, rx)
    lower = {a: deltas(before_c[a], paths.counters(lab.guest(a)))["lower_tx_packets"]
             for a in VMS}
    REPORT["lower_tx_packets_during_pings"] = lower
    assert all(n <= LOWER_SLACK_PACKETS for n in lower.values()), lower


def test_each_guest_holds_receive_state_for_its_peers_not_its_slots(many: Lab) -> None:
    """16 slots, 7 peers: 7 NAPI instances and page pools per guest, and with
    threaded NAPI 7 kthreads, not 15."""
    lab = many
    wait_all_pairs(lab)
    held = {vm: rx_state(lab, vm) for vm in VMS}
    REPORT["rx_state_per_guest"] = held
    assert all(n == len(VMS) - 1 for n in held.values()), held
    g = lab.guest("vm1")
    g.run("echo 1 > /sys/class/net/ivl0/threaded")
    try:
        threads = g.run("grep -l '^napi/ivl0-' /proc/[0-9]*/comm 2>/dev/null | wc -l").strip()
        REPORT["napi_threads_vm1"] = int(threads)
        assert int(threads) == len(VMS) - 1, threads
    finally:
        g.run("echo 0 > /sys/class/net/ivl0/threaded")


def test_eight_checked_streams_at_once_all_on_shared_memory(many: Lab) -> None:
    lab = many
    wait_all_pairs(lab)
    before = {a: paths.counters(lab.guest(a)) for a in VMS}
    t0 = time.monotonic()
    streams = start_streams(lab, RING, copies=RING_COPIES)
    sent = finish_streams(lab, streams)
    seconds = time.monotonic() - t0
    d = {a: deltas(before[a], paths.counters(lab.guest(a))) for a in VMS}
    REPORT["ring"] = {"s": round(seconds, 1), "mib_each": RING_COPIES,
                      "aggregate_mbit_s": round(sum(sent.values()) * 8 * 1.048576 / seconds)}
    for a, _ in RING:
        assert d[a]["shm_tx_bytes"] >= RING_COPIES << 20, (a, d[a])
        assert d[a]["lower_tx_packets"] <= LOWER_SLACK_PACKETS, (a, d[a])
    no_trouble(lab)


def test_streams_survive_while_one_guest_moves_away_and_back(many: Lab) -> None:
    lab = many
    wait_all_pairs(lab)
    stay = tuple(vm for vm in VMS if vm != MOVER)
    before = {a: peer_rows(lab.guest(a)) for a in stay}
    streams = start_streams(lab, RING, copies=10_000, pause=LONG_PAUSE_S, base_port=6300)
    time.sleep(3)
    there = lab.migrate(MOVER, "A", "B")
    assert there.ok, there.error
    for a in stay:
        paths.wait_peer(lab.guest(a), lab.mac(MOVER), shm=False, timeout=15)
    # the seven left behind keep their own mesh, and each its receive state
    wait_all_pairs(lab, stay, timeout=15)
    away = {vm: rx_state(lab, vm) for vm in VMS}
    back = lab.migrate(MOVER, "B", "A")
    assert back.ok, back.error
    wait_all_pairs(lab)
    time.sleep(3)
    stop_streams(lab, streams)
    sent = finish_streams(lab, streams)
    REPORT["move"] = {"migrate_s": [round(there.total_s, 2), round(back.total_s, 2)],
                      "downtime_ms": [there.downtime_ms, back.downtime_ms],
                      "mib_sent": sent, "rx_state_while_away": away}
    assert away[MOVER] == 0 and all(away[vm] == len(stay) - 1 for vm in stay), away
    # the streams between guests that stayed never left shared memory (their
    # ACKs to the mover went by wire while it was away: count per peer)
    for a, b in RING:
        if MOVER in (a, b):
            continue
        to_b = rows_for(row_deltas(before[a], peer_rows(lab.guest(a))), lab.mac(b))
        assert sum(r.tx_bytes for r in to_b) >= sent[f"{a}->{b}"] << 20, (a, b, to_b)
    assert all(rx_state(lab, vm) == len(VMS) - 1 for vm in VMS)
    no_trouble(lab)


def test_streams_survive_every_guest_unplugged_and_replugged_in_turn(many: Lab) -> None:
    lab = many
    wait_all_pairs(lab)
    made = {vm: paths.counters(lab.guest(vm))["peer_rx_made"] for vm in VMS}
    streams = start_streams(lab, RING, copies=10_000, pause=LONG_PAUSE_S, base_port=6400)
    since = time.time()
    t0 = time.monotonic()
    for _ in range(CHURN_ROUNDS):
        for i, vm in enumerate(VMS):
            with lab.sd:
                cluster.set_ivshmem(lab.sd, vm, attached=False)
            with lab.sd:
                cluster.set_ivshmem(lab.sd, vm, attached=True)
            # back on shared memory with its ring neighbour before the next
            paths.wait_peer(lab.guest(vm), lab.mac(VMS[(i + 1) % len(VMS)]), shm=True,
                            timeout=30)
    churn_s = time.monotonic() - t0
    wait_all_pairs(lab)
    stop_streams(lab, streams)
    sent = finish_streams(lab, streams)
    held = {vm: rx_state(lab, vm) for vm in VMS}
    REPORT["churn"] = {"rounds": CHURN_ROUNDS, "replugs": CHURN_ROUNDS * len(VMS),
                       "s": round(churn_s, 1), "mib_sent": sent, "rx_state_after": held}
    assert all(n == len(VMS) - 1 for n in held.values()), held
    # each guest's own re-plugs gave it all its peers' state anew, each time
    remade = {vm: paths.counters(lab.guest(vm))["peer_rx_made"] - made[vm] for vm in VMS}
    REPORT["churn"]["peer_rx_made"] = remade  # type: ignore[index]
    assert all(n >= CHURN_ROUNDS * (len(VMS) - 1) for n in remade.values()), remade
    # Each re-plug got a departed ID back with the eventfds every other QEMU
    # kept for it (none was sent a second set): the IDs stay those of 8 guests.
    joins = [r for r in server_log(lab.sd, "A", since) if r.get("event") == "join"]
    REPORT["churn"]["ids"] = sorted({r["peer"] for r in joins})  # type: ignore[index]
    assert len(joins) == CHURN_ROUNDS * len(VMS), joins
    assert {r["peer"] for r in joins} <= set(range(len(VMS))), joins
    assert all(r["handed_on"] == len(VMS) - 1 for r in joins), joins
    check = start_streams(lab, RING[:2], copies=4, base_port=6500)
    finish_streams(lab, check)
    no_trouble(lab)
