"""ivloop.ko on 2-vCPU guests (issue 16): parallel flows, checksummed data.

One boot for the module (harness/topologies/smp.toml): vm1 and vm2, two
vCPUs each, share host A; host B is empty until vm2 migrates there.  The
tests run in file order; the migration test is last and leaves vm2 on B.
"""

from __future__ import annotations

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
    kernel_trouble,
    spawn,
    start_hashing_receiver,
    topology_file,
)

REPORT: dict[str, object] = {}  # measured numbers, printed at the end
SECONDS = 8  # the parallel-streams run
PAYLOAD = "/tmp/payload"
PAYLOAD_BYTES = 256 << 20
# Frames that take the lower NIC while a co-resident pair talks only to
# each other: broadcast ARP and IPv6 multicast (ND, MLD).  A TCP flow that
# took the lower path for even a second would be thousands of frames.
LOWER_SLACK_PACKETS = 10


@pytest.fixture(scope="module")
def smp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with booted(tmp_path_factory, "smp", topology_file("smp.toml"), REPORT) as lab:
        yield lab


def coresident(lab: Lab) -> tuple[Guest, Guest]:
    g1, g2 = lab.guest("vm1"), lab.guest("vm2")
    paths.wait_peer(g1, lab.topo.vm("vm2").mac, shm=True)
    paths.wait_peer(g2, lab.topo.vm("vm1").mac, shm=True)
    return g1, g2


def no_trouble(lab: Lab) -> None:
    for vm in ("vm1", "vm2"):
        bad = kernel_trouble(lab.guest(vm))
        assert not bad, f"{vm}: {bad}"


def test_guests_have_two_vcpus(smp: Lab) -> None:
    for vm in ("vm1", "vm2"):
        assert smp.guest(vm).run("nproc").strip() == "2", vm


def test_four_streams_each_way_and_rr_all_on_shared_memory(smp: Lab) -> None:
    lab = smp
    g1, g2 = coresident(lab)
    ip2 = lab.ip("vm2")
    b1, b2 = paths.counters(g1), paths.counters(g2)
    # TCP_RR starts first and ends last, so it runs alongside the whole bulk
    spawn(g1, f"netperf -H {ip2} -t TCP_RR -l {SECONDS + 4} -P 0 -- -o THROUGHPUT",
          "/tmp/rr.out")
    iperf = lab.iperf3("vm1", "vm2", seconds=SECONDS, extra="-P 4 --bidir")
    code, rr_out = collect(g1, "/tmp/rr.out", timeout=30)
    assert code == 0, rr_out
    d1, d2 = deltas(b1, paths.counters(g1)), deltas(b2, paths.counters(g2))

    end = iperf["end"]
    streams = end["streams"]
    forward = [s["receiver"]["bytes"] for s in streams if s["sender"]["sender"]]
    reverse = [s["receiver"]["bytes"] for s in streams if not s["sender"]["sender"]]
    sent_by_1 = int(end["sum_received"]["bytes"])  # vm1 -> vm2, as vm2 received it
    sent_by_2 = int(end["sum_received_bidir_reverse"]["bytes"])
    rr = float(rr_out.strip().splitlines()[-1])
    REPORT["parallel"] = {
        "mbps_1to2": round(sent_by_1 * 8 / SECONDS / 1e6),
        "mbps_2to1": round(sent_by_2 * 8 / SECONDS / 1e6),
        "streams_mib": [b >> 20 for b in forward + reverse],
        "rr_per_s": rr,
        "vm1": {k: v for k, v in d1.items() if v},
        "vm2": {k: v for k, v in d2.items() if v},
    }

    assert len(forward) == 4 and len(reverse) == 4, streams
    # every flow moved data (none starved behind the others) ...
    assert min(forward + reverse) > 1_000_000, (forward, reverse)
    assert rr > 10, rr_out
    # ... and every byte of it went over shared memory: each guest's shm
    # transmit (frames, headers included) covers everything it sent, while
    # its lower NIC carried at most a few broadcasts.
    assert d1["shm_tx_bytes"] >= sent_by_1, (d1, sent_by_1)
    assert d2["shm_tx_bytes"] >= sent_by_2, (d2, sent_by_2)
    for name, d in (("vm1", d1), ("vm2", d2)):
        assert d["lower_tx_packets"] <= LOWER_SLACK_PACKETS, (name, d)
        assert d["shm_tx_packets"] > 1000 * d["lower_tx_packets"], (name, d)
    no_trouble(lab)


# ---------------------------------------------------------------------------
# checksummed transfers: vm1 sends a 256 MiB random file, vm2 hashes what
# arrives.  busybox nc copies 1 KiB per syscall, so both ends hand the
# socket to the program (nc -e): cat writes it, sha256sum reads it.


@pytest.fixture(scope="module")
def payload(smp: Lab) -> str:
    """The sha256 of PAYLOAD_BYTES of /dev/urandom kept in vm1's tmpfs."""
    t0 = time.monotonic()
    out = smp.guest("vm1").run(
        f"head -c {PAYLOAD_BYTES} /dev/urandom > {PAYLOAD} && stat -c %s {PAYLOAD} && "
        f"sha256sum {PAYLOAD}", timeout=600)
    size, digest = out.split()[:2]
    assert int(size) == PAYLOAD_BYTES, out
    REPORT["payload_s"] = round(time.monotonic() - t0, 1)
    return digest


def start_transfer(lab: Lab, port: int) -> None:
    """vm2 listens and hashes; vm1 sends PAYLOAD."""
    start_hashing_receiver(lab.guest("vm2"), port)
    spawn(lab.guest("vm1"), f"nc {lab.ip('vm2')} {port} -e cat {PAYLOAD}", f"/tmp/tx-{port}.log")


def finish_transfer(lab: Lab, port: int, timeout: float = 300) -> str:
    """The digest vm2 computed of what arrived."""
    code, out = collect(lab.guest("vm1"), f"/tmp/tx-{port}.log", timeout)
    assert code == 0, f"vm1's sender failed: {out}"
    g2 = lab.guest("vm2")
    code, out = collect(g2, f"/tmp/rx-{port}.log", timeout=60)
    assert code == 0, f"vm2's receiver failed: {out}"
    return g2.run(f"cat /tmp/rx-{port}.sum").split()[0]


def test_checksummed_transfer_over_shared_memory(smp: Lab, payload: str) -> None:
    lab = smp
    g1, _ = coresident(lab)
    b1 = paths.counters(g1)
    t0 = time.monotonic()
    start_transfer(lab, 5101)
    digest = finish_transfer(lab, 5101)
    seconds = time.monotonic() - t0
    d1 = deltas(b1, paths.counters(g1))
    REPORT["transfer"] = {"s": round(seconds, 1), "mib_per_s": round(256 / seconds, 1),
                          "shm_tx_bytes": d1["shm_tx_bytes"],
                          "lower_tx_bytes": d1["lower_tx_bytes"]}
    assert digest == payload
    assert d1["shm_tx_bytes"] >= PAYLOAD_BYTES, d1
    assert d1["lower_tx_packets"] <= LOWER_SLACK_PACKETS, d1
    no_trouble(lab)


def shm_lower_bytes(g: Guest) -> tuple[int, int]:
    c = paths.counters(g)
    return c["shm_tx_bytes"], c["lower_tx_bytes"]


def test_checksummed_transfer_across_a_live_migration(smp: Lab, payload: str) -> None:
    """Last: vm2 (2 vCPUs, receiving and hashing) moves to host B mid-transfer."""
    lab = smp
    g1, _ = coresident(lab)
    shm0, low0 = shm_lower_bytes(g1)
    start_transfer(lab, 5102)
    # move once the transfer runs on shared memory
    deadline = time.monotonic() + 60
    while shm_lower_bytes(g1)[0] - shm0 < 16 << 20:
        assert time.monotonic() < deadline, "the transfer never got going"
        time.sleep(0.2)
    report = lab.migrate("vm2", "A", "B")
    digest = finish_transfer(lab, 5102)
    shm1, low1 = shm_lower_bytes(g1)
    moved: dict[str, Any] = {"shm_bytes": shm1 - shm0, "lower_bytes": low1 - low0,
                             "downtime_ms": report.downtime_ms,
                             "migrate_s": round(report.total_s, 2)}
    REPORT["migration_transfer"] = moved
    assert report.ok, report.error
    assert lab.state.vms["vm2"].host == "B"
    assert digest == payload
    # the stream crossed the switch: part on shm, the rest on the wire
    assert moved["shm_bytes"] >= 16 << 20 and moved["lower_bytes"] >= 16 << 20, moved
    no_trouble(lab)
