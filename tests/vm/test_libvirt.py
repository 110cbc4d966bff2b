"""The harness on libvirt: a real libvirtd per simulated host, VMs as domains.

Drives harness.backends.libvirt directly (the CLI's ``--backend libvirt``
wiring calls the same functions).  The default topology boots once for the
module; its teardown checks that nothing is left: no libvirtd, no QEMU, no
namespace, no mount, no socket, no libvirt directory.

Its ivloop-servers are the ivloop-host package's (make deb), unpacked and
run by the system's Python through ``$IVLOOP_SERVER_ROOT`` (issue 28): the
files the package ships carry this module's traffic and migrations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from harness import cluster, migrate
from harness.backends import domain, libvirtd, qmp
from harness.backends import libvirt as backend_libvirt
from harness.errors import MigrationError
from harness.experiments.watch import Watch
from harness.lab import accel, hostnet, paths, servers, topology, vms
from harness.lab.state import StateDir
from tests.packaging import debs

from .conftest import leftovers, recorded_pids
from .lab import ROUND_TRIP_MAX_S, Lab
from .refused_plug import a_refused_plug_leaves_the_vm_on_the_destination
from .test_migrate import moved_over

numbers: dict[str, Any] = {}


def libvirt_leftovers(sd: StateDir, pids: list[int]) -> list[str]:
    """Everything of *sd* still there after down, libvirt's share included."""
    found = leftovers(sd, pids)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = os.path.basename(args[0])
        if (name == b"libvirtd" or name.startswith(b"qemu-system")) \
                and str(sd.path).encode() in b" ".join(args):
            found.append(f"{name.decode()} pid {entry.name}")
    found += [f"mount {m}" for m in libvirtd.mounts_of(sd.path)]
    found += [f"mount {line.split()[4]}" for line in
              Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4] in libvirtd.MOUNTS.values()]
    found += [f"directory {d.root}" for d in libvirtd.daemons_in(sd)]
    return found


def pids_of(sd: StateDir) -> list[int]:
    pids = recorded_pids(sd)
    for d in libvirtd.daemons_in(sd):
        pids += [r.pid for r in libvirtd.daemons_of(d)]
        pids += [r.pid for _, r in libvirtd.qemu_of(d, None)]
    return pids


@pytest.fixture(scope="module")
def packaged_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ivloop-host package unpacked; the harness runs its servers from it."""
    root = debs.extract(debs.built().host, tmp_path_factory.mktemp("ivloop-host"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(servers.SERVER_ROOT_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def lvlab(tmp_path_factory: pytest.TempPathFactory, packaged_server: Path) -> Iterator[Lab]:
    sd = StateDir(tmp_path_factory.mktemp("lv") / "state")
    t0 = time.monotonic()
    try:
        with sd:
            cluster.up(sd, topology.load(), backend="libvirt")
        numbers["up_s"] = round(time.monotonic() - t0, 1)
        lab = Lab(sd, topology.load())
        yield lab
        lab.close()
    finally:
        pids = pids_of(sd)
        t = time.monotonic()
        with sd:
            removed = cluster.down(sd)
        numbers["down_s"] = round(time.monotonic() - t, 1)
        print(f"\nlibvirt numbers: {json.dumps(numbers)}\nremoved: {removed}")
        left = libvirt_leftovers(sd, pids)
        assert not left, f"down left {left}"


def test_down_finds_a_daemon_whose_harness_was_killed(tmp_path: Path) -> None:
    """kill -9 of the harness right after libvirtd started: nothing recorded but
    the directory, and `down` still stops it and removes its files."""
    sd = StateDir(tmp_path / "state")
    code = f"""
import os, signal
from pathlib import Path
from harness.backends import libvirtd
from harness.lab import hostnet
from harness.lab.state import StateDir
sd = StateDir(Path({str(sd.path)!r}))
(sd.path / "logs").mkdir(parents=True)
hostnet.create_host(sd.netns_name("A"))
d = libvirtd.daemon(sd, "A")
libvirtd.prepare(d, libvirtd.host_uuid(sd.instance, "A"))
libvirtd.spawn(d, sd.netns_name("A"), sd.file("logs", "libvirtd-A.log"))
d.record.unlink()  # as if killed before the record was written
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    d = libvirtd.daemon(sd, "A")
    deadline = time.monotonic() + 30
    while not d.socket.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    running = libvirtd.daemons_of(d)
    assert len(running) == 1, running
    try:
        removed = backend_libvirt.down(sd)
    finally:
        hostnet.remove_host(sd.netns_name("A"))
    assert f"libvirtd A (pid {running[0].pid})" in removed
    assert not running[0].alive() and not d.root.exists()
    assert libvirt_leftovers(sd, [running[0].pid]) == []


def test_each_host_runs_its_own_libvirtd(lvlab: Lab) -> None:
    state = lvlab.state
    uuids = set()
    for host, hs in state.hosts.items():
        d = libvirtd.daemon(lvlab.sd, host)
        (daemon,) = libvirtd.daemons_of(d)
        # in the host's network namespace, in a mount namespace of its own
        assert os.stat(f"/proc/{daemon.pid}/ns/net").st_ino == \
            os.stat(hostnet.NETNS_DIR / hs.netns).st_ino
        assert os.stat(f"/proc/{daemon.pid}/ns/mnt").st_ino != \
            os.stat("/proc/self/ns/mnt").st_ino
        with libvirtd.connection(d) as conn:
            caps = ET.fromstring(conn.getCapabilities())
            uuids.add(caps.findtext("./host/uuid"))
            assert caps.findtext("./host/uuid") == libvirtd.host_uuid(lvlab.sd.instance, host)
            assert sorted(dom.name() for dom in conn.listAllDomains(0)) == \
                sorted(vm.name for vm in lvlab.topo.vms_on(host))
    assert len(uuids) == len(state.hosts)
    # their bind mounts are invisible out here
    assert libvirtd.mounts_of(lvlab.sd.path) == []


def test_domains_have_the_template_layout(lvlab: Lab) -> None:
    state = lvlab.state
    vs = state.vms["vm1"]
    d = libvirtd.daemon(lvlab.sd, vs.host)
    with libvirtd.connection(d) as conn:
        dom = conn.lookupByName("vm1")
        live = domain.parse(dom.XMLDesc(0))
        ram = json.loads(libvirt_qemu.qemuMonitorCommand(
            dom, '{"execute": "query-memory-size-summary"}', 0))["return"]["base-memory"]
    spec = lvlab.topo.vm("vm1")
    assert live.slots == {"interface": 2, "rng": 4, "shmem": 5}
    assert live.data_mac == spec.mac and live.tap == vs.tap
    assert live.shmem_socket == state.hosts[vs.host].server_socket
    assert f"hostfwd=tcp:127.0.0.1:{vs.ssh_port}-:22" in " ".join(live.qemu_args)
    # the RAM QEMU really has is the direct backend's (TCG padding included)
    want = accel.Choice(state.accel, "t").memory_arg(spec.memory, vms.qemu_for(state))
    assert ram == domain.memory_kib(want) * 1024
    # the recorded process is the domain's QEMU, and the console log fills
    assert vs.proc is not None and [r.pid for n, r in libvirtd.qemu_of(d, None)
                                    if n == "vm1"] == [vs.proc.pid]
    assert "ivloop-init" in Path(vs.console).read_text(errors="replace")


def test_servers_are_the_packaged_ones(lvlab: Lab, packaged_server: Path) -> None:
    """Each host's ivloop-server runs the ivloop-host package's script and modules."""
    binary = str(packaged_server / servers.PACKAGED_BINARY)
    site = f"PYTHONPATH={packaged_server / servers.PACKAGED_PYTHONPATH}".encode()
    found = []
    for pid in recorded_pids(lvlab.sd):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--max-peers" in argv and b"harness.lab.fdstore" not in argv:  # an ivloop-server
            assert argv[:2] == [b"/usr/bin/python3", binary.encode()], argv
            assert site in environ, f"server {pid} runs without the packaged modules"
            found.append(pid)
    assert len(found) == len(lvlab.topo.hosts), found


def test_co_resident_traffic_uses_shared_memory(lvlab: Lab) -> None:
    t = paths.wait_peer(lvlab.guest("vm1"), lvlab.topo.vm("vm2").mac, shm=True)
    numbers["shm_ready_s"] = round(t, 2)
    assert lvlab.ping("vm1", lvlab.ip("vm2"), count=5) == 0
    shm, lower = moved_over(lvlab, "vm1", "vm2")
    numbers["shm_bytes_2s"] = shm
    assert shm > 1_000_000 and lower < shm / 50, (shm, lower)
    assert paths.describe(lvlab.guest("vm2")) == "shm to 1 peer(s)"


def test_unplug_and_plug_switch_the_path_and_park_the_freed_fds(lvlab: Lab) -> None:
    """Through ivloop_libvirt; QEMU 7.2's stale fd handlers get parked fds (twice)."""
    mac1 = lvlab.topo.vm("vm1").mac
    g2 = lvlab.guest("vm2")
    for _ in range(2):
        vs = lvlab.state.vms["vm1"]
        assert vs.proc is not None
        before = qmp.open_fds(vs.proc.pid)
        with lvlab.sd:
            cluster.set_ivshmem(lvlab.sd, "vm1", attached=False)
        assert before <= qmp.open_fds(vs.proc.pid)  # every freed number taken again
        paths.wait_peer(g2, mac1, shm=False)
        assert not lvlab.state.vms["vm1"].ivshmem
        assert lvlab.ping("vm2", lvlab.ip("vm1"), count=3) == 0  # over the lower NIC
        with lvlab.sd:
            cluster.set_ivshmem(lvlab.sd, "vm1", attached=True)
        paths.wait_peer(g2, mac1, shm=True)
        assert lvlab.ping("vm2", lvlab.ip("vm1"), count=3) == 0
    vs = lvlab.state.vms["vm1"]
    assert vs.ivshmem and vs.unplugs == 2 and vs.proc is not None and vs.proc.alive()


def test_stream_survives_a_round_trip_migration(lvlab: Lab, tmp_path: Path) -> None:
    reports = []
    with Watch(lvlab.sd, "vm1", "vm2", duration=ROUND_TRIP_MAX_S, out_dir=tmp_path) as watch:
        time.sleep(3)
        with lvlab.sd:
            reports.append(migrate.migrate(lvlab.sd, "vm2", "A", "B",
                                           progress=watch.progress))
        lvlab.drop("vm2")
        assert lvlab.state.vms["vm2"].host == "B"
        time.sleep(6)
        after_first = watch.timeline.samples[-1]
        with lvlab.sd:
            reports.append(migrate.migrate(lvlab.sd, "vm2", "B", "A",
                                           progress=watch.progress))
        lvlab.drop("vm2")
        watch.end_after(6)  # of traffic back home
    tl = watch.timeline
    numbers["migrations"] = [{k: r.as_dict()[k] for k in (
        "unplug_s", "migrate_s", "plug_s", "downtime_ms", "transferred_mib",
        "switch_source_s", "switch_dest_s")} for r in reports]
    numbers["ping_lost"] = f"{tl.ping_lost}/{tl.ping_sent}"
    assert all(r.ok for r in reports)
    assert tl.iperf_ok, tl.stream_failure()  # one iperf3 connection all along
    # both path switches were seen by vm1's driver
    assert reports[0].switch_source_s is not None and reports[1].switch_dest_s is not None
    before_move = next(s for s in tl.samples if s.t >= 2)
    assert after_first.lower_tx_bytes - before_move.lower_tx_bytes > 500_000
    assert tl.samples[-1].shm_tx_bytes - after_first.shm_tx_bytes > 1_000_000
    budget = sum((r.downtime_ms or 0) / 20 for r in reports) + 2 * len(reports) + 10
    assert tl.ping_lost <= budget, (tl.ping_lost, budget, tl.lost_at)
    state = lvlab.state
    assert state.vms["vm2"].host == "A" and state.vms["vm2"].ivshmem
    # the domain lives on A again, and only there
    for host, there in (("A", True), ("B", False)):
        with libvirtd.connection(libvirtd.daemon(lvlab.sd, host)) as conn:
            assert ("vm2" in [dm.name() for dm in conn.listAllDomains(0)]) == there


def test_a_plug_refused_after_the_move_leaves_the_vm_on_the_destination(
        lvlab: Lab, tmp_path: Path) -> None:
    report = a_refused_plug_leaves_the_vm_on_the_destination(lvlab, tmp_path, "libvirt")
    numbers["refused_plug"] = {k: v for k, v in report.as_dict().items() if k != "events"}
    # libvirt ended the source domain itself: it is defined and active on B only
    for host, there in (("A", False), ("B", True)):
        with libvirtd.connection(libvirtd.daemon(lvlab.sd, host)) as conn:
            assert ("vm2" in [dm.name() for dm in conn.listAllDomains(0)]) == there
    lvlab.migrate("vm2", "B", "A")
    assert lvlab.state.vms["vm2"].ivshmem


def test_destination_libvirtd_killed_mid_way_keeps_the_source_on_shm(lvlab: Lab) -> None:
    """Last in the module: B's libvirtd is gone afterwards (down copes with it)."""
    dest = libvirtd.daemon(lvlab.sd, "B")
    (victim,) = libvirtd.daemons_of(dest)
    killed: list[float] = []

    def progress(phase: str, info: dict[str, Any]) -> None:
        if phase == "transfer" and float(info.get("mib", 0)) > 1 and not killed:
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(float(info["t"]))

    with lvlab.sd, pytest.raises(MigrationError, match="stays on A"):
        migrate.migrate(lvlab.sd, "vm2", "A", "B", max_bandwidth_mib=32, progress=progress)
    assert killed, "the migration ended before the destination's libvirtd was killed"
    vs = lvlab.state.vms["vm2"]
    assert vs.host == "A" and vs.proc is not None and vs.proc.alive() and vs.ivshmem
    with libvirtd.connection(libvirtd.daemon(lvlab.sd, "A")) as conn:
        dom = conn.lookupByName("vm2")
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    t = paths.wait_peer(lvlab.guest("vm1"), lvlab.topo.vm("vm2").mac, shm=True)
    numbers["rollback_shm_again_s"] = round(t, 2)
    lvlab.drop("vm2")
    assert lvlab.ping("vm2", lvlab.ip("vm1"), count=3) == 0
