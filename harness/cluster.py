"""Bringing a topology up and down, and the operations on its VMs.

Backend-neutral: what differs between QEMU run by the harness and QEMU run
by libvirt is asked of the :class:`~harness.backends.base.Backend` the
state records (:func:`harness.backends.of`).  With :mod:`harness.migrate`,
this is where the state directory's records change.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from harness import backends
from harness.errors import HarnessError, StateError
from harness.lab import accel as accel_mod
from harness.lab import guest as guest_mod
from harness.lab import guestdisk, hostnet, paths, qemu, servers, vms
from harness.lab.state import HostState, ProcRecord, State, StateDir, VMState, VMStatus
from harness.lab.topology import Topology
from harness.lab.vms import BOOT_TIMEOUT

log = logging.getLogger(__name__)


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
    runner = backends.named(backend)
    binary = qemu.probe(qemu_path)
    log.info("QEMU: %s (%s)", binary.path, binary.banner)
    kernel, initrd = vms.image_paths()
    choice = accel_mod.choose(kernel, initrd, forced_accel, binary)
    log.info("accelerator: %s (%s)", choice.accel, choice.reason)
    vhost = choice.vhost_net(accel_mod.vhost_net_usable())
    log.info("data NICs: %s", accel_mod.lower_path(choice.accel, vhost))
    state = State(instance=sd.instance, topology=topo.raw, topology_source=topo.source,
                  accel=choice.accel, vhost_net=vhost, driver=driver, qemu=binary.path,
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
        runner.start_hosts(sd, state)
        for vm in topo.vms.values():
            runner.start_vm(sd, state, vm, ivshmem=ivshmem, binary=binary)
        for vm in topo.vms.values():
            vms.wait_ssh(sd, state, vm.name)
    except BaseException:
        log.error("bringing the topology up failed; cleaning up")
        down(sd)
        raise
    return state


def start_server(sd: StateDir, state: State, host: str) -> None:
    """Start *host*'s ivloop-server, recorded before it runs."""
    topo = vms.topology_of(state)
    hs = state.hosts[host]
    hs.server_socket = str(sd.file(f"ivshmem-{host}.sock"))
    sd.save(state)
    spec = topo.host(host)
    hs.server, hs.supervisor = servers.start(
        hs.netns, Path(hs.server_socket), sd.file("logs", f"server-{host}.log"),
        sd.file(f"server-{host}.pid"), size=spec.region_size, max_peers=spec.max_peers)
    sd.save(state)


def hand_over_server(sd: StateDir, host: str) -> tuple[int, int]:
    """Replace *host*'s ivloop-server by a new one that takes its region and members over.

    What the ivloop-host package does on upgrade: VMs keep their devices and
    shared memory, nothing is re-plugged.  Returns (old PID, new PID).
    """
    state = sd.load()
    vms.topology_of(state).host(host)
    hs = state.hosts[host]
    if hs.server is None or hs.supervisor is None:
        raise StateError(f"host {host} has no server under a supervisor to hand over "
                         "(started by an older harness?): use 'harness server-restart'")
    old = hs.server.pid
    hs.server = servers.hand_over(hs.server, hs.supervisor, sd.file(f"server-{host}.pid"))
    sd.save(state)
    log.info("%s: ivloop-server %d handed over to %d", host, old, hs.server.pid)
    return old, hs.server.pid


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
    # What the backend runs beyond the recorded QEMUs first (libvirt's daemons
    # and domains, found by their directories), while the host namespaces
    # their QEMUs are checked against still exist.  An unreadable state file
    # names no backend: then every backend looks.
    runners = [backends.of(state)] if state.topology else \
        [backends.named(n) for n in backends.NAMES]
    for runner in runners:
        removed += runner.down(sd)
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
        if hs.supervisor and qemu.terminate(hs.supervisor):
            removed.append(f"ivloop-server {hs.name}'s supervisor (pid {hs.supervisor.pid})")
        sd.file(f"server-{hs.name}.pid").unlink(missing_ok=True)
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
    topo = vms.topology_of(state)
    rows: list[StatusRow] = []
    for name, spec in topo.vms.items():
        vs = state.vms.get(name)
        alive = bool(vs and vs.proc and vs.proc.alive())
        path = "-"
        runs = (vms.vm_qemu(vs) if vs else None) or vms.recorded_qemu(state.qemu,
                                                                   state.qemu_banner)
        if alive and probe and vs and vs.status == VMStatus.RUNNING:
            try:
                with vms.guest(sd, state, name, timeout=10) as g:
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


def set_ivshmem(sd: StateDir, name: str, attached: bool) -> None:
    """Hot-plug or hot-unplug a VM's ivshmem device and record it."""
    state = sd.load()
    vms.topology_of(state).vm(name)
    vs = state.vms.get(name)
    if vs is None or vs.proc is None or not vs.proc.alive():
        raise StateError(f"VM {name} is down")
    if vs.ivshmem == attached:
        now = "attached" if attached else "detached"
        raise StateError(f"{name}'s ivshmem device is already {now}")
    if attached and not state.hosts[vs.host].server_socket:
        raise StateError(f"host {vs.host} runs no ivloop-server")
    backends.of(state).set_ivshmem(sd, state, vs, attached)
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
    runner = backends.of(state)
    runner.require_restarts("restart")
    vms.topology_of(state).vm(name)
    return runner.restart_vm(sd, state, name, timeout)


def restart_server(sd: StateDir, host: str) -> list[str]:
    """Start a new ivloop-server for *host* and move its VMs onto it.

    QEMU does not reconnect an ivshmem chardev whose server went away, and a
    new server has a new region, so every VM of the host that had a device
    gets it unplugged and a new one plugged (see
    :func:`harness.backends.qmp.unplug_ivshmem` on fd parking).  A server that
    still runs is stopped first.  Returns the VMs re-plugged.
    """
    state = sd.load()
    runner = backends.of(state)
    runner.require_restarts("server-restart")
    vms.topology_of(state).host(host)
    hs = state.hosts[host]
    if hs.server is not None and qemu.terminate(hs.server):
        log.info("stopped the running ivloop-server of %s", host)
    if hs.supervisor is not None:
        qemu.terminate(hs.supervisor)  # it exits with its server
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
        try:
            runner.replug(sd, state, vs, server)
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
