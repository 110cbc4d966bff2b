"""Live migration between simulated hosts, with the shared path switched.

``harness migrate`` checks the request against the state, then runs
:func:`ivloop_libvirt.flow.run` (the five phases, their timings, their
report and their failure rules, written once) with the steps of the
backend that runs the VM (:meth:`harness.backends.base.Backend.moving`),
and measures from the co-resident guests' drivers when each switched path
(:class:`SwitchObserver`).

Before the migration completes, a failure keeps the VM on the source with
its device re-plugged (:class:`~harness.errors.MigrationError`).  Once it
has completed, the VM stays on the destination whatever fails next, on its
lower NIC if the plug failed, the source is never resumed, and
:class:`~harness.errors.IncompleteMigrationError` carries the report with
the command that finishes the move.
"""

from __future__ import annotations

import contextlib
import logging
import time

from harness import backends
from harness.errors import HarnessError, IncompleteMigrationError, MigrationError, StateError
from harness.lab import paths, vms
from harness.lab.guest import Guest
from harness.lab.state import State, StateDir, VMState, VMStatus
from ivloop_libvirt import errors as lv_errors
from ivloop_libvirt import flow
from ivloop_libvirt.flow import Progress
from ivloop_libvirt.reports import MigrationReport

log = logging.getLogger(__name__)

#: What a report is, on either backend and from ``ivloop-libvirt migrate``.
Report = MigrationReport


def pick_vm(state: State, source: str) -> str:
    """The VM to move when none was named: the one mobile VM on *source*."""
    topo = vms.topology_of(state)
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
    topo = vms.topology_of(state)
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


class SwitchObserver:
    """Measures when co-resident peers switch a MAC's path, from their drivers."""

    def __init__(self, sd: StateDir, state: State, host: str, vm: str, mac: str) -> None:
        self.mac = mac
        self.guests: list[Guest] = []
        if not state.driver:
            return
        topo = vms.topology_of(state)
        for name, other in state.vms.items():
            if not vms.driver_for(state, topo.vm(name)):
                continue  # no ivloop.ko there: nobody to ask
            if name != vm and other.host == host and other.status == VMStatus.RUNNING:
                with contextlib.suppress(HarnessError):
                    self.guests.append(vms.guest(sd, state, name, timeout=10))

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
            progress: Progress | None = None, qemu_path: str | None = None) -> MigrationReport:
    """Move *vm* from host *source* to host *dest*; see the module docstring.

    The direct backend's destination runs the same QEMU as the source
    (*qemu_path*, when given, must name it).  Raises :class:`StateError` for
    a request that cannot apply (nothing changed), :class:`MigrationError`
    (the VM stays on *source*) or :class:`IncompleteMigrationError`.
    """
    state = sd.load()
    topo = vms.topology_of(state)
    topo.host(source)
    topo.host(dest)
    vm = vm or pick_vm(state, source)
    vs = validate(state, vm, source, dest)
    mac = topo.vm(vm).mac
    src_peers = SwitchObserver(sd, state, source, vm, mac)
    dst_peers = SwitchObserver(sd, state, dest, vm, mac)
    try:
        with backends.of(state).moving(sd, state, vm, source, dest,
                                       max_bandwidth_mib=max_bandwidth_mib,
                                       qemu_path=qemu_path) as mover:
            return flow.run(mover, timeout=timeout, progress=progress,
                            switch_source=lambda since: src_peers.wait(False, since),
                            switch_dest=lambda since: dst_peers.wait(True, since))
    except lv_errors.IncompleteMigrationError as exc:
        raise IncompleteMigrationError(f"{exc}\n{exc.report.hint}", exc.report) from exc
    except lv_errors.MigrationError as exc:
        raise MigrationError(str(exc), exc.report) from exc
    except lv_errors.IvloopLibvirtError as exc:  # the check refused it: nothing changed
        raise MigrationError(f"{vm} stays on {source}: {exc}") from exc
    except HarnessError:  # the check refused it: nothing changed but the mark
        if vs.status == VMStatus.MIGRATING:
            vs.status = VMStatus.RUNNING
            sd.save(state)
        raise
    finally:
        src_peers.close()
        dst_peers.close()
