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
from collections.abc import Iterator
from pathlib import Path

import libvirt

from harness.backends import domain, libvirtd
from harness.backends.base import Backend, begin_move, plug_command
from harness.backends.libvirtd import LibvirtError
from harness.errors import HarnessError, LaunchError, StateError
from harness.lab import accel as accel_mod
from harness.lab import guest as guest_mod
from harness.lab import hostnet, qemu, vms
from harness.lab.state import ProcRecord, State, StateDir, VMState, VMStatus
from harness.lab.topology import VMSpec
from ivloop_libvirt import lv, plug
from ivloop_libvirt import migrate as lv_migrate
from ivloop_libvirt.errors import IvloopLibvirtError
from ivloop_libvirt.flow import Completed, Progress
from ivloop_libvirt.shmem import PC_SLOT, PciAddress

log = logging.getLogger(__name__)

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
    kernel, initrd, disk = vms.boot_files(sd, state, vm, incoming=False)
    choice = accel_mod.Choice(state.accel, "recorded")
    hs = state.hosts[vs.host]
    return qemu.LaunchSpec(
        vm=vm, kernel=kernel, initrd=initrd, accel_args=choice.qemu_args_for(binary),
        memory=choice.memory_arg(vm.memory, binary), console=Path(vs.console),
        # libvirt owns the monitor and the PID file: domain.py drops these two
        qmp=sd.file(f"qmp-{vm.name}.sock"), pidfile=sd.file(f"qemu-{vm.name}.pid"),
        tap=vs.tap, ssh_port=vs.ssh_port, ssh_key=guest_mod.ensure_key(sd.key_path),
        ivshmem_socket=Path(hs.server_socket) if vs.ivshmem else None,
        lower_only=not vms.driver_for(state, vm), vhost_net=state.vhost_net,
        binary=binary.path, disk=disk,
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

    Recorded before it starts, like the direct backend's VMs; returns once
    QEMU runs (:func:`harness.lab.vms.wait_ssh` waits for the guest).
    """
    binary = binary or vms.qemu_for(state)
    hs = state.hosts[vm.host]
    vs = VMState(
        name=vm.name, host=vm.host, status=VMStatus.BOOTING, qmp="",
        console=str(sd.file("logs", f"console-{vm.name}.log")),
        ssh_port=vms.SSH_PORT_BASE + vm.index, tap=f"tap-{vm.name}"[:15],
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


def set_ivshmem(sd: StateDir, state: State, vs: VMState, attached: bool) -> None:
    """Plug (at 00:05, on the host's server) or unplug *vs*'s device through ivloop_libvirt."""
    with libvirtd.connection(libvirtd.daemon(sd, vs.host)) as conn:
        try:
            dom = lv.lookup(conn, vs.name)
            if attached:
                plug.plug(dom, state.hosts[vs.host].server_socket,
                          address=PciAddress(bus=0, slot=PC_SLOT))
            else:
                # ivloop_libvirt parks the fd numbers the unplug freed (QEMU
                # 7.2's stale TCG handlers; see ivloop_libvirt.fdpark)
                plug.unplug(dom)
                vs.unplugs += 1
        except IvloopLibvirtError as exc:
            raise LibvirtError(str(exc)) from exc


# ---------------------------------------------------------------------------
# migration


class HarnessLibvirtMove(lv_migrate.LibvirtMove):
    """ivloop_libvirt's move of a domain, plus what the harness owns around it.

    The destination's tap exists before the move (libvirt opens it by name,
    ``managed='no'``) and goes again on a roll back; the state records the
    domain's new QEMU on the destination as soon as the migration completed.
    """

    def __init__(self, sd: StateDir, state: State, vm: str, source: str, dest: str, *,
                 sconn: lv.Connection, dconn: lv.Connection,
                 max_bandwidth_mib: int | None) -> None:
        self.sd = sd
        self.state = state
        self.vs = state.vms[vm]
        self.spec = vms.topology_of(state).vm(vm)
        self.dest = dest
        self.mig_sock = sd.file(f"migrate-{vm}.sock")
        super().__init__(lv.lookup(sconn, vm), dconn, migrate_uri=f"unix://{self.mig_sock}",
                         dest_socket=state.hosts[dest].server_socket or None,
                         max_bandwidth_mib=max_bandwidth_mib)
        # the harness's names for the hosts, not the daemons' URIs
        self.report.source, self.report.destination = source, dest
        self.recorded = False

    def check(self) -> None:
        super().check()
        begin_move(self.sd, self.state, self.vs, self.mig_sock)

    def prepare(self) -> None:
        ns = self.state.hosts[self.dest].netns
        with contextlib.suppress(HarnessError):
            hostnet.remove_link(ns, self.vs.tap)  # a stale one from an aborted attempt
        hostnet.add_tap(ns, self.vs.tap, mtu=self.spec.mtu)

    def migrate(self, timeout: float, say: Progress, t0: float) -> Completed:
        done = super().migrate(timeout, say, t0)
        self._record_destination()
        return done

    def landed(self) -> bool:
        if not super().landed():
            return False
        self._record_destination()
        return True

    def _record_destination(self) -> None:
        if self.recorded:
            return
        vs = self.vs
        new = VMState(
            name=vs.name, host=self.dest, status=VMStatus.RUNNING, qmp="", console=vs.console,
            ssh_port=vs.ssh_port, tap=vs.tap, accel=vs.accel, ivshmem=False,
            generation=vs.generation + 1, qemu=vs.qemu, qemu_banner=vs.qemu_banner,
        )  # fmt: skip
        new.proc = qemu_proc(libvirtd.daemon(self.sd, self.dest), vs.name,
                             self.state.hosts[self.dest].netns)
        self.state.vms[vs.name] = new
        self.sd.save(self.state)
        self.recorded = True

    def plug(self) -> None:
        super().plug()
        self.state.vms[self.vs.name].ivshmem = True
        self.sd.save(self.state)

    def finish(self) -> None:
        with contextlib.suppress(HarnessError):
            hostnet.remove_link(self.state.hosts[self.vs.host].netns, self.vs.tap)
        self.mig_sock.unlink(missing_ok=True)

    def plug_command(self) -> str:
        return plug_command(self.dest, self.vs.name)

    def roll_back(self) -> str:
        hint = super().roll_back()
        with contextlib.suppress(HarnessError):
            hostnet.remove_link(self.state.hosts[self.dest].netns, self.vs.tap)
        self.mig_sock.unlink(missing_ok=True)
        vs = self.vs
        vs.status = VMStatus.RUNNING if vs.proc and vs.proc.alive() else VMStatus.DOWN
        if hint:
            vs.ivshmem = False
        self.sd.save(self.state)
        return hint


class LibvirtBackend(Backend):
    name = "libvirt"

    def start_hosts(self, sd: StateDir, state: State) -> None:
        start_daemons(sd, state)

    def start_vm(self, sd: StateDir, state: State, vm: VMSpec, *, ivshmem: bool,
                 binary: qemu.Binary) -> VMState:
        return up_vm(sd, state, vm, ivshmem=ivshmem, binary=binary)

    def set_ivshmem(self, sd: StateDir, state: State, vs: VMState, attached: bool) -> None:
        set_ivshmem(sd, state, vs, attached)

    @contextlib.contextmanager
    def moving(self, sd: StateDir, state: State, vm: str, source: str, dest: str, *,
               max_bandwidth_mib: int | None,
               qemu_path: str | None) -> Iterator[HarnessLibvirtMove]:
        if qemu_path is not None:
            raise StateError("--qemu is for the qemu backend: libvirt starts the "
                             "destination from the domain's own emulator")
        with libvirtd.connection(libvirtd.daemon(sd, source)) as sconn, \
                libvirtd.connection(libvirtd.daemon(sd, dest)) as dconn:
            yield HarnessLibvirtMove(sd, state, vm, source, dest, sconn=sconn, dconn=dconn,
                                     max_bandwidth_mib=max_bandwidth_mib)

    def down(self, sd: StateDir) -> list[str]:
        return down(sd)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
