"""One migration flow: the five phases, their timings, their report, their failure rules.

A peer-mode ivshmem device cannot migrate and its region means nothing on
another host, so the device leaves before the move and a new one joins
after it, the way net_failover handles a VF.  Whoever runs QEMU (libvirt,
in :mod:`ivloop_libvirt.migrate`; the harness itself, in
``harness.backends.direct``) supplies the steps as a :class:`Mover`; this
module runs them, times them and applies one rule to every failure:

``check``
    The request fits (the VM runs, the destination is another host).
    A failure raises the mover's own error; nothing has changed.
1. ``unplug``: the device leaves the source (only if it has one); the
   caller's *switch_source* hook may then wait until the co-resident peers
   route the VM over the lower NIC.
2. ``prepare``: the destination is ready to receive.
3. ``migrate``: the hypervisor moves the VM and reports completion.
4. ``plug``: a new device on the destination (if the source had one); the
   *switch_dest* hook may wait until the peers there use shared memory.
5. ``finish``: the source is stopped and the destination recorded as the VM.

**Before the migration completes**, any failure (Ctrl-C included) is rolled
back: the source keeps the VM, running, with its device plugged again, and
:class:`MigrationError` names the phase.  If the source cannot get its
device back, :class:`IncompleteMigrationError` says so, with the command
that finishes the job.

**Once it has completed**, the destination *is* the VM: the source's memory
is older than what the VM's peers have seen (TCP sequence numbers, files
written), so the source is never resumed.  A failure from then on (the
destination's server refuses the plug, say) leaves the VM on the
destination, on its lower NIC; the source is still stopped, and
:class:`IncompleteMigrationError` carries the report (``completed`` true,
``failed_phase`` ``plug``) and in ``hint`` the command that plugs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import IncompleteMigrationError, MigrationError
from .reports import MigrationReport

log = logging.getLogger(__name__)

#: Called with a phase name (or "transfer") and details, ``t`` among them.
Progress = Callable[[str, dict[str, Any]], None]
#: Called with the time.monotonic() at which unplug or plug began; returns
#: the seconds from then until the peers switched path, None if unknown.
SwitchWait = Callable[[float], float | None]


@dataclass
class Completed:
    """What the hypervisor says of a completed migration."""

    downtime_ms: float | None = None
    transferred_mib: float = 0.0
    job_ms: float | None = None
    setup_ms: float | None = None


class Mover(Protocol):
    """One backend's steps for one VM; :func:`run` calls them in order.

    Each raises on failure.  Only :meth:`roll_back` and :meth:`landed` are
    asked after a failure; neither may raise.
    """

    #: Filled in by :meth:`check`: who, from where, to where.
    report: MigrationReport

    def check(self) -> None:
        """Refuse a request that cannot work; change nothing."""

    def has_device(self) -> bool:
        """Whether the VM has an ivloop device on the source (so a new one is plugged)."""

    def unplug(self) -> None:
        """Detach the source's device and wait until the guest let it go."""

    def prepare(self) -> None:
        """Make the destination ready to receive (a no-op where migrate does it)."""

    def migrate(self, timeout: float, say: Progress, t0: float) -> Completed:
        """Move the VM; return once the destination runs it, or raise."""

    def landed(self) -> bool:
        """After :meth:`migrate` raised: whether the VM completed its move anyway."""

    def plug(self) -> None:
        """Attach a new device on the destination."""

    def finish(self) -> None:
        """Stop the source and record the destination as the VM."""

    def roll_back(self) -> str:
        """Before completion: the source running with its device again.

        Returns "" when that holds, else the command that finishes the job.
        """

    def plug_command(self) -> str:
        """The command that plugs the VM's device on the destination."""


def run(mover: Mover, *, timeout: float, progress: Progress | None = None,
        switch_source: SwitchWait | None = None,
        switch_dest: SwitchWait | None = None) -> MigrationReport:
    """Move the VM *mover* speaks for; see the module docstring.

    Returns the report (``ok`` true).  Raises the mover's own error from
    ``check`` (nothing changed), :class:`MigrationError` (rolled back) or
    :class:`IncompleteMigrationError` (the VM runs, not on shared memory);
    both carry the report.
    """
    say: Progress = progress or (lambda phase, info: None)
    t0 = time.monotonic()
    mover.check()
    report = mover.report
    vm = report.vm

    def mark(what: str) -> None:
        report.events.append((round(time.monotonic() - t0, 3), what))
        say(what, {"t": time.monotonic() - t0})

    def timed(phase: str, step: Callable[[], Any]) -> Any:
        t = time.monotonic()
        try:
            return step()
        finally:
            setattr(report, f"{phase}_s", getattr(report, f"{phase}_s") + time.monotonic() - t)

    device = mover.has_device()
    phase = "unplug"
    completed: Completed | None = None
    failure: BaseException | None = None
    try:
        if device:
            mark("unplug on source")
            t = time.monotonic()
            timed("unplug", mover.unplug)
            mark("source left the shared region")
            report.switch_source_s = _wait(switch_source, t, vm)
        phase = "prepare"
        mark(f"prepare {report.destination}")
        timed("prepare", mover.prepare)
        phase = "migrate"
        mark(f"migrate to {report.destination}")
        completed = timed("migrate", lambda: mover.migrate(timeout, say, t0))
    except BaseException as exc:  # roll back on every path, then re-raise
        report.failed_phase = phase
        report.error = _text(exc)
        if phase == "migrate" and mover.landed():
            failure = exc
            log.error("%s: the migration completed but then failed: %s; it stays on %s",
                      vm, report.error, report.destination)
        else:
            log.error("%s: migration to %s failed in phase %s: %s; keeping the source",
                      vm, report.destination, phase, report.error)
            report.hint = _quiet(mover.roll_back, vm)
            report.source_restored = not report.hint
            report.total_s = time.monotonic() - t0
            if not isinstance(exc, Exception):
                raise
            if report.source_restored:
                raise MigrationError(f"{vm} stays on {report.source}: {phase} failed: "
                                     f"{report.error}", report) from exc
            raise IncompleteMigrationError(f"{vm}: {phase} failed: {report.error}; "
                                           f"{report.hint}", report) from exc
    report.completed = True
    if completed is not None:
        mark("migration completed")
        report.downtime_ms = completed.downtime_ms
        report.transferred_mib = completed.transferred_mib
        report.job_ms = completed.job_ms
        report.setup_ms = completed.setup_ms
    if report.failed_phase == "" and device and report.dest_socket:
        phase = "plug"
        mark(f"plug on {report.destination}")
        t = time.monotonic()
        try:
            timed("plug", mover.plug)
        except BaseException as exc:  # the VM stays where it is now: finish below
            failure = exc
            report.failed_phase, report.error = "plug", _text(exc)
        else:
            mark("destination plugged")
            report.switch_dest_s = _wait(switch_dest, t, vm)
            if report.switch_dest_s is not None:
                mark("peers on the destination use shared memory")
    try:
        timed("finish", mover.finish)
        mark("source stopped")
    except Exception as exc:
        log.error("%s: the source was not stopped: %s", vm, _text(exc))
        report.failed_phase = report.failed_phase or "finish"
        report.error = report.error or _text(exc)
        failure = failure or exc
    report.total_s = time.monotonic() - t0
    if report.failed_phase:
        if failure is not None and not isinstance(failure, Exception):
            raise failure
        report.hint = report.hint or mover.plug_command()
        raise IncompleteMigrationError(
            f"{vm} moved to {report.destination} but runs there without shared memory "
            f"(over its lower NIC): {report.failed_phase} failed: {report.error}",
            report) from failure
    report.ok = True
    return report


def _text(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return str(exc) or exc.__class__.__name__


def _wait(hook: SwitchWait | None, since: float, vm: str) -> float | None:
    if hook is None:
        return None
    try:
        return hook(since)
    except Exception as exc:  # a measurement must not undo a migration
        log.warning("%s: path switch not observed: %s", vm, exc)
        return None


def _quiet(step: Callable[[], str], vm: str) -> str:
    try:
        return step()
    except Exception as exc:  # the roll back must report, not raise
        log.error("%s: roll back failed: %s", vm, _text(exc))
        return f"roll back failed ({_text(exc)}): check where {vm} runs"
