"""ivloop.ko in real guests: which path frames take, proven by the counters."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator

import pytest

from harness import cluster
from harness.experiments import demo
from harness.experiments.soak import KERNEL_TROUBLE
from harness.lab import paths
from harness.lab.guest import Guest

from .lab import Lab, received_bytes

# kernel trouble as the soak counts it, plus any error ivloop.ko logs
IVLOOP_ERROR = re.compile(r"ivloop.*error", re.IGNORECASE)


# the widest poll window (rx-usecs) ivl0 accepts, IVL_POLL_US_MAX
POLL_US_MAX = 10_000


def deltas(lab: Lab, vm: str, before: dict[str, int]) -> dict[str, int]:
    after = paths.counters(lab.guest(vm))
    return {k: after[k] - before.get(k, 0) for k in after}


@pytest.fixture
def coresident(lab: Lab) -> Lab:
    """vm1 and vm2 on host A, each routing the other over shared memory."""
    paths.wait_peer(lab.guest("vm1"), lab.topo.vm("vm2").mac, shm=True)
    paths.wait_peer(lab.guest("vm2"), lab.topo.vm("vm1").mac, shm=True)
    return lab


@pytest.mark.versions
def test_ping_between_coresident_vms_uses_shared_memory(coresident: Lab) -> None:
    lab = coresident
    b1 = paths.counters(lab.guest("vm1"))
    assert lab.ping("vm1", lab.ip("vm2"), count=5) == 0
    d = deltas(lab, "vm1", b1)
    assert d["shm_tx_packets"] >= 5 and d["shm_rx_packets"] >= 5, d


@pytest.mark.parametrize("tool", [pytest.param("iperf3 TCP", marks=pytest.mark.versions),
                                  "iperf3 UDP", "netperf TCP_STREAM", "netperf TCP_RR"])
def test_bulk_and_request_response_traffic_travels_over_shared_memory(
    coresident: Lab, tool: str
) -> None:
    lab = coresident
    ip2 = lab.ip("vm2")
    b1, b2 = paths.counters(lab.guest("vm1")), paths.counters(lab.guest("vm2"))
    g = lab.guest("vm1")
    if tool == "iperf3 TCP":
        assert received_bytes(lab.iperf3("vm1", "vm2", seconds=3)) > 1_000_000
    elif tool == "iperf3 UDP":
        result = lab.iperf3("vm1", "vm2", seconds=3, extra="-u -b 50M")
        assert result["end"]["sum"]["packets"] > 1000
    elif tool == "netperf TCP_STREAM":
        out = g.run(f"netperf -H {ip2} -t TCP_STREAM -l 3 -P 0 -- -o THROUGHPUT", timeout=60)
        assert float(out.strip().splitlines()[-1]) > 1
    else:
        out = g.run(f"netperf -H {ip2} -t TCP_RR -l 3 -P 0 -- -o THROUGHPUT", timeout=60)
        assert float(out.strip().splitlines()[-1]) > 10
    d1, d2 = deltas(lab, "vm1", b1), deltas(lab, "vm2", b2)
    assert d1["shm_tx_bytes"] > 100_000 and d2["shm_rx_bytes"] > 100_000, (d1, d2)
    # The flow itself never touched the lower NIC (allow a stray ARP/ND frame).
    assert d1["lower_tx_packets"] <= 3 and d2["lower_rx_packets"] <= 3, (d1, d2)


def test_traffic_to_another_host_uses_the_lower_nic(lab: Lab) -> None:
    b1 = paths.counters(lab.guest("vm1"))
    assert received_bytes(lab.iperf3("vm1", "vm3", seconds=2)) > 1_000_000
    d = deltas(lab, "vm1", b1)
    assert d["lower_tx_bytes"] > 1_000_000 and d["shm_tx_bytes"] < 10_000, d


def test_arp_and_ipv6_work_over_ivl0(coresident: Lab) -> None:
    lab = coresident
    g = lab.guest("vm1")
    g.run(f"ip neigh flush dev ivl0; ping -c 1 -W 2 {lab.ip('vm2')} >/dev/null")
    assert lab.topo.vm("vm2").mac in g.run("ip neigh show dev ivl0").lower()
    assert lab.ping("vm1", lab.topo.vm("vm2").ip6, count=3) == 0
    assert lab.ping("vm1", lab.topo.vm("vm3").ip6, count=3) == 0


def test_force_lower_moves_the_pair_to_the_lower_nic(coresident: Lab) -> None:
    lab = coresident
    g = lab.guest("vm1")
    g.run(f"{paths.FORCE_LOWER} on")
    try:
        # the flag's state, not its name (which is listed on or off)
        assert re.search(r"^force-lower\s*:\s*on$", g.run("ethtool --show-priv-flags ivl0"), re.M)
        b1 = paths.counters(g)
        lab.iperf3("vm1", "vm2", seconds=2)
        d = deltas(lab, "vm1", b1)
        assert d["lower_tx_bytes"] > 1_000_000 and d["shm_tx_bytes"] == 0, d
    finally:
        g.run(f"{paths.FORCE_LOWER} off")


def test_stream_survives_unplug_and_replug_of_the_device(coresident: Lab) -> None:
    lab = coresident
    mac2 = lab.topo.vm("vm2").mac
    g1 = lab.guest("vm1")
    result: dict[str, object] = {}

    def stream() -> None:
        result["iperf"] = lab.iperf3("vm1", "vm2", seconds=14)

    b1 = paths.counters(g1)
    t = threading.Thread(target=stream)
    t.start()
    time.sleep(3)
    with lab.sd:
        cluster.set_ivshmem(lab.sd, "vm2", attached=False)
    paths.wait_peer(g1, mac2, shm=False, timeout=10)
    mid = paths.counters(g1)
    time.sleep(3)
    on_lower = paths.counters(g1)
    with lab.sd:
        cluster.set_ivshmem(lab.sd, "vm2", attached=True)
    paths.wait_peer(g1, mac2, shm=True, timeout=30)
    time.sleep(3)
    back = paths.counters(g1)
    t.join(timeout=60)
    assert received_bytes(result["iperf"]) > 1_000_000  # type: ignore[arg-type]
    assert mid["shm_tx_bytes"] - b1["shm_tx_bytes"] > 100_000
    assert on_lower["lower_tx_bytes"] - mid["lower_tx_bytes"] > 100_000
    assert on_lower["shm_tx_bytes"] == mid["shm_tx_bytes"]
    assert back["shm_tx_bytes"] - on_lower["shm_tx_bytes"] > 100_000
    for vm in ("vm1", "vm2"):
        dmesg = lab.guest(vm).run("dmesg")
        bad = [line for line in dmesg.splitlines()
               if KERNEL_TROUBLE.search(line) or IVLOOP_ERROR.search(line)]
        assert not bad, f"{vm}: {bad}"


def poller_ticks(g: Guest) -> int:
    """utime + stime (clock ticks) of the guest's ring poller thread."""
    comm = g.run("grep -lx ivl-poll/ivl0 /proc/[0-9]*/comm 2>/dev/null; true").split()
    assert comm, "no ivl-poll/ivl0 thread in vm1"
    out = g.run(f"cat {comm[0].removesuffix('/comm')}/stat")
    # comm may hold spaces in general, never here: fields 14 and 15 (1-based)
    fields = out.split(")")[-1].split()
    return int(fields[11]) + int(fields[12])


def rr_deltas(lab: Lab, seconds: int = 3) -> dict[str, int]:
    g = lab.guest("vm1")
    before = paths.counters(g)
    out = g.run(f"netperf -H {lab.ip('vm2')} -t TCP_RR -l {seconds} -P 0 -- -o THROUGHPUT",
                timeout=60)
    assert float(out.strip().splitlines()[-1]) > 10
    return deltas(lab, "vm1", before)


def test_request_response_is_polled_instead_of_rung(coresident: Lab) -> None:
    lab = coresident
    g1, g2 = lab.guest("vm1"), lab.guest("vm2")
    assert int(g1.run(paths.GET_POLL_US)) > 0  # the default polls
    # The claim is the mechanism: an answer that comes back while a window
    # is open is found by the poller, and nobody rings.  Whether it comes
    # back within the default 500 us is timing, and on this shared 2-core
    # host it often does not: with one CPU hog on the host a round trip
    # took 1 ms and 75 % of requests rang at 500 us, against 0.1 % at 10 ms
    # (README, "Polling instead of doorbells").  So the windows here may
    # grow to the widest, 10 ms; what the default buys on a quiet host is
    # `harness bench`'s TCP_RR row.
    with poll_us((g1, g2), POLL_US_MAX):
        d = rr_deltas(lab)
    # Nearly every reply is found by the poller before a doorbell, and the
    # requests find vm2 polling too, so they need no doorbell either.
    assert d["shm_rx_packets"] > 100, d
    assert d["poll_hits"] > d["shm_rx_packets"] // 2, d
    assert d["doorbells_sent"] < d["shm_tx_packets"] // 10, d


@contextlib.contextmanager
def poll_us(guests: tuple[Guest, ...], value: int) -> Iterator[None]:
    """ivl0's rx-usecs (the poll window) set to *value* on *guests*; each one's own back after."""
    old = {g: int(g.run(paths.GET_POLL_US)) for g in guests}
    try:
        for g in guests:
            g.run(f"{paths.SET_POLL_US} {value}")
        yield
    finally:
        for g, v in old.items():
            g.run(f"{paths.SET_POLL_US} {v}")


def test_poll_us_zero_goes_back_to_doorbells(coresident: Lab) -> None:
    lab = coresident
    with poll_us((lab.guest("vm1"), lab.guest("vm2")), 0):
        d = rr_deltas(lab)
    assert d["poll_windows"] == 0 and d["poll_hits"] == 0, d
    # every request finds vm2 asleep with its kick armed
    assert d["doorbells_sent"] > d["shm_tx_packets"] // 2, d


def test_an_idle_guest_does_not_poll(coresident: Lab) -> None:
    lab = coresident
    g = lab.guest("vm1")
    rr_deltas(lab, seconds=1)
    time.sleep(0.5)  # windows close poll_us (at most a millisecond) after the last frame
    before_ticks, before = poller_ticks(g), paths.counters(g)
    time.sleep(3)
    d = deltas(lab, "vm1", before)
    # SSH uses the management NIC, not ivl0; an ARP probe to vm2 may open
    # a window, but no window stays open without frames
    assert d["poll_windows"] <= 2, d
    assert poller_ticks(g) - before_ticks <= 1


def test_a_busy_receiver_goes_back_to_doorbells(coresident: Lab) -> None:
    # A CPU-bound task on vm2 leaves its nice-19 poller no CPU.  Were the
    # kicks left off meanwhile, requests would wait milliseconds for the
    # poller's next slice (this once made TCP_RR 17x slower than with
    # doorbells); the poller must notice and hand vm2 back to doorbells.
    lab = coresident
    g1, g2 = lab.guest("vm1"), lab.guest("vm2")
    ip2 = lab.ip("vm2")
    hog = g2.run("timeout 120 sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 & echo $!")
    try:
        before2 = paths.counters(g2)
        d = rr_deltas(lab)
        assert d["doorbells_sent"] > d["shm_tx_packets"] // 2, d
        # the poller saw it on its return, or the watchdog did first
        d2 = deltas(lab, "vm2", before2)
        assert d2["poll_starved"] + d2["poll_watchdog"] >= 1, d2
        polled = demo.rr_mean_us(g1, ip2, seconds=3)
        with poll_us((g1, g2), 0):
            rung = demo.rr_mean_us(g1, ip2, seconds=3)
    finally:
        g2.run(f"kill {hog.strip()}")
    assert polled < 3 * rung, (polled, rung)


def test_rx_usecs_refuses_windows_over_10_ms(coresident: Lab) -> None:
    g = coresident.guest("vm1")
    old = g.run(paths.GET_POLL_US).strip()
    code, out = g.status(f"{paths.SET_POLL_US} {POLL_US_MAX + 1} 2>&1")
    assert code != 0 and f"at most {POLL_US_MAX}" in out, out
    assert g.run(paths.GET_POLL_US).strip() == old
    # the module parameter is only the default for new devices
    code, _ = g.status("echo 0 > /sys/module/ivloop/parameters/poll_us")
    assert code != 0


def pages_allocated(g: Guest) -> int:
    """Pages the guest's page allocator handed out since boot, all zones."""
    out = g.run("grep -E '^pgalloc_' /proc/vmstat")
    return sum(int(line.split()[1]) for line in out.splitlines())


def test_receiver_recycles_its_ring_pages(coresident: Lab) -> None:
    lab = coresident
    g2 = lab.guest("vm2")
    before, pages = paths.counters(g2), pages_allocated(g2)
    assert received_bytes(lab.iperf3("vm1", "vm2", seconds=3)) > 100_000_000
    received = paths.counters(g2)["shm_rx_bytes"] - before["shm_rx_bytes"]
    # Without the page pool every received byte lands in a freshly
    # allocated page (at least received / 4096 pages); recycled, the
    # allocator sees a small fraction of that.
    assert pages_allocated(g2) - pages < received // 4096 // 4, received
