"""Bringing a topology up and down, and the operations on its VMs.

With migrate.py (which records a VM's move between hosts), this is where
the state directory's records change; the CLI is a thin layer over both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError, ImageError, StateError
from harness.lab import accel as accel_mod
from harness.lab import guest as guest_mod
from harness.lab import guestdisk, hostnet, paths, qemu, servers
from harness.lab.state import HostState, ProcRecord, State, StateDir, VMState, VMStatus
from harness.lab.topology import Topology, VMSpec
from harness.lab.topology import parse as parse_topology
from ivloop_libvirt import fdholes

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SSH_PORT_BASE = 2200
BOOT_TIMEOUT = float(os.environ.get("IVLOOP_BOOT_TIMEOUT", "180"))


def image_dir() -> Path:
    return Path(os.environ.get("IVLOOP_IMAGE_DIR", REPO / "images" / "out"))


def image_paths() -> tuple[Path, Path]:
    d = image_dir()
    kernel, initrd = d / "vmlinuz", d / "initrd.img"
    if not kernel.exists() or not initrd.exists():
        raise ImageError(f"guest image not found in {d}; run 'make image' first")
    return kernel, initrd


def topology_of(state: State) -> Topology:
    return parse_topology(state.topology, state.topology_source)


# ---------------------------------------------------------------------------
# which QEMU


def recorded_qemu(path: str, banner: str) -> qemu.Binary | None:
    """The QEMU a state record names; None when it names none (an older harness)."""
    if not path or not banner:
        return None
    try:
        return qemu.Binary(path=path, version=qemu.Version.parse(banner), banner=banner)
    except ValueError:
        return None


def vm_qemu(vs: VMState) -> qemu.Binary | None:
    """The QEMU *vs*'s process was started from, as recorded."""
    return recorded_qemu(vs.qemu, vs.qemu_banner)


def qemu_for(state: State) -> qemu.Binary:
    """The topology's QEMU as it is now: the recorded path, probed again.

    Every later QEMU of the topology (restart, a migration destination) is
    started from the binary `harness up` chose; probing it again sees a
    binary replaced meanwhile (a new `make qemu-10`), which callers that need
    the same QEMU as a running one compare (migrate.check_same_qemu).
    """
    binary = qemu.probe(state.qemu or qemu.DEFAULT_BINARY)
    if state.qemu_banner and binary.banner != state.qemu_banner:
        log.warning("%s changed since 'harness up': it was %s, it is %s now",
                    binary.path, state.qemu_banner, binary.banner)
    return binary


# ---------------------------------------------------------------------------
# up / down


def up(sd: StateDir, topo: Topology, forced_accel: str | None = None, *,
       ivshmem: bool = True, driver: bool = True,
       qemu_path: str | os.PathLike[str] | None = None, backend: str = "qemu") -> State:
    """Create hosts, wires, servers and VMs; return when every VM answers SSH.

    Every VM runs the QEMU *qemu_path* names (default: ``$IVLOOP_QEMU``,
    else qemu-system-x86_64 on PATH); it is checked before anything starts
    and recorded, so every later QEMU of this topology is the same binary.
    """
    if sd.exists():
        state = sd.load()
        alive = [vm.name for vm in state.vms.values() if vm.proc and vm.proc.alive()]
        raise StateError(
            f"a topology is already up in {sd.path}"
            + (f" (running: {', '.join(alive)})" if alive else "")
            + "; run 'harness down' first"
        )
    binary = qemu.probe(qemu_path)
    log.info("QEMU: %s (%s)", binary.path, binary.banner)
    kernel, initrd = image_paths()
    choice = accel_mod.choose(kernel, initrd, forced_accel, binary)
    log.info("accelerator: %s (%s)", choice.accel, choice.reason)
    state = State(instance=sd.instance, topology=topo.raw, topology_source=topo.source,
                  accel=choice.accel, driver=driver, qemu=binary.path,
                  qemu_banner=binary.banner, backend=backend)
    sd.save(state)
    guest_mod.ensure_key(sd.key_path)
    sd.file("logs").mkdir(exist_ok=True)
    try:
        for host in topo.hosts.values():
            hs = HostState(name=host.name, netns=sd.netns_name(host.name))
            state.hosts[host.name] = hs
            sd.save(state)  # recorded before it exists: down can always remove it
            hostnet.create_host(hs.netns, mtu=topo.mtu)
        names = list(topo.hosts)
        for other in names[1:]:  # a star of wires around the first host
            hostnet.add_wire(state.hosts[names[0]].netns, f"wire-{other}",
                             state.hosts[other].netns, f"wire-{names[0]}", mtu=topo.mtu)
        if ivshmem:
            for host in topo.hosts.values():
                start_server(sd, state, host.name)
        if backend == "libvirt":
            from harness.backends import libvirt as backend_libvirt

            backend_libvirt.start_daemons(sd, state)
        for vm in topo.vms.values():
            if backend == "libvirt":
                backend_libvirt.up_vm(sd, state, vm, ivshmem=ivshmem, binary=binary)
            else:
                start_vm(sd, state, vm, ivshmem=ivshmem, binary=binary)
        for vm in topo.vms.values():
            wait_ssh(sd, state, vm.name)
    except BaseException:
        log.error("bringing the topology up failed; cleaning up")
        down(sd)
        raise
    return state


def start_server(sd: StateDir, state: State, host: str) -> None:
    topo = topology_of(state)
    hs = state.hosts[host]
    hs.server_socket = str(sd.file(f"ivshmem-{host}.sock"))
    sd.save(state)
    spec = topo.host(host)
    hs.server = servers.start(hs.netns, Path(hs.server_socket),
                              sd.file("logs", f"server-{host}.log"),
                              size=spec.region_size, max_peers=spec.max_peers)
    sd.save(state)


def start_vm(sd: StateDir, state: State, vm: VMSpec, *, ivshmem: bool = True,
             host: str | None = None, incoming: bool = False, generation: int = 0,
             memory: str | None = None, binary: qemu.Binary | None = None) -> VMState:
    """Launch one VM's QEMU on *host* (default: its topology host).

    With *incoming* the VM waits for a migration and is not recorded in
    *state* (the caller records it once the migration has succeeded).
    *memory* is the ``-m`` value, by default what this harness gives a new
    guest; a migration destination must repeat its source's RAM size.
    *binary* is the QEMU to run, by default the topology's (:func:`qemu_for`).
    """
    binary = binary or qemu_for(state)
    kernel, initrd, disk = boot_files(sd, state, vm, incoming=incoming)
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
        ssh_port=SSH_PORT_BASE + vm.index, tap=f"tap-{vm.name}"[:15],
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
        lower_only=not driver_for(state, vm), binary=binary.path, disk=disk,
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


def boot_files(sd: StateDir, state: State, vm: VMSpec, *,
               incoming: bool) -> tuple[Path, Path, Path | None]:
    """The kernel, initrd and (for a systemd guest) root disk *vm* boots.

    A Debian guest (``image = "debian"``) boots its own copy of the image's
    disk, made on its first start and kept across restarts and migrations
    (the destination opens the same file) until `harness down`.
    """
    if vm.image != "debian":
        kernel, initrd = image_paths()
        return kernel, initrd, None
    if not driver_for(state, vm):
        raise StateError(f"{vm.name} boots the Debian image, whose own configuration always "
                         "stacks ivl0; without the driver use image = \"initramfs\"")
    img = guestdisk.image()
    disk = sd.file(f"disk-{vm.name}.img")
    if not disk.exists():
        if incoming:
            raise StateError(f"{vm.name}'s disk {disk} is missing: a migration destination "
                             "opens its source's disk")
        guestdisk.prepare(img.disk, disk, vm, guest_mod.ensure_key(sd.key_path))
    return img.kernel, img.initrd, disk


def driver_for(state: State, vm: VMSpec) -> bool:
    """Whether *vm* loads ivloop.ko: its own `driver` key wins over the global flag."""
    return state.driver if vm.driver is None else vm.driver


def wait_ssh(sd: StateDir, state: State, name: str, timeout: float = BOOT_TIMEOUT) -> None:
    vs = state.vms[name]
    try:
        with guest(sd, state, name, timeout=timeout) as g:
            g.run("true")
    except HarnessError as exc:
        console = Path(vs.console)
        tail = console.read_text(errors="replace").splitlines()[-10:] if console.exists() else []
        raise StateError(f"{name} did not come up: {exc}\nconsole:\n" + "\n".join(tail)) from exc
    vs.status = VMStatus.RUNNING
    sd.save(state)


def down(sd: StateDir) -> list[str]:
    """Stop every recorded process and remove every recorded namespace and socket."""
    removed: list[str] = []
    if not sd.exists():
        return removed
    try:
        state = sd.load()
    except StateError:
        log.warning("state file unreadable; removing what can be found by name")
        state = State(instance=sd.instance, topology={}, topology_source="")
    from harness.backends import libvirt as backend_libvirt

    # libvirt's domains and daemons first (found by their directories), while
    # the host namespaces their QEMUs are checked against still exist
    removed += backend_libvirt.down(sd)
    for vs in state.vms.values():
        if vs.proc and qemu.terminate(vs.proc):
            removed.append(f"QEMU {vs.name} (pid {vs.proc.pid})")
    for pidfile in sd.path.glob("qemu-*.pid"):  # e.g. a migration destination
        with contextlib.suppress(OSError, ValueError):
            rec = ProcRecord.of(int(pidfile.read_text().strip()))
            if _is_ours(rec.pid, sd) and qemu.terminate(rec):
                removed.append(f"QEMU pid {rec.pid}")
        pidfile.unlink(missing_ok=True)
    for hs in state.hosts.values():
        if hs.server and qemu.terminate(hs.server):
            removed.append(f"ivloop-server {hs.name} (pid {hs.server.pid})")
    netnses = [hs.netns for hs in state.hosts.values()] + state.extra_netns
    # Names are derived from the state directory, so even a state file that
    # lost a host still finds its namespaces.
    netnses += [p.name for p in hostnet.NETNS_DIR.glob(f"ivl-{sd.instance}-*")]
    for ns in dict.fromkeys(netnses):
        if hostnet.remove_host(ns):
            removed.append(f"namespace {ns}")
    for sock in sd.sockets():
        sock.unlink(missing_ok=True)
        removed.append(f"socket {sock.name}")
    removed += [f"disk {name}" for name in guestdisk.remove(sd.path)]
    sd.clear()
    return removed


def _is_ours(pid: int, sd: StateDir) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(sd.path).encode() in cmdline


# ---------------------------------------------------------------------------
# guests and status


def guest(sd: StateDir, state: State, name: str, timeout: float = 30) -> guest_mod.Guest:
    topology_of(state).vm(name)  # unknown VM -> TopologyError
    vs = state.vms.get(name)
    if vs is None or vs.proc is None or not vs.proc.alive():
        raise StateError(f"VM {name} is down; 'harness restart {name}' starts it")
    g = guest_mod.Guest(name, state.hosts[vs.host].netns, vs.ssh_port, sd.key_path)
    return g.open(timeout=timeout)


@dataclass(frozen=True)
class StatusRow:
    host: str
    vm: str
    ip: str
    mac: str
    accel: str
    pid: int | None
    status: str
    ivshmem: str
    path: str
    qemu: str = "-"  # version of the QEMU the VM runs
    qemu_path: str = "-"


def status(sd: StateDir, probe: bool = True) -> list[StatusRow]:
    state = sd.load()
    topo = topology_of(state)
    rows: list[StatusRow] = []
    for name, spec in topo.vms.items():
        vs = state.vms.get(name)
        alive = bool(vs and vs.proc and vs.proc.alive())
        path = "-"
        runs = (vm_qemu(vs) if vs else None) or recorded_qemu(state.qemu, state.qemu_banner)
        if alive and probe and vs and vs.status == VMStatus.RUNNING:
            try:
                with guest(sd, state, name, timeout=10) as g:
                    path = paths.describe(g)
            except HarnessError as exc:
                path = f"unknown ({exc.__class__.__name__})"
        rows.append(StatusRow(
            host=vs.host if vs else spec.host, vm=name, ip=spec.ip, mac=spec.mac,
            accel=vs.accel if vs else "-", pid=vs.proc.pid if alive and vs and vs.proc else None,
            status=(vs.status.value if alive and vs else "down"),
            ivshmem=("attached" if vs and vs.ivshmem else "detached") if alive else "-",
            path=path,
            qemu=str(runs.version) if runs and alive else "-",
            qemu_path=runs.path if runs and alive else "-",
        ))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------
# ivshmem hot-plug


# QEMU's ivshmem unrealize closes its vector eventfds but leaves the TCG
# fd handlers watching their numbers (opaque: the freed msi_vectors).  When a
# later fd reuses such a number and becomes readable (a QMP or SSH socket, the
# next device's own eventfds), QEMU runs the stale handler and crashes.  So an
# unplug parks a never-signalled eventfd (QMP `getfd`, held until QEMU exits)
# on every fd number it freed, before anything else can take one; Linux hands
# out the lowest free number, so the holes below are filled as well.
# Done on every QEMU version: seen on 7.2, and the unrealize path is the same
# in upstream's hw/misc/ivshmem-pci.c, so it is still needed.  Which numbers
# to fill, and when to give up, is ivloop_libvirt.fdholes' plan, shared with
# the libvirt backend.


def open_fds(pid: int) -> set[int]:
    """The fd numbers open in process *pid*."""
    try:
        return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    except OSError as exc:
        raise StateError(f"cannot list the fds of QEMU pid {pid}: {exc}") from exc


async def park_fds(mon: qemu.Monitor, pid: int, numbers: set[int], tag: str) -> int:
    """Occupy every free fd number in *numbers* (and the holes below); how many parked."""
    parked = 0
    for _ in fdholes.holes(pid, numbers, open_fds):
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            mon.client.send_fd_scm(fd)
            await mon.cmd("getfd", {"fdname": f"ivl-park-{tag}-{parked}"})
        finally:
            os.close(fd)
        parked += 1
    return parked


async def unplug_ivshmem(mon: qemu.Monitor, vs: VMState, timeout: float = 30) -> None:
    """device_del *vs*'s ivshmem device, wait for DEVICE_DELETED, park the freed fds.

    Counts the unplug in ``vs.unplugs``, which names the parked fds.
    """
    if vs.proc is None:
        raise StateError(f"VM {vs.name} has no QEMU process")
    pid = vs.proc.pid
    before = open_fds(pid)
    with mon.listener("DEVICE_DELETED") as listener:
        await mon.cmd("device_del", {"id": qemu.IVSHMEM_ID})
        await mon.wait_event(listener, timeout, {"device": qemu.IVSHMEM_ID})
    vs.unplugs += 1
    await mon.cmd("chardev-remove", {"id": qemu.IVSHMEM_CHARDEV})
    n = await park_fds(mon, pid, before - open_fds(pid), str(vs.unplugs))
    log.debug("QEMU pid %d: parked %d fds after unplugging ivshmem", pid, n)


# QEMU's words when the server answers with version -1 (a refusal)
REFUSED = "server sent version -1"


async def plug_ivshmem(mon: qemu.Monitor, server_socket: str) -> None:
    """Connect a chardev to *server_socket* and hot-add ivshmem-doorbell on it."""
    await mon.cmd("chardev-add", {
        "id": qemu.IVSHMEM_CHARDEV,
        "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": server_socket}}, "server": False}},
    })  # fmt: skip
    try:
        await mon.cmd("device_add", {
            "driver": "ivshmem-doorbell", "id": qemu.IVSHMEM_ID, "chardev": qemu.IVSHMEM_CHARDEV,
            "vectors": 2, "bus": "pci.0", "addr": qemu.IVSHMEM_ADDR,
        })  # fmt: skip
    except HarnessError as exc:
        await mon.cmd("chardev-remove", {"id": qemu.IVSHMEM_CHARDEV})
        if REFUSED in str(exc):
            # how ivloop-server refuses (full, or an evicted QEMU's hold-off)
            raise type(exc)(f"{exc} (ivloop-server refused this QEMU; its log, "
                            "logs/server-HOST.log in the state directory, says why)") from exc
        raise


def set_ivshmem(sd: StateDir, name: str, attached: bool) -> None:
    """Hot-plug or hot-unplug a VM's ivshmem device and record it."""
    state = sd.load()
    if state.backend == "libvirt":
        from harness.backends import libvirt as backend_libvirt

        backend_libvirt.set_ivshmem(sd, name, attached)
        return
    topology_of(state).vm(name)
    vs = state.vms.get(name)
    if vs is None or vs.proc is None or not vs.proc.alive():
        raise StateError(f"VM {name} is down")
    if vs.ivshmem == attached:
        now = "attached" if attached else "detached"
        raise StateError(f"{name}'s ivshmem device is already {now}")
    server = state.hosts[vs.host].server_socket
    if attached and not server:
        raise StateError(f"host {vs.host} runs no ivloop-server")

    async def go() -> None:
        async with qemu.Monitor(Path(vs.qmp)) as mon:
            if attached:
                await plug_ivshmem(mon, server)
            else:
                await unplug_ivshmem(mon, vs)
    asyncio.run(go())
    vs.ivshmem = attached
    sd.save(state)



# ---------------------------------------------------------------------------
# recovery: a VM or a server that died


def restart_vm(sd: StateDir, name: str, timeout: float = BOOT_TIMEOUT) -> VMState:
    """Boot *name* again on the host it was last on (after a crash, or to reboot it).

    A QEMU still running is stopped first.  The new incarnation gets its own
    files (a new generation, as a migration destination does) and a fresh
    ivshmem device when its host runs a server: the server gives it a free
    directory slot and a new peer ID.
    """
    state = sd.load()
    if state.backend == "libvirt":
        raise StateError("'harness restart' is not available on the libvirt "
                         "backend yet; 'harness down' and 'harness up --backend libvirt' again")
    spec = topology_of(state).vm(name)
    old = state.vms.get(name)
    host = old.host if old else spec.host
    if old is not None:
        if old.proc is not None:
            qemu.terminate(old.proc)
        with contextlib.suppress(HarnessError):
            hostnet.remove_link(state.hosts[host].netns, old.tap)  # start_vm adds it again
    vs = start_vm(sd, state, spec, host=host,
                  generation=(old.generation + 1) if old is not None else 0)
    wait_ssh(sd, state, name, timeout=timeout)
    return vs


def restart_server(sd: StateDir, host: str) -> list[str]:
    """Start a new ivloop-server for *host* and move its VMs onto it.

    QEMU does not reconnect an ivshmem chardev whose server went away, and a
    new server has a new region, so every VM of the host that had a device
    gets it unplugged and a new one plugged (see unplug_ivshmem on fd parking).
    A server that still runs is stopped first.  Returns the VMs re-plugged.
    """
    state = sd.load()
    if state.backend == "libvirt":
        raise StateError("'harness server-restart' is not available on the libvirt "
                         "backend yet; 'harness down' and 'harness up --backend libvirt' again")
    topology_of(state).host(host)
    hs = state.hosts[host]
    if hs.server is not None and qemu.terminate(hs.server):
        log.info("stopped the running ivloop-server of %s", host)
    if hs.server_socket:
        # A killed server leaves its socket behind, and start_server takes
        # the socket's presence as "listening": remove it first.
        Path(hs.server_socket).unlink(missing_ok=True)
    start_server(sd, state, host)
    server = hs.server_socket
    moved: list[str] = []
    for vs in state.vms.values():
        if vs.host != host or not vs.ivshmem or vs.proc is None or not vs.proc.alive():
            continue

        async def replug(vs: VMState = vs) -> None:
            async with qemu.Monitor(Path(vs.qmp)) as mon:
                await unplug_ivshmem(mon, vs)
                await plug_ivshmem(mon, server)
        try:
            asyncio.run(replug())
        except (HarnessError, OSError, EOFError) as exc:
            vs.ivshmem = False  # unplugged but not plugged: say so, then report
            sd.save(state)
            if vs.proc.alive():
                raise
            vs.status = VMStatus.DOWN
            sd.save(state)
            raise StateError(
                f"{vs.name}'s QEMU died while its ivshmem device was re-plugged "
                f"({exc.__class__.__name__}); see {vs.console} and the QEMU log; "
                f"'harness restart {vs.name}' boots it again") from exc
        sd.save(state)
        moved.append(vs.name)
        log.info("%s: ivshmem re-plugged to the new server of %s", vs.name, host)
    return moved
