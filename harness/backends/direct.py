"""The direct backend: the harness runs each VM's QEMU itself and speaks QMP to it.

A VM is a QEMU process in its host's namespace, launched from
``templates/qemu.j2``; its device is plugged and unplugged, and it is
migrated, through the monitor verbs of :mod:`harness.backends.qmp`.  A
migration destination is a new incarnation of the VM (the next
generation: its own QMP socket, console and PID file), started with
``-incoming defer`` and recorded as the VM once the migration completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from harness.backends import qmp
from harness.backends.base import Backend, begin_move, plug_command
from harness.errors import HarnessError, MigrationError, QemuBinaryError
from harness.lab import accel as accel_mod
from harness.lab import guest as guest_mod
from harness.lab import hostnet, qemu, vms
from harness.lab.state import ProcRecord, State, StateDir, VMState, VMStatus
from harness.lab.topology import VMSpec
from ivloop_libvirt.flow import Completed, Progress
from ivloop_libvirt.reports import MigrationReport

log = logging.getLogger(__name__)


def start_qemu(sd: StateDir, state: State, vm: VMSpec, *, ivshmem: bool = True,
               host: str | None = None, incoming: bool = False, generation: int = 0,
               memory: str | None = None, binary: qemu.Binary | None = None) -> VMState:
    """Launch one VM's QEMU on *host* (default: its topology host).

    With *incoming* the VM waits for a migration and is not recorded in
    *state* (the caller records it once the migration has succeeded).
    *memory* is the ``-m`` value, by default what this harness gives a new
    guest; a migration destination must repeat its source's RAM size.
    *binary* is the QEMU to run, by default the topology's (:func:`harness.lab.vms.qemu_for`).
    """
    binary = binary or vms.qemu_for(state)
    kernel, initrd, disk = vms.boot_files(sd, state, vm, incoming=incoming)
    pubkey = guest_mod.ensure_key(sd.key_path)
    choice = accel_mod.Choice(state.accel, "recorded")
    host = host or vm.host
    hs = state.hosts[host]
    # Each incarnation (a migration destination is a new one) has its own files.
    suffix = f"-g{generation}" if generation else ""
    vs = VMState(
        name=vm.name, host=host, status=VMStatus.BOOTING,
        qmp=str(sd.file(f"qmp-{vm.name}{suffix}.sock")),
        console=str(sd.file("logs", f"console-{vm.name}{suffix}.log")),
        ssh_port=vms.SSH_PORT_BASE + vm.index, tap=f"tap-{vm.name}"[:15],
        accel=state.accel, ivshmem=ivshmem and bool(hs.server_socket), generation=generation,
        qemu=binary.path, qemu_banner=binary.banner,
    )  # fmt: skip
    if not incoming:
        state.vms[vm.name] = vs
        sd.save(state)
    hostnet.add_tap(hs.netns, vs.tap, mtu=vm.mtu)
    pidfile = sd.file(f"qemu-{vm.name}{suffix}.pid")
    spec = qemu.LaunchSpec(
        vm=vm, kernel=kernel, initrd=initrd, accel_args=choice.qemu_args_for(binary),
        memory=memory or choice.memory_arg(vm.memory, binary), console=Path(vs.console),
        qmp=Path(vs.qmp), pidfile=pidfile, tap=vs.tap,
        ssh_port=vs.ssh_port, ssh_key=pubkey,
        ivshmem_socket=Path(hs.server_socket) if vs.ivshmem else None, incoming=incoming,
        lower_only=not vms.driver_for(state, vm), vhost_net=state.vhost_net,
        binary=binary.path, disk=disk,
    )  # fmt: skip
    for stale in (Path(vs.qmp), pidfile):
        stale.unlink(missing_ok=True)
    pid = qemu.launch(qemu.render(spec), hs.netns, sd.file("logs", f"qemu-{vm.name}{suffix}.log"),
                      pidfile)
    vs.proc = ProcRecord.of(pid)
    if not incoming:
        sd.save(state)
    log.info("%s: QEMU %s pid %d on host %s", vm.name, binary.version, pid, host)
    return vs


class DirectBackend(Backend):
    name = "qemu"
    restarts = True

    def start_vm(self, sd: StateDir, state: State, vm: VMSpec, *, ivshmem: bool,
                 binary: qemu.Binary) -> VMState:
        return start_qemu(sd, state, vm, ivshmem=ivshmem, binary=binary)

    def set_ivshmem(self, sd: StateDir, state: State, vs: VMState, attached: bool) -> None:
        server = state.hosts[vs.host].server_socket

        async def go() -> None:
            async with qemu.Monitor(Path(vs.qmp)) as mon:
                if attached:
                    await qmp.plug_ivshmem(mon, server)
                else:
                    await qmp.unplug_ivshmem(mon, vs)
        asyncio.run(go())

    @contextlib.contextmanager
    def moving(self, sd: StateDir, state: State, vm: str, source: str, dest: str, *,
               max_bandwidth_mib: int | None, qemu_path: str | None) -> Iterator[DirectMove]:
        yield DirectMove(sd, state, vm, source, dest, max_bandwidth_mib=max_bandwidth_mib,
                         qemu_path=qemu_path)

    def restart_vm(self, sd: StateDir, state: State, name: str, timeout: float) -> VMState:
        spec = vms.topology_of(state).vm(name)
        old = state.vms.get(name)
        host = old.host if old else spec.host
        if old is not None:
            if old.proc is not None:
                qemu.terminate(old.proc)
            with contextlib.suppress(HarnessError):
                hostnet.remove_link(state.hosts[host].netns, old.tap)  # added again below
        vs = start_qemu(sd, state, spec, host=host,
                        generation=(old.generation + 1) if old is not None else 0)
        vms.wait_ssh(sd, state, name, timeout=timeout)
        return vs

    def replug(self, sd: StateDir, state: State, vs: VMState, server: str) -> None:
        async def go() -> None:
            async with qemu.Monitor(Path(vs.qmp)) as mon:
                await qmp.unplug_ivshmem(mon, vs)
                await qmp.plug_ivshmem(mon, server)
        asyncio.run(go())


# ---------------------------------------------------------------------------
# migration


def destination_qemu(state: State, vs: VMState,
                     qemu_path: str | None = None) -> qemu.Binary:
    """The QEMU to start *vs*'s destination from, refused unless it is the source's.

    QEMU migrates between equal versions only where both ends agree on the
    machine type and every device's state; the harness does not try mixes.
    *qemu_path* (``harness migrate --qemu``) asks for a binary, by default the
    topology's, probed again (it may have been replaced since `harness up`).
    """
    want = qemu.probe(qemu_path) if qemu_path is not None else vms.qemu_for(state)
    have = vms.vm_qemu(vs)
    if have is None:
        log.warning("%s: its QEMU is not recorded (booted by an older harness); assuming %s",
                    vs.name, want.banner)
        return want
    if (os.path.realpath(want.path), want.banner) != (os.path.realpath(have.path), have.banner):
        if want.path == have.path:
            said = f"{want.path} is now {want.version}"
            fix = f"'harness restart {vs.name}' boots it on the new one"
        else:
            said = f"the destination would run QEMU {want.version} ({want.path})"
            fix = "without --qemu the destination runs the VM's own"
        raise QemuBinaryError(
            f"{vs.name} runs QEMU {have.version} ({have.path}) and {said}: a migration needs "
            f"the same QEMU on both ends ({fix})")
    return want


async def source_memory(src: qemu.Monitor, vs: VMState) -> str:
    """The ``-m`` value that repeats the source's RAM size, which QEMU requires.

    Asked of the source itself, so a VM booted by another harness version
    (before the TCG padding, say) still moves.
    """
    ram = await qmp.ram_bytes(src)
    if accel_mod.Choice(vs.accel, "recorded").loses_migration_writes(ram, vms.vm_qemu(vs)):
        log.warning("%s: its %d KiB of RAM is not padded (booted by an older harness?), so "
                    "TCG migration in QEMU before 9.0 may lose its writes: `harness down && "
                    "harness up` gives it the padded size", vs.name, ram // 1024)
    return f"{ram // 1024}K"


class DirectMove:
    """:class:`ivloop_libvirt.flow.Mover` for a VM whose QEMU the harness runs.

    The migration stream runs over a UNIX socket in the state directory
    (the host namespaces have no addresses of their own).
    """

    def __init__(self, sd: StateDir, state: State, vm: str, source: str, dest: str, *,
                 max_bandwidth_mib: int | None, qemu_path: str | None) -> None:
        self.sd = sd
        self.state = state
        self.vs = state.vms[vm]
        self.spec = vms.topology_of(state).vm(vm)
        self.dest = dest
        self.max_bandwidth_mib = max_bandwidth_mib
        self.qemu_path = qemu_path
        self.binary: qemu.Binary | None = None
        self.report = MigrationReport(
            vm=vm, source=source, destination=dest, backend=DirectBackend.name,
            source_socket=state.hosts[source].server_socket or None,
            dest_socket=state.hosts[dest].server_socket or None)
        self.mig_sock = sd.file(f"migrate-{vm}.sock")
        self.dest_vs: VMState | None = None
        self.unplugged = False
        self.completed = False

    def check(self) -> None:
        self.binary = destination_qemu(self.state, self.vs, self.qemu_path)
        begin_move(self.sd, self.state, self.vs, self.mig_sock)

    def has_device(self) -> bool:
        return self.vs.ivshmem

    def unplug(self) -> None:
        async def go() -> None:
            async with qemu.Monitor(Path(self.vs.qmp)) as src:
                await qmp.unplug_ivshmem(src, self.vs)
        asyncio.run(go())
        self.unplugged = True
        self.vs.ivshmem = False
        self.sd.save(self.state)

    def prepare(self) -> None:
        async def ram() -> str:
            async with qemu.Monitor(Path(self.vs.qmp)) as src:
                return await source_memory(src, self.vs)
        memory = asyncio.run(ram())
        self.dest_vs = start_qemu(
            self.sd, self.state, self.spec, ivshmem=False, host=self.dest, incoming=True,
            generation=self.vs.generation + 1, memory=memory, binary=self.binary)

    def migrate(self, timeout: float, say: Progress, t0: float) -> Completed:
        assert self.dest_vs is not None
        dest_vs = self.dest_vs

        async def go() -> Completed:
            uri = f"unix:{self.mig_sock}"
            async with qemu.Monitor(Path(self.vs.qmp)) as src, \
                    qemu.Monitor(Path(dest_vs.qmp)) as dst:
                await qmp.set_up_migration(src, dst, uri, self.max_bandwidth_mib)
                with src.listener("MIGRATION") as listener:
                    await src.cmd("migrate", {"uri": uri})
                    result = await qmp.wait_migration(src, listener, timeout, say, t0)
                if result["status"] != "completed":
                    raise MigrationError(f"migration {result['status']}: "
                                         f"{result.get('error-desc', 'no reason given')}")
                self.completed = True
                info = await qmp.completed_stats(src)
                await qmp.resume(dst)
            ram = info.get("ram", {})
            return Completed(downtime_ms=info.get("downtime"),
                             transferred_mib=ram.get("transferred", 0) / 2**20,
                             job_ms=info.get("total-time"), setup_ms=info.get("setup-time"))
        try:
            return asyncio.run(go())
        finally:
            if self.completed:
                self._record_destination()

    def _record_destination(self) -> None:
        """The destination is the VM from the moment the migration completed."""
        assert self.dest_vs is not None
        if self.state.vms.get(self.vs.name) is not self.dest_vs:
            self.dest_vs.status = VMStatus.RUNNING
            self.state.vms[self.vs.name] = self.dest_vs
            self.sd.save(self.state)

    def landed(self) -> bool:
        if self.completed:
            self._record_destination()
        return self.completed

    def plug(self) -> None:
        assert self.dest_vs is not None
        dest_vs = self.dest_vs
        server = self.state.hosts[self.dest].server_socket

        async def go() -> None:
            async with qemu.Monitor(Path(dest_vs.qmp)) as dst:
                await qmp.plug_ivshmem(dst, server)
        asyncio.run(go())
        dest_vs.ivshmem = True
        self.sd.save(self.state)

    def finish(self) -> None:
        """Stop the source's QEMU (paused since the migration completed)."""
        if self.vs.proc is not None:
            qemu.terminate(self.vs.proc)
        with contextlib.suppress(HarnessError):
            hostnet.remove_link(self.state.hosts[self.report.source].netns, self.vs.tap)
        Path(self.vs.qmp).unlink(missing_ok=True)
        self.mig_sock.unlink(missing_ok=True)

    def plug_command(self) -> str:
        return plug_command(self.dest, self.vs.name)

    def roll_back(self) -> str:
        """Destination gone; source running with its device back, or what to run."""
        vs, dest_vs = self.vs, self.dest_vs
        self.mig_sock.unlink(missing_ok=True)
        if dest_vs is not None:
            if dest_vs.proc is not None:
                qemu.terminate(dest_vs.proc)
            Path(dest_vs.qmp).unlink(missing_ok=True)
            with contextlib.suppress(HarnessError):
                hostnet.remove_link(self.state.hosts[dest_vs.host].netns, dest_vs.tap)
            self.sd.file(f"qemu-{vs.name}-g{dest_vs.generation}.pid").unlink(missing_ok=True)
        server = self.state.hosts[vs.host].server_socket

        async def resume() -> None:
            async with qemu.Monitor(Path(vs.qmp)) as src:
                await qmp.cancel_migration(src)
                await qmp.resume(src)
                if self.unplugged and server:
                    await qmp.plug_ivshmem(src, server)
                    vs.ivshmem = True
        hint = ""
        try:
            asyncio.run(resume())
        except (HarnessError, OSError, EOFError) as exc:
            alive = vs.proc is not None and vs.proc.alive()
            hint = (f"{vs.name} runs on {vs.host} without shared memory ({exc}): "
                    f"harness plug {vs.name}" if alive else
                    f"{vs.name}'s QEMU is gone ({exc}): harness restart {vs.name}")
        finally:
            vs.status = VMStatus.RUNNING if vs.proc and vs.proc.alive() else VMStatus.DOWN
            self.state.vms[vs.name] = vs
            self.sd.save(self.state)
        return hint
