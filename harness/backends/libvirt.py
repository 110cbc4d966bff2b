"""The libvirt backend: each simulated host runs its own libvirtd, VMs are domains.

The topology, the state directory, the host namespaces, wires and
ivloop-servers are the direct backend's (:mod:`harness.cluster`); what
differs is who runs QEMU:

- every host gets a real libvirtd in its namespace (:mod:`harness.backends.libvirtd`),
  started before the VMs and stopped by :func:`down` (also after a crash:
  the daemons are found by their directories in the state directory);
- a VM is a persistent libvirt domain whose XML is the direct backend's
  QEMU command line translated (:mod:`harness.backends.domain`), so PCI layout, MACs,
  kernel, initrd, serial log and the SSH forward are the same, and
  ``status``, ``ssh``, ``exec``, ``watch`` and ``bench`` work unchanged (the
  recorded process is the domain's QEMU);
- a topology's MTU needs nothing of libvirt: the harness makes each tap
  with it (``managed='no'``: libvirt opens the tap as it is and never
  changes its MTU) and the guest reads it from its kernel command line
  (``ivl.mtu``), which the domain carries word for word;
- plug, unplug and migrate go through :mod:`ivloop_libvirt` (what
  ``ivloop-libvirt`` runs), with the harness's own path-switch
  measurements hooked in, and give the report ``harness migrate`` prints.
  The migration stream uses a UNIX socket in the state directory, as the
  direct backend does: the host namespaces have no addresses of their own.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from harness import cluster
from harness import migrate as migrate_mod
from harness.backends import domain, libvirtd
from harness.backends.libvirtd import LibvirtError
from harness.errors import HarnessError, LaunchError, MigrationError, StateError
from harness.lab import accel as accel_mod
from harness.lab import guest as guest_mod
from harness.lab import hostnet, qemu
from harness.lab.state import ProcRecord, State, StateDir, VMState, VMStatus
from harness.lab.topology import VMSpec
from ivloop_libvirt import lv, plug
from ivloop_libvirt import migrate as lv_migrate
from ivloop_libvirt.errors import IncompleteMigrationError, IvloopLibvirtError
from ivloop_libvirt.errors import MigrationError as LvMigrationError
from ivloop_libvirt.shmem import PC_SLOT, PciAddress

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]


def in_use(sd: StateDir) -> bool:
    """Whether *sd*'s topology runs on libvirt (its hosts have daemon directories)."""
    return bool(libvirtd.daemons_in(sd))


# ---------------------------------------------------------------------------
# hosts


def start_daemons(sd: StateDir, state: State, hosts: list[str] | None = None) -> dict[str, float]:
    """Start the libvirtd of each host (all of them by default); seconds each took.

    They start together: each spends ~8 s probing QEMU before it answers.
    A daemon's directory exists before it starts and its PID is recorded as
    soon as it runs, so :func:`down` finds it whatever happens next.
    """
    names = list(state.hosts) if hosts is None else hosts
    daemons = {h: libvirtd.daemon(sd, h) for h in names}
    logs = {h: sd.file("logs", f"libvirtd-{h}.log") for h in names}
    recs: dict[str, ProcRecord] = {}
    took: dict[str, float] = {}
    try:
        for h, d in daemons.items():
            libvirtd.prepare(d, libvirtd.host_uuid(sd.instance, h))
            recs[h] = libvirtd.spawn(d, state.hosts[h].netns, logs[h])
        for h, d in daemons.items():
            took[h] = libvirtd.wait_ready(d, recs[h], logs[h])
            log.info("libvirtd of %s ready in %.1f s (%s)", h, took[h], d.uri)
    except BaseException:
        for h, d in daemons.items():
            libvirtd.stop(d, state.hosts[h].netns)
        raise
    return took


def uri(sd: StateDir, host: str) -> str:
    """The libvirt URI of *host*'s daemon (for virsh -c and ivloop-libvirt --connect)."""
    return libvirtd.daemon(sd, host).uri


def down(sd: StateDir) -> list[str]:
    """Destroy every domain and stop every libvirtd of *sd*; remove their files.

    Must run before the host namespaces go (the QEMUs are checked against
    them).  Finds the daemons by their directories, so it needs no state file.
    """
    removed: list[str] = []
    for d in libvirtd.daemons_in(sd):
        removed += libvirtd.stop(d, sd.netns_name(d.host))
    return removed


# ---------------------------------------------------------------------------
# VMs


def launch_spec(sd: StateDir, state: State, vm: VMSpec, vs: VMState,
                binary: qemu.Binary) -> qemu.LaunchSpec:
    """What the direct backend would run for *vs*; the domain is made from it."""
    kernel, initrd, disk = cluster.boot_files(sd, state, vm, incoming=False)
    choice = accel_mod.Choice(state.accel, "recorded")
    hs = state.hosts[vs.host]
    return qemu.LaunchSpec(
        vm=vm, kernel=kernel, initrd=initrd, accel_args=choice.qemu_args_for(binary),
        memory=choice.memory_arg(vm.memory, binary), console=Path(vs.console),
        # libvirt owns the monitor and the PID file: domain.py drops these two
        qmp=sd.file(f"qmp-{vm.name}.sock"), pidfile=sd.file(f"qemu-{vm.name}.pid"),
        tap=vs.tap, ssh_port=vs.ssh_port, ssh_key=guest_mod.ensure_key(sd.key_path),
        ivshmem_socket=Path(hs.server_socket) if vs.ivshmem else None,
        lower_only=not cluster.driver_for(state, vm), binary=binary.path, disk=disk,
    )  # fmt: skip


def domain_xml(sd: StateDir, state: State, vm: VMSpec, vs: VMState,
               binary: qemu.Binary) -> str:
    return domain.render(launch_spec(sd, state, vm, vs, binary),
                         uuid_=domain.domain_uuid(sd.instance, vm.name),
                         title=f"ivloop harness VM {vm.name} (state {sd.path})")


def qemu_proc(d: libvirtd.Daemon, name: str, netns: str) -> ProcRecord:
    """The QEMU process of running domain *name* on *d*."""
    for dom, rec in libvirtd.qemu_of(d, netns):
        if dom == name:
            return rec
    raise StateError(f"libvirtd of {d.host} runs no QEMU for domain {name} "
                     f"(no live PID file in {d.dir('run') / 'qemu'}); see {d.domain_log(name)}")


def up_vm(sd: StateDir, state: State, vm: VMSpec, *, ivshmem: bool = True,
          binary: qemu.Binary | None = None) -> VMState:
    """Define and start *vm* as a persistent domain on its host's libvirtd.

    Recorded before it starts, like :func:`cluster.start_vm`; returns once
    QEMU runs (:func:`cluster.wait_ssh` waits for the guest).
    """
    binary = binary or cluster.qemu_for(state)
    hs = state.hosts[vm.host]
    vs = VMState(
        name=vm.name, host=vm.host, status=VMStatus.BOOTING, qmp="",
        console=str(sd.file("logs", f"console-{vm.name}.log")),
        ssh_port=cluster.SSH_PORT_BASE + vm.index, tap=f"tap-{vm.name}"[:15],
        accel=state.accel, ivshmem=ivshmem and bool(hs.server_socket),
        qemu=binary.path, qemu_banner=binary.banner,
    )  # fmt: skip
    state.vms[vm.name] = vs
    sd.save(state)
    hostnet.add_tap(hs.netns, vs.tap, mtu=vm.mtu)
    xml = domain_xml(sd, state, vm, vs, binary)
    Path(vs.console).unlink(missing_ok=True)  # the serial appends: a new boot, a new log
    d = libvirtd.daemon(sd, vm.host)
    with libvirtd.connection(d) as conn:
        try:
            dom = conn.defineXML(xml)
            dom.create()
        except libvirt.libvirtError as exc:
            raise LaunchError(f"libvirtd of {vm.host} did not start domain {vm.name}: "
                              f"{exc.get_error_message()}", [d.uri, "create", vm.name], None,
                              _tail(d.domain_log(vm.name))) from exc
    vs.proc = qemu_proc(d, vm.name, hs.netns)
    sd.save(state)
    log.info("%s: domain started on %s, QEMU pid %d", vm.name, vm.host, vs.proc.pid)
    return vs


# ---------------------------------------------------------------------------
# ivshmem


def set_ivshmem(sd: StateDir, name: str, attached: bool) -> None:
    """:func:`cluster.set_ivshmem` through ivloop_libvirt (plug at 00:05, unplug live)."""
    state = sd.load()
    cluster.topology_of(state).vm(name)
    vs = state.vms.get(name)
    if vs is None or vs.proc is None or not vs.proc.alive():
        raise StateError(f"VM {name} is down")
    if vs.ivshmem == attached:
        raise StateError(f"{name}'s ivshmem device is already "
                         f"{'attached' if attached else 'detached'}")
    server = state.hosts[vs.host].server_socket
    if attached and not server:
        raise StateError(f"host {vs.host} runs no ivloop-server")
    with libvirtd.connection(libvirtd.daemon(sd, vs.host)) as conn:
        try:
            dom = lv.lookup(conn, name)
            if attached:
                plug.plug(dom, server, address=PciAddress(bus=0, slot=PC_SLOT))
            else:
                # ivloop_libvirt parks the fd numbers the unplug freed (QEMU
                # 7.2's stale TCG handlers; see ivloop_libvirt.fdpark)
                plug.unplug(dom)
                vs.unplugs += 1
        except IvloopLibvirtError as exc:
            raise LibvirtError(str(exc)) from exc
    vs.ivshmem = attached
    sd.save(state)


# ---------------------------------------------------------------------------
# migration


def migrate(sd: StateDir, vm: str | None, source: str, dest: str, *,
            timeout: float = 120, max_bandwidth_mib: int | None = None,
            progress: Progress | None = None) -> migrate_mod.Report:
    """:func:`harness.migrate.migrate` through :func:`ivloop_libvirt.migrate.migrate`.

    The destination's tap exists before the move (libvirt opens it by name);
    on failure ivloop_libvirt has kept (or restored) the source and this
    removes the destination's tap again.  Raises :class:`MigrationError`.
    """
    state = sd.load()
    topo = cluster.topology_of(state)
    vm = vm or migrate_mod.pick_vm(state, source)
    vs = migrate_mod.validate(state, vm, source, dest)
    spec = topo.vm(vm)
    say: Progress = progress or (lambda phase, info: None)
    src_ns, dst_ns = state.hosts[source].netns, state.hosts[dest].netns
    mig_sock = sd.file(f"migrate-{vm}.sock")
    mig_sock.unlink(missing_ok=True)
    vs.status = VMStatus.MIGRATING
    sd.save(state)
    src_peers = migrate_mod._SwitchObserver(sd, state, source, vm, spec.mac)
    dst_peers = migrate_mod._SwitchObserver(sd, state, dest, vm, spec.mac)
    report = migrate_mod.Report(vm=vm, source=source, destination=dest)
    t0 = time.monotonic()
    moved = False
    try:
        with contextlib.suppress(HarnessError):
            hostnet.remove_link(dst_ns, vs.tap)  # a stale one from an aborted attempt
        hostnet.add_tap(dst_ns, vs.tap, mtu=spec.mtu)
        with libvirtd.connection(libvirtd.daemon(sd, source)) as sconn, \
                libvirtd.connection(libvirtd.daemon(sd, dest)) as dconn:
            dom = lv.lookup(sconn, vm)
            try:
                rep = lv_migrate.migrate(
                    dom, dconn, migrate_uri=f"unix://{mig_sock}",
                    dest_socket=state.hosts[dest].server_socket or None,
                    timeout=timeout, max_bandwidth_mib=max_bandwidth_mib, progress=say,
                    switch_source=lambda _dom, since: src_peers.wait(False, since),
                    switch_dest=lambda _dom, since: dst_peers.wait(True, since))
            except IncompleteMigrationError as exc:
                _copy(exc.report, report)
                moved = exc.report.failed_phase == "plug"
                raise MigrationError(str(exc)) from exc
            except LvMigrationError as exc:
                _copy(exc.report, report)
                raise MigrationError(f"{vm} stays on {source}: {exc}") from exc
            except IvloopLibvirtError as exc:
                raise MigrationError(f"{vm} stays on {source}: {exc}") from exc
        _copy(rep, report)
        moved = True
    except BaseException as exc:
        report.error = report.error or str(exc) or exc.__class__.__name__
        if not moved:
            with contextlib.suppress(HarnessError):
                hostnet.remove_link(dst_ns, vs.tap)
            vs.status = VMStatus.RUNNING if vs.proc and vs.proc.alive() else VMStatus.DOWN
            src_failed = getattr(getattr(exc.__cause__, "report", None), "source_restored", None)
            if src_failed is False:
                vs.ivshmem = False
            sd.save(state)
            raise
        # moved, but without its device on the destination: record where it runs
        _record_moved(sd, state, vs, dest, plugged=False)
        with contextlib.suppress(HarnessError):
            hostnet.remove_link(src_ns, vs.tap)
        raise
    finally:
        src_peers.close()
        dst_peers.close()
        mig_sock.unlink(missing_ok=True)
    _record_moved(sd, state, vs, dest, plugged=bool(rep.dest_socket and rep.plug_s))
    with contextlib.suppress(HarnessError):
        hostnet.remove_link(src_ns, vs.tap)
    report.ok = True
    report.events.append((round(time.monotonic() - t0, 3), "source stopped"))
    return report


def _record_moved(sd: StateDir, state: State, vs: VMState, dest: str, *, plugged: bool) -> None:
    new = VMState(
        name=vs.name, host=dest, status=VMStatus.RUNNING, qmp="", console=vs.console,
        ssh_port=vs.ssh_port, tap=vs.tap, accel=vs.accel, ivshmem=plugged,
        generation=vs.generation + 1, qemu=vs.qemu, qemu_banner=vs.qemu_banner,
    )  # fmt: skip
    new.proc = qemu_proc(libvirtd.daemon(sd, dest), vs.name, state.hosts[dest].netns)
    state.vms[vs.name] = new
    sd.save(state)


def _copy(src: lv_migrate.MigrationReport, dst: migrate_mod.Report) -> None:
    """ivloop_libvirt's report into the harness's (same phases and timings)."""
    dst.ok = src.ok
    dst.error = src.error + (f" ({src.hint})" if src.hint else "")
    dst.total_s = (src.job_ms / 1000) if src.job_ms else src.total_s
    dst.unplug_s = src.unplug_s
    dst.dest_start_s = (src.setup_ms / 1000) if src.setup_ms else 0.0
    dst.migrate_s = src.migrate_s
    dst.plug_s = src.plug_s
    dst.downtime_ms = src.downtime_ms
    dst.transferred_mib = src.transferred_mib
    dst.switch_source_s = src.switch_source_s
    dst.switch_dest_s = src.switch_dest_s
    dst.events = list(src.events)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
