"""Live migration of a libvirt domain that has an ivloop device.

libvirt refuses to migrate a peer-mode shmem device, and the region means
nothing on another host, so the phases are those of ``harness migrate``:

1. ``check``: the domain runs, the destination answers and is another host
   (its host UUID differs), the domain is not already active there.
   Nothing has changed yet; a failure raises :class:`RequestError`.
2. ``unplug``: detach the device live on the source and wait until the
   guest let it go; then the caller's *switch_source* hook may wait until
   the co-resident peers route over the lower NIC.
3. ``migrate``: ``virDomainMigrate3`` from this client to the destination
   connection (the ``virsh migrate`` flow without ``--p2p``: this process
   reaches both daemons, the source daemon need not reach the destination's).
   The job is aborted after *timeout*.  Downtime and the transfer come from
   the completed job's statistics (``VIR_DOMAIN_JOB_STATS_COMPLETED``).
4. ``plug``: attach a new device on the destination, on *dest_socket*
   (default: the source's path) and at the same guest PCI address; then the
   *switch_dest* hook may wait until the peers there use shared memory.

Rollback: a failure in ``unplug`` or ``migrate`` (or Ctrl-C) leaves the VM
on the source: the job is aborted, a source paused by the migration is
resumed, and the device is attached again if the guest lost it, then
:class:`MigrationError` says which phase failed.  If the source could not
get its device back, or the VM moved but the destination refused the new
device, :class:`IncompleteMigrationError` says so and how to re-plug: the VM
runs either way, over the lower NIC.

Flags: always ``VIR_MIGRATE_LIVE``.  A persistent domain's definition moves
with it (``PERSIST_DEST | UNDEFINE_SOURCE``, as OpenStack does) so exactly
one host can start it again, with its ``<shmem>`` server path rewritten to
*dest_socket*; ``keep_source_definition`` keeps the source's copy.  A
transient domain stays transient.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import libvirt

from . import lv, plug, shmem
from .errors import (
    IncompleteMigrationError,
    IvloopLibvirtError,
    MigrationError,
    RequestError,
)
from .shmem import DEFAULT_NAME, FoundShmem

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]
# Called with the domain and the time.monotonic() at which the phase began;
# returns the seconds from then until the guests switched path, None if unknown.
SwitchWait = Callable[[lv.Domain, float], float | None]

DEFAULT_TIMEOUT = 300.0
PROGRESS_INTERVAL = 0.5
ABORT_GRACE = 30.0  # how long a job may take to end after abortJob()


@dataclass
class MigrationReport:
    domain: str
    source: str
    destination: str
    ok: bool = False
    failed_phase: str = ""  # "", "check", "unplug", "migrate", "plug"
    error: str = ""
    hint: str = ""  # what an operator does next when the VM is not on shared memory
    flags: list[str] = field(default_factory=list)
    source_socket: str | None = None
    dest_socket: str | None = None
    # After a failure: the source runs and has its device again.
    source_restored: bool | None = None
    total_s: float = 0.0  # wall clock, unplug start to plug end
    unplug_s: float = 0.0
    migrate_s: float = 0.0  # the migrate3 call
    plug_s: float = 0.0
    downtime_ms: float | None = None  # libvirt's completed-job statistics
    job_ms: float | None = None  # libvirt's time_elapsed for the job
    setup_ms: float | None = None
    transferred_mib: float = 0.0
    # From the caller's hooks: unplug/plug start until the peers switched.
    switch_source_s: float | None = None
    switch_dest_s: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FLAG_NAMES = ("VIR_MIGRATE_LIVE", "VIR_MIGRATE_PERSIST_DEST", "VIR_MIGRATE_UNDEFINE_SOURCE",
              "VIR_MIGRATE_PEER2PEER", "VIR_MIGRATE_TUNNELLED", "VIR_MIGRATE_AUTO_CONVERGE",
              "VIR_MIGRATE_COMPRESSED", "VIR_MIGRATE_PAUSED", "VIR_MIGRATE_POSTCOPY")


def flag_names(flags: int) -> list[str]:
    return [n for n in FLAG_NAMES if flags & lv.flag(n)]


def migration_flags(dom: lv.Domain, *, keep_source_definition: bool = False) -> int:
    """LIVE; for a persistent domain also PERSIST_DEST and (unless kept) UNDEFINE_SOURCE."""
    flags = libvirt.VIR_MIGRATE_LIVE
    if dom.isPersistent():
        flags |= libvirt.VIR_MIGRATE_PERSIST_DEST
        if not keep_source_definition:
            flags |= libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    return int(flags)


def persistent_xml_for(dom: lv.Domain, name: str, dest_socket: str) -> str | None:
    """The source's definition with the device's server on *dest_socket*; None if unchanged."""
    if not dom.isPersistent():
        return None
    try:
        xml = str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
                              | libvirt.VIR_DOMAIN_XML_MIGRATABLE))
    except libvirt.libvirtError as exc:
        raise lv.translate(exc, f"reading {lv.safe_name(dom)}'s definition") from exc
    root = ET.fromstring(xml)
    changed = False
    for el in root.findall("./devices/shmem"):
        server = el.find("server")
        if el.get("name") == name and server is not None and server.get("path") != dest_socket:
            server.set("path", dest_socket)
            changed = True
    return ET.tostring(root, encoding="unicode") if changed else None


def _call_hook(hook: SwitchWait | None, dom: lv.Domain, since: float, what: str) -> float | None:
    if hook is None:
        return None
    try:
        return hook(dom, since)
    except Exception as exc:  # a measurement must not undo a migration
        log.warning("%s: path switch not observed: %s", what, exc)
        return None


def _stats(dom: lv.Domain, flags: int) -> dict[str, Any]:
    try:
        return dict(dom.jobStats(flags))
    except libvirt.libvirtError:
        return {}


class _Job:
    """virDomainMigrate3 in a thread, so this one can report progress and abort it."""

    def __init__(self, dom: lv.Domain, dconn: lv.Connection, params: dict[str, Any],
                 flags: int) -> None:
        self.dom = dom
        self.result: lv.Domain | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, args=(dconn, params, flags),
                                       name=f"migrate-{lv.safe_name(dom)}", daemon=True)

    def _work(self, dconn: lv.Connection, params: dict[str, Any], flags: int) -> None:
        try:
            self.result = self.dom.migrate3(dconn, params, flags)
        except BaseException as exc:  # handed to the waiting thread
            self.error = exc

    def abort(self, why: str) -> None:
        log.error("%s: aborting the migration job: %s", lv.safe_name(self.dom), why)
        try:
            self.dom.abortJob()
        except libvirt.libvirtError as exc:
            log.warning("abortJob: %s", lv.error_text(exc))
        self.thread.join(ABORT_GRACE)

    def run(self, timeout: float, say: Progress, t0: float) -> lv.Domain:
        self.thread.start()
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            while True:
                self.thread.join(PROGRESS_INTERVAL)
                if not self.thread.is_alive():
                    break
                if time.monotonic() >= deadline:
                    timed_out = True
                    self.abort(f"not complete within {timeout:g} s")
                    break
                st = _stats(self.dom, 0)
                say("transfer", {"status": "active",
                                 "mib": st.get("data_processed", 0) / 2**20,
                                 "remaining_mib": st.get("data_remaining", 0) / 2**20,
                                 "t": time.monotonic() - t0})
        except BaseException:
            if self.thread.is_alive():
                self.abort("interrupted")
            raise
        if self.thread.is_alive():
            raise IvloopLibvirtError("the migration job did not end after it was aborted")
        if timed_out and self.result is None:
            raise IvloopLibvirtError(
                f"migration did not complete within {timeout:g} s (aborted); raise --timeout "
                "or --max-bandwidth, or quiesce the guest")
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise IvloopLibvirtError("libvirt returned no domain on the destination")
        return self.result


def migrate(dom: lv.Domain, dconn: lv.Connection, *, migrate_uri: str | None = None,
            dest_socket: str | None = None, name: str = DEFAULT_NAME,
            timeout: float = DEFAULT_TIMEOUT, max_bandwidth_mib: int | None = None,
            keep_source_definition: bool = False, extra_flags: int = 0,
            params: Mapping[str, Any] | None = None,
            unplug_timeout: float = plug.UNPLUG_TIMEOUT,
            progress: Progress | None = None, switch_source: SwitchWait | None = None,
            switch_dest: SwitchWait | None = None) -> MigrationReport:
    """Move *dom* to the host behind *dconn*; see the module docstring.

    *migrate_uri* is libvirt's ``migrate_uri`` (``tcp://host:port`` for the
    QEMU stream), *params* more ``VIR_MIGRATE_PARAM_*`` entries.  Returns the
    report (``ok`` True); raises :class:`RequestError` (nothing changed),
    :class:`MigrationError` (rolled back) or
    :class:`IncompleteMigrationError`; each carries the report.
    """
    say: Progress = progress or (lambda phase, info: None)
    sconn = dom.connect()
    dname = lv.safe_name(dom)
    report = MigrationReport(domain=dname, source=lv.uri_of(sconn),
                             destination=lv.uri_of(dconn))
    t0 = time.monotonic()

    def mark(what: str) -> None:
        report.events.append((round(time.monotonic() - t0, 3), what))
        say(what, {"t": time.monotonic() - t0})

    # -- check: nothing changes before this passes
    lv.require_running(dom, f"migrating {dname}")
    src_uuid, dst_uuid = lv.host_uuid(sconn), lv.host_uuid(dconn)
    if src_uuid and src_uuid == dst_uuid:
        raise RequestError(
            f"{report.source} and {report.destination} report the same host UUID {src_uuid}: "
            "the same libvirtd, or hosts cloned without a host_uuid of their own in "
            "libvirtd.conf")
    uuid = dom.UUIDString()
    with contextlib.suppress(libvirt.libvirtError):
        if dconn.lookupByUUIDString(uuid).isActive():
            raise RequestError(f"{dname} is already running on {report.destination}")
    found = shmem.find_shmem(lv.live_xml(dom), name)
    if found is None:
        log.warning("%s has no ivloop device %s: migrating without one, none plugged on %s",
                    dname, name, report.destination)
    socket = dest_socket or (found.device.socket if found else None)
    report.source_socket = found.device.socket if found else None
    report.dest_socket = socket
    flags = migration_flags(dom, keep_source_definition=keep_source_definition) | extra_flags
    report.flags = flag_names(flags)
    mparams: dict[str, Any] = dict(params or {})
    if migrate_uri:
        mparams[libvirt.VIR_MIGRATE_PARAM_URI] = migrate_uri
    if max_bandwidth_mib:
        mparams[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(max_bandwidth_mib)
    if socket and flags & libvirt.VIR_MIGRATE_PERSIST_DEST:
        persist = persistent_xml_for(dom, name, socket)
        if persist is not None:
            mparams.setdefault(libvirt.VIR_MIGRATE_PARAM_PERSIST_XML, persist)
    was_paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED

    phase = "unplug"
    ddom: lv.Domain | None = None
    try:
        if found is not None:
            mark("unplug on source")
            t = time.monotonic()
            gone = plug.unplug(dom, name=name, timeout=unplug_timeout)
            report.unplug_s = gone.seconds
            mark("source left the shared region")
            report.switch_source_s = _call_hook(switch_source, dom, t, dname)
        phase = "migrate"
        mark(f"migrate to {report.destination}")
        t = time.monotonic()
        ddom = _Job(dom, dconn, mparams, flags).run(timeout, say, t0)
        report.migrate_s = time.monotonic() - t
        mark("migration completed")
    except BaseException as exc:  # roll back on every path, then re-raise
        report.failed_phase = phase
        report.error = "interrupted" if isinstance(exc, KeyboardInterrupt) else lv.error_text(exc)
        log.error("%s: migration to %s failed in phase %s: %s; keeping the source",
                  dname, report.destination, phase, report.error)
        restored = _roll_back(sconn, dconn, uuid, found=found, was_paused=was_paused,
                              report=report)
        report.total_s = time.monotonic() - t0
        if not isinstance(exc, Exception):
            raise
        if restored:
            raise MigrationError(f"{dname} stays on {report.source}: {phase} failed: "
                                 f"{report.error}", report) from exc
        raise IncompleteMigrationError(f"{dname}: {phase} failed: {report.error}; "
                                       f"{report.hint}", report) from exc

    stats = _stats(ddom, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) \
        or _stats(dom, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    if "downtime" in stats:
        report.downtime_ms = float(stats["downtime"])
    if "time_elapsed" in stats:
        report.job_ms = float(stats["time_elapsed"])
    if "setup_time" in stats:
        report.setup_ms = float(stats["setup_time"])
    report.transferred_mib = float(stats.get("data_processed",
                                             stats.get("memory_processed", 0))) / 2**20

    if found is not None and socket is not None:
        report.failed_phase = "plug"
        mark(f"plug on {report.destination}")
        t = time.monotonic()
        try:
            report.plug_s = plug.attach(ddom, found.attach_xml(socket), socket, name=name)
        except IvloopLibvirtError as exc:
            report.error = str(exc)
            report.hint = (f"once that host's server is fixed: ivloop-libvirt plug {dname} "
                           f"--connect '{report.destination}' --socket {socket}")
            report.total_s = time.monotonic() - t0
            raise IncompleteMigrationError(
                f"{dname} moved to {report.destination} but runs there without shared memory "
                f"(over its lower NIC): {exc}", report) from exc
        mark("destination plugged")
        report.switch_dest_s = _call_hook(switch_dest, ddom, t, dname)
        if report.switch_dest_s is not None:
            mark("peers on the destination use shared memory")
    report.failed_phase = ""
    report.ok = True
    report.total_s = time.monotonic() - t0
    return report


def _roll_back(sconn: lv.Connection, dconn: lv.Connection, uuid: str, *,
               found: FoundShmem | None, was_paused: bool, report: MigrationReport) -> bool:
    """Source running with its device again; False (and report.hint) if not."""
    try:
        src = sconn.lookupByUUIDString(uuid)
        alive = lv.is_running(src)
    except libvirt.libvirtError:
        src, alive = None, False
    if src is None or not alive:
        moved = False
        with contextlib.suppress(libvirt.libvirtError):
            moved = bool(dconn.lookupByUUIDString(uuid).isActive())
        report.source_restored = False
        if moved:
            report.hint = (
                f"the domain runs on {report.destination} without its ivloop device: "
                f"ivloop-libvirt plug {report.domain} --connect '{report.destination}'"
                + (f" --socket {report.dest_socket}" if report.dest_socket else ""))
        else:
            report.hint = (
                f"the source domain is no longer running on {report.source} and not running "
                f"on {report.destination} either; check `virsh list --all` on both")
        log.error("%s: %s", report.domain, report.hint)
        return False
    try:
        # libvirt resumes a source whose migration failed; an aborted job or
        # a lost destination daemon can still leave it paused.
        if src.state()[0] == libvirt.VIR_DOMAIN_PAUSED and not was_paused:
            src.resume()
            log.info("%s: resumed on the source", report.domain)
        if found is not None and shmem.find_shmem(lv.live_xml(src), found.device.name) is None:
            plug.attach(src, found.attach_xml(), found.device.socket, name=found.device.name)
            log.info("%s: ivloop device back on the source", report.domain)
    except (libvirt.libvirtError, IvloopLibvirtError) as exc:
        report.source_restored = False
        report.hint = (
            f"the source keeps running but without shared memory ({lv.error_text(exc)}); "
            f"ivloop-libvirt plug {report.domain} --connect '{report.source}'"
            + (f" --socket {found.device.socket}" if found else ""))
        log.error("%s: %s", report.domain, report.hint)
        return False
    report.source_restored = True
    return True


def migrate_by_name(domain: str, to_uri: str, *, connect_uri: str | None = None,
                      **kwargs: Any) -> MigrationReport:
    """:func:`migrate` by names: open both connections, look the domain up, close them."""
    sconn = lv.connect(connect_uri)
    try:
        dom = lv.lookup(sconn, domain)
        dconn = lv.connect(to_uri)
        try:
            return migrate(dom, dconn, **kwargs)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                dconn.close()
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            sconn.close()
