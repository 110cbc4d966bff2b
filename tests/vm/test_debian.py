"""Two systemd Debian guests (issue 17): ivl0 from ordinary configuration.

One boot for the module (harness/topologies/debian.toml): deb1 and deb2 boot
images/build-debian's disk on host A; host B is empty until deb2 migrates
there.  The image has the ivloop-guest package (make deb) installed with
apt, its module built by DKMS during the image build (issue 28).  The
harness only writes each guest's files (hostname, keys, ivl0's addresses)
into its disk copy and starts QEMU: ivloop.ko loads through the package's
modules-load.d entry, its ivloop@.service (enabled as ivloop@eth0) stacks
ivl0, systemd-networkd configures it.  The tests run in file order; the
migration test is last.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.experiments.watch import Watch
from harness.lab import paths
from harness.lab.guest import Guest

from .conftest import booted
from .lab import ROUND_TRIP_MAX_S, Lab, deltas, kernel_trouble, topology_file

#: The version every piece of ivloop carries (the repository's VERSION).
VERSION = (Path(__file__).resolve().parents[2] / "VERSION").read_text().strip()

REPORT: dict[str, object] = {}  # measured numbers, printed at the end
GUESTS = ("deb1", "deb2")
# Frames on the lower NIC while a co-resident pair talks only to each other:
# broadcast ARP and IPv6 multicast.  A TCP stream there would be thousands.
LOWER_SLACK_PACKETS = 20


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with booted(tmp_path_factory, "debian", topology_file("debian.toml"), REPORT) as lab:
        yield lab


def networkctl(g: Guest) -> dict[str, tuple[str, str]]:
    """`networkctl list`: link -> (operational state, setup state)."""
    rows = {}
    for line in g.run("networkctl list --no-pager --no-legend").splitlines():
        fields = line.split()
        if len(fields) >= 5:
            rows[fields[1]] = (fields[3], fields[4])
    return rows


def journal_seconds(g: Guest, pattern: str) -> float | None:
    """Boot-relative time of the first journal line matching *pattern*."""
    for line in g.run("journalctl -b -o short-monotonic --no-pager", timeout=30).splitlines():
        m = re.match(r"\[\s*([\d.]+)\]", line)
        if m and re.search(pattern, line):
            return float(m.group(1))
    return None


def test_guests_bring_ivl0_up_from_their_own_configuration(debian: Lab) -> None:
    boot: dict[str, object] = {}
    for name in GUESTS:
        g = debian.guest(name)
        vm = debian.topo.vm(name)
        # systemd came up cleanly: nothing failed
        state = g.run("systemctl is-system-running || true").strip()
        failed = g.run("systemctl --failed --no-legend --plain --no-pager").strip()
        assert state == "running", f"{name}: {state}; failed units: {failed}"
        # ivloop.ko as a user installs it: the ivloop-guest package, its module
        # built by DKMS, autoloaded by the package's modules-load.d entry
        assert g.run("dpkg-query -W -f='${Status} ${Version}' ivloop-guest") == (
            f"install ok installed {VERSION}-1")
        assert g.run("dkms status ivloop").strip().endswith("installed"), g.run("dkms status")
        assert g.run("modinfo -F filename ivloop").strip().endswith("/updates/dkms/ivloop.ko")
        assert g.run("modinfo -F version ivloop").strip() == VERSION
        assert re.search(r"^ivloop\s", g.run("cat /proc/modules"), re.M)
        assert g.run("systemctl is-active ivloop@eth0.service").strip() == "active"
        assert g.run("systemctl show -P FragmentPath ivloop@eth0.service").strip() == (
            "/lib/systemd/system/ivloop@.service")
        loads = g.run("systemd-analyze cat-config modules-load.d/ivloop.conf")
        assert "/usr/lib/modules-load.d/ivloop.conf" in loads, loads
        links = networkctl(g)
        assert links.get("ivl0") == ("routable", "configured"), links
        assert links.get("eth0", ("", ""))[1] == "configured", links
        # the address on ivl0, none on eth0; both carry the VM's MAC
        ivl0 = g.run("ip -o addr show dev ivl0")
        assert f"inet {vm.ip}/{vm.prefixlen}" in ivl0 and f"inet6 {vm.ip6}/{vm.prefixlen6}" in ivl0
        assert "inet" not in g.run("ip -o addr show dev eth0")
        for dev in ("eth0", "ivl0"):
            assert g.run(f"cat /sys/class/net/{dev}/address").strip() == vm.mac
        assert g.run("hostname").strip() == name
        # configured before the harness's first SSH login: it sent no command
        configured = journal_seconds(g, r"systemd-networkd.*ivl0: Gained carrier")
        first_login = journal_seconds(g, r"sshd.*Accepted publickey")
        assert configured is not None and first_login is not None
        assert configured < first_login, (configured, first_login)
        boot[name] = {"startup": g.run("systemd-analyze | head -n1").strip(),
                      "ivl0_carrier_s": configured, "first_ssh_s": first_login}
    REPORT["boot"] = boot


def test_ping_and_a_stream_go_over_shared_memory(debian: Lab) -> None:
    g1, g2 = debian.guest("deb1"), debian.guest("deb2")
    waited = paths.wait_peer(g1, debian.topo.vm("deb2").mac, shm=True)
    paths.wait_peer(g2, debian.topo.vm("deb1").mac, shm=True)
    before = paths.counters(g1)
    assert debian.ping("deb1", debian.ip("deb2"), count=5) == 0
    assert "0% packet loss" in g1.run(f"ping -6 -c 3 -i 0.2 {debian.topo.vm('deb2').ip6}")
    iperf = debian.iperf3("deb1", "deb2", seconds=3)
    d = deltas(before, paths.counters(g1))
    assert d["shm_tx_bytes"] > 10_000_000, d
    assert d["lower_tx_packets"] <= LOWER_SLACK_PACKETS, d
    rx = paths.counters(g2)
    assert rx["shm_rx_bytes"] >= d["shm_tx_bytes"] // 2, rx
    REPORT["shm"] = {"peer_wait_s": round(waited, 2),
                     "iperf3_mbps": round(iperf["end"]["sum_received"]["bits_per_second"] / 1e6),
                     "shm_tx_bytes": d["shm_tx_bytes"], "lower_tx_packets": d["lower_tx_packets"]}


def test_stream_survives_a_round_trip_migration(debian: Lab, tmp_path: Path) -> None:
    reports = []
    with Watch(debian.sd, "deb1", "deb2", duration=ROUND_TRIP_MAX_S, out_dir=tmp_path) as watch:
        time.sleep(3)
        reports.append(debian.migrate("deb2", "A", "B", progress=watch.progress))
        time.sleep(5)
        on_b = watch.timeline.samples[-1]
        # the migrated guest writes to its disk, now opened by B's QEMU
        g2 = debian.guest("deb2")
        g2.run("echo moved > /var/tmp/ivl-migrated && sync")
        assert g2.run("findmnt -no OPTIONS /").startswith("rw")
        reports.append(debian.migrate("deb2", "B", "A", progress=watch.progress))
        watch.end_after(6)  # of traffic back home
    tl = watch.timeline
    REPORT["migration"] = {"downtime_ms": [r.downtime_ms for r in reports],
                           "total_s": [round(r.total_s, 2) for r in reports],
                           "ping_lost": f"{tl.ping_lost}/{tl.ping_sent}"}
    assert all(r.ok for r in reports)
    assert tl.iperf_ok, tl.stream_failure()  # one iperf3 run, no reconnect
    first = next(s for s in tl.samples if s.t >= 2)
    trace = (tl.events, [(s.t, s.shm_tx_bytes, s.lower_tx_bytes) for s in tl.samples[::4]])
    assert on_b.lower_tx_bytes - first.lower_tx_bytes > 500_000, trace  # on B: the wire
    assert tl.samples[-1].shm_tx_bytes - on_b.shm_tx_bytes > 1_000_000, trace  # home: shm
    g2 = debian.guest("deb2")
    assert g2.run("cat /var/tmp/ivl-migrated").strip() == "moved"
    assert g2.run("systemctl is-system-running || true").strip() == "running"
    paths.wait_peer(debian.guest("deb1"), debian.topo.vm("deb2").mac, shm=True)
    for name in GUESTS:
        assert kernel_trouble(debian.guest(name)) == [], name
