"""Live migration between simulated hosts, with the shared path switched.

QEMU refuses to migrate a peer-mode ivshmem device, and the region means
nothing on another host, so the device leaves first and a new one joins
after the move (as net_failover handles a VF):

1. ``device_del`` ivshmem on the source, wait for ``DEVICE_DELETED``;
2. start the destination QEMU in the target host with ``-incoming defer``;
3. ``migrate`` over a UNIX socket, wait for the ``MIGRATION`` event;
4. ``chardev-add`` + ``device_add`` a new ivshmem on the destination;
5. stop the source.

Any failure before step 4 cancels the migration, resumes the source, plugs
its ivshmem back and removes the destination: nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import cluster
from harness.errors import HarnessError, MigrationError, QemuBinaryError, StateError
from harness.lab import accel as accel_mod
from harness.lab import hostnet, paths, qemu
from harness.lab.guest import Guest
from harness.lab.state import State, StateDir, VMState, VMStatus

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]
DEFAULT_BANDWIDTH_MIB = 128  # QEMU's own default


@dataclass
class Report:
    vm: str
    source: str
    destination: str
    ok: bool = False
    error: str = ""
    total_s: float = 0.0
    unplug_s: float = 0.0
    dest_start_s: float = 0.0
    migrate_s: float = 0.0
    plug_s: float = 0.0
    downtime_ms: float | None = None
    transferred_mib: float = 0.0
    # Seconds from the start of unplug (source) / plug (destination) until
    # every co-resident peer's driver routes the VM's MAC on the new path.
    switch_source_s: float | None = None
    switch_dest_s: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_vm(state: State, source: str) -> str:
    """The VM to move when none was named: the one mobile VM on *source*."""
    topo = cluster.topology_of(state)
    mobile = [vm.name for vm in topo.vms.values()
              if vm.mobile and vm.name in state.vms and state.vms[vm.name].host == source]
    if len(mobile) != 1:
        raise StateError(
            f"name the VM to migrate: host {source} has {len(mobile)} VMs marked mobile"
            + (f" ({', '.join(mobile)})" if mobile else "")
        )
    return mobile[0]


def validate(state: State, vm: str, source: str, dest: str) -> VMState:
    """Refuse a bad request before anything changes."""
    topo = cluster.topology_of(state)
    topo.vm(vm)
    topo.host(source)
    topo.host(dest)
    if source == dest:
        raise StateError(f"--from and --to are both {source}; nothing to migrate")
    vs = state.vms.get(vm)
    if vs is None or vs.proc is None or not vs.proc.alive():
        raise StateError(f"VM {vm} is down")
    if vs.status != VMStatus.RUNNING:
        raise StateError(f"VM {vm} is {vs.status.value}, not running")
    if vs.host != source:
        raise StateError(f"VM {vm} runs on host {vs.host}, not {source}")
    return vs


def destination_qemu(state: State, vs: VMState,
                     qemu_path: str | None = None) -> qemu.Binary:
    """The QEMU to start *vs*'s destination from, refused unless it is the source's.

    QEMU migrates between equal versions only where both ends agree on the
    machine type and every device's state; the harness does not try mixes.
    *qemu_path* (``harness migrate --qemu``) asks for a binary, by default the
    topology's, probed again (it may have been replaced since `harness up`).
    """
    want = qemu.probe(qemu_path) if qemu_path is not None else cluster.qemu_for(state)
    have = cluster.vm_qemu(vs)
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
    ram = (await src.cmd("query-memory-size-summary"))["base-memory"]
    if accel_mod.Choice(vs.accel, "recorded").loses_migration_writes(ram, cluster.vm_qemu(vs)):
        log.warning("%s: its %d KiB of RAM is not padded (booted by an older harness?), so "
                    "TCG migration in QEMU before 9.0 may lose its writes: `harness down && "
                    "harness up` gives it the padded size", vs.name, ram // 1024)
    return f"{ram // 1024}K"


async def _wait_migration(src: qemu.Monitor, listener: Any, timeout: float,
                          progress: Progress, t0: float) -> dict[str, Any]:
    """Wait for the source's MIGRATION event to say completed or failed."""
    deadline = time.monotonic() + timeout
    status = "setup"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MigrationError(f"migration did not complete within {timeout:.0f} s")
        try:
            event = await src.wait_event(listener, min(left, 0.5))
            status = str(event["data"]["status"])
            progress("migration", {"status": status, "t": time.monotonic() - t0})
        except HarnessError:
            pass  # no event in this slice: report progress below
        if status in ("completed", "failed", "cancelled"):
            info: dict[str, Any] = await src.cmd("query-migrate")
            return {"status": status, **info}
        with contextlib.suppress(HarnessError):
            info = await src.cmd("query-migrate", timeout=5)
            ram = info.get("ram", {})
            progress("transfer", {"status": info.get("status", status),
                                  "mib": ram.get("transferred", 0) / 2**20,
                                  "t": time.monotonic() - t0})


async def _completed_stats(src: qemu.Monitor) -> dict[str, Any]:
    """query-migrate may say completed before downtime is filled in: ask again."""
    info: dict[str, Any] = {}
    for _ in range(20):
        info = await src.cmd("query-migrate")
        if "downtime" in info and "total-time" in info:
            break
        await asyncio.sleep(0.05)
    return info


class _SwitchObserver:
    """Measures when co-resident peers switch a MAC's path, from their drivers."""

    def __init__(self, sd: StateDir, state: State, host: str, vm: str, mac: str) -> None:
        self.mac = mac
        self.guests: list[Guest] = []
        if not state.driver:
            return
        topo = cluster.topology_of(state)
        for name, other in state.vms.items():
            if not cluster.driver_for(state, topo.vm(name)):
                continue  # no ivloop.ko there: nobody to ask
            if name != vm and other.host == host and other.status == VMStatus.RUNNING:
                with contextlib.suppress(HarnessError):
                    self.guests.append(cluster.guest(sd, state, name, timeout=10))

    def wait(self, shm: bool, since: float, timeout: float = 30) -> float | None:
        """Seconds from *since* until every peer agrees; None if nobody to ask."""
        if not self.guests:
            return None
        try:
            for g in self.guests:
                paths.wait_peer(g, self.mac, shm=shm, timeout=timeout, interval=0.05)
        except HarnessError as exc:
            log.warning("path switch not observed: %s", exc)
            return None
        return time.monotonic() - since

    def close(self) -> None:
        for g in self.guests:
            g.close()


def migrate(sd: StateDir, vm: str | None, source: str, dest: str, *,
            timeout: float = 120, max_bandwidth_mib: int | None = None,
            progress: Progress | None = None, qemu_path: str | None = None) -> Report:
    """Move *vm* from host *source* to host *dest*; see the module docstring.

    The destination runs the same QEMU as the source (*qemu_path*, when
    given, must name it); see :func:`destination_qemu`.
    """
    state = sd.load()
    if state.backend == "libvirt":
        from harness.backends import libvirt as backend_libvirt

        return backend_libvirt.migrate(sd, vm, source, dest, timeout=timeout,
                                       max_bandwidth_mib=max_bandwidth_mib, progress=progress)
    topo = cluster.topology_of(state)
    topo.host(source)
    topo.host(dest)
    vm = vm or pick_vm(state, source)
    vs = validate(state, vm, source, dest)
    binary = destination_qemu(state, vs, qemu_path)
    spec = topo.vm(vm)
    say: Progress = progress or (lambda phase, info: None)
    report = Report(vm=vm, source=source, destination=dest)
    t0 = time.monotonic()

    def mark(what: str) -> None:
        report.events.append((round(time.monotonic() - t0, 3), what))
        say(what, {"t": time.monotonic() - t0})

    vs.status = VMStatus.MIGRATING
    sd.save(state)
    mig_sock = sd.file(f"migrate-{vm}.sock")
    mig_sock.unlink(missing_ok=True)
    dest_vs: VMState | None = None
    unplugged = False
    src_peers = _SwitchObserver(sd, state, source, vm, spec.mac)
    dst_peers = _SwitchObserver(sd, state, dest, vm, spec.mac)

    async def run() -> None:
        nonlocal dest_vs, unplugged
        async with qemu.Monitor(Path(vs.qmp)) as src:
            if vs.ivshmem:
                mark("unplug ivshmem on source")
                t = time.monotonic()
                await cluster.unplug_ivshmem(src, vs)
                unplugged = True
                vs.ivshmem = False
                report.unplug_s = time.monotonic() - t
                mark("source left the shared region")
                report.switch_source_s = await asyncio.to_thread(src_peers.wait, False, t)
            memory = await source_memory(src, vs)
            mark(f"start destination on {dest}")
            t = time.monotonic()
            # pyroute2 runs its own event loop: keep it off this one.
            dest_vs = await asyncio.to_thread(
                cluster.start_vm, sd, state, spec, ivshmem=False, host=dest, incoming=True,
                generation=vs.generation + 1, memory=memory, binary=binary)
            report.dest_start_s = time.monotonic() - t
            async with qemu.Monitor(Path(dest_vs.qmp)) as dst:
                caps = [{"capability": "events", "state": True}]
                await dst.cmd("migrate-set-capabilities", {"capabilities": caps})
                await src.cmd("migrate-set-capabilities", {"capabilities": caps})
                # Always set: a cap left by an earlier (failed) attempt would stick.
                await src.cmd("migrate-set-parameters",
                              {"max-bandwidth": (max_bandwidth_mib or DEFAULT_BANDWIDTH_MIB)
                               * 2**20})
                await dst.cmd("migrate-incoming", {"uri": f"unix:{mig_sock}"})
                mark("migrate")
                t = time.monotonic()
                with src.listener("MIGRATION") as listener:
                    await src.cmd("migrate", {"uri": f"unix:{mig_sock}"})
                    result = await _wait_migration(src, listener, timeout, say, t0)
                report.migrate_s = time.monotonic() - t
                if result["status"] != "completed":
                    raise MigrationError(f"migration {result['status']}: "
                                         f"{result.get('error-desc', 'no reason given')}")
                info = await _completed_stats(src)
                report.downtime_ms = info.get("downtime")
                report.total_s = info.get("total-time", 0) / 1000
                report.transferred_mib = info.get("ram", {}).get("transferred", 0) / 2**20
                mark("migration completed")
                status = await dst.cmd("query-status")
                if status.get("status") != "running":
                    await dst.cmd("cont")
                server = state.hosts[dest].server_socket
                if server:
                    mark(f"plug ivshmem on {dest}")
                    t = time.monotonic()
                    await cluster.plug_ivshmem(dst, server)
                    dest_vs.ivshmem = True
                    report.plug_s = time.monotonic() - t
                    mark("destination plugged")
                    report.switch_dest_s = await asyncio.to_thread(dst_peers.wait, True, t)
                    if report.switch_dest_s is not None:
                        mark("peers on the destination use shared memory")

    try:
        asyncio.run(run())
    except BaseException as exc:  # roll back on every path, then re-raise
        src_peers.close()
        dst_peers.close()
        report.error = str(exc) or exc.__class__.__name__
        if isinstance(exc, KeyboardInterrupt):
            report.error = "interrupted"
        log.error("%s: migration %s -> %s failed: %s; keeping the source",
                  vm, source, dest, report.error)
        _roll_back(sd, state, vs, dest_vs, unplugged)
        mig_sock.unlink(missing_ok=True)
        if isinstance(exc, HarnessError | OSError | EOFError):
            raise MigrationError(f"{vm} stays on {source}: {report.error}") from exc
        raise

    src_peers.close()
    dst_peers.close()
    assert dest_vs is not None
    old = vs.proc
    old_tap, old_ns = vs.tap, state.hosts[source].netns
    # The destination is now the VM: record it before the source goes.
    dest_vs.status = VMStatus.RUNNING
    state.vms[vm] = dest_vs
    sd.save(state)
    if old is not None:
        qemu.terminate(old)
    with contextlib.suppress(HarnessError):
        hostnet.remove_link(old_ns, old_tap)
    Path(vs.qmp).unlink(missing_ok=True)
    mig_sock.unlink(missing_ok=True)
    report.ok = True
    mark("source stopped")
    if report.total_s == 0:
        report.total_s = time.monotonic() - t0
    return report


def _roll_back(sd: StateDir, state: State, vs: VMState, dest_vs: VMState | None,
               unplugged: bool) -> None:
    """Destination gone, source running with its ivshmem device back."""
    if dest_vs is not None and dest_vs.proc is not None:
        qemu.terminate(dest_vs.proc)
        Path(dest_vs.qmp).unlink(missing_ok=True)
        with contextlib.suppress(HarnessError):
            hostnet.remove_link(state.hosts[dest_vs.host].netns, dest_vs.tap)
    if dest_vs is not None:
        sd.file(f"qemu-{vs.name}-g{dest_vs.generation}.pid").unlink(missing_ok=True)

    async def resume() -> None:
        async with qemu.Monitor(Path(vs.qmp)) as src:
            with contextlib.suppress(HarnessError):
                await src.cmd("migrate_cancel")
            status = await src.cmd("query-status")
            if status.get("status") != "running":
                await src.cmd("cont")
            if unplugged and state.hosts[vs.host].server_socket:
                await cluster.plug_ivshmem(src, state.hosts[vs.host].server_socket)
                vs.ivshmem = True

    try:
        asyncio.run(resume())
    finally:
        vs.status = VMStatus.RUNNING if vs.proc and vs.proc.alive() else VMStatus.DOWN
        state.vms[vs.name] = vs
        sd.save(state)
