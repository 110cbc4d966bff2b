"""Live migration of a libvirt domain that has an ivloop device.

libvirt refuses to migrate a peer-mode shmem device, so the move runs
:mod:`ivloop_libvirt.flow` (the phases, timings and failure rules
``harness migrate`` uses too) with :class:`LibvirtMove`'s steps:

- ``check``: the domain runs, the destination answers and is another host
  (its host UUID differs), the domain is not already active there;
  a failure raises :class:`RequestError`.
- ``unplug``: detach the device live on the source, wait until the guest
  let it go.
- ``prepare``: nothing of ours: libvirt's own Prepare runs inside the
  migrate call.
- ``migrate``: ``virDomainMigrate3`` from this client to the destination
  connection (the ``virsh migrate`` flow without ``--p2p``: this process
  reaches both daemons, the source daemon need not reach the destination's).
  The job is aborted after *timeout*.  Downtime and the transfer come from
  the completed job's statistics (``VIR_DOMAIN_JOB_STATS_COMPLETED``).
- ``plug``: attach a new device on the destination, on *dest_socket*
  (default: the source's path) and at the same guest PCI address.
- ``finish``: nothing of ours: libvirt stops the source when the job
  completes.

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
from typing import Any

import libvirt

from . import flow, lv, plug, shmem
from .errors import IvloopLibvirtError, RequestError
from .flow import Completed, Progress
from .reports import MigrationReport
from .shmem import DEFAULT_NAME, FoundShmem

log = logging.getLogger(__name__)

# Called with the domain and the time.monotonic() at which unplug or plug
# began; returns the seconds from then until the guests switched path.
SwitchWait = Callable[[lv.Domain, float], float | None]

DEFAULT_TIMEOUT = 300.0
PROGRESS_INTERVAL = 0.5
ABORT_GRACE = 30.0  # how long a job may take to end after abortJob()


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


class LibvirtMove:
    """:class:`ivloop_libvirt.flow.Mover` for a domain, from its connection to *dconn*."""

    backend = "libvirt"

    def __init__(self, dom: lv.Domain, dconn: lv.Connection, *,
                 migrate_uri: str | None = None, dest_socket: str | None = None,
                 name: str = DEFAULT_NAME, max_bandwidth_mib: int | None = None,
                 keep_source_definition: bool = False, extra_flags: int = 0,
                 params: Mapping[str, Any] | None = None,
                 unplug_timeout: float = plug.UNPLUG_TIMEOUT) -> None:
        self.dom = dom
        self.dconn = dconn
        self.sconn = dom.connect()
        self.migrate_uri = migrate_uri
        self.name = name
        self.max_bandwidth_mib = max_bandwidth_mib
        self.keep_source_definition = keep_source_definition
        self.extra_flags = extra_flags
        self.params = dict(params or {})
        self.unplug_timeout = unplug_timeout
        self.dname = lv.safe_name(dom)
        self.report = MigrationReport(vm=self.dname, source=lv.uri_of(self.sconn),
                                      destination=lv.uri_of(dconn), backend=self.backend)
        self.report.dest_socket = dest_socket
        self.found: FoundShmem | None = None
        self.uuid = ""
        self.flags = 0
        self.mparams: dict[str, Any] = {}
        self.was_paused = False
        self.ddom: lv.Domain | None = None

    def check(self) -> None:
        rep = self.report
        lv.require_running(self.dom, f"migrating {self.dname}")
        src_uuid, dst_uuid = lv.host_uuid(self.sconn), lv.host_uuid(self.dconn)
        if src_uuid and src_uuid == dst_uuid:
            raise RequestError(
                f"{rep.source} and {rep.destination} report the same host UUID {src_uuid}: "
                "the same libvirtd, or hosts cloned without a host_uuid of their own in "
                "libvirtd.conf")
        self.uuid = self.dom.UUIDString()
        with contextlib.suppress(libvirt.libvirtError):
            if self.dconn.lookupByUUIDString(self.uuid).isActive():
                raise RequestError(f"{self.dname} is already running on {rep.destination}")
        self.found = shmem.find_shmem(lv.live_xml(self.dom), self.name)
        if self.found is None:
            log.warning("%s has no ivloop device %s: migrating without one, none plugged on %s",
                        self.dname, self.name, rep.destination)
        rep.source_socket = self.found.device.socket if self.found else None
        rep.dest_socket = rep.dest_socket or rep.source_socket
        self.flags = migration_flags(
            self.dom, keep_source_definition=self.keep_source_definition) | self.extra_flags
        rep.flags = flag_names(self.flags)
        self.mparams = dict(self.params)
        if self.migrate_uri:
            self.mparams[libvirt.VIR_MIGRATE_PARAM_URI] = self.migrate_uri
        if self.max_bandwidth_mib:
            self.mparams[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(self.max_bandwidth_mib)
        if rep.dest_socket and self.flags & libvirt.VIR_MIGRATE_PERSIST_DEST:
            persist = persistent_xml_for(self.dom, self.name, rep.dest_socket)
            if persist is not None:
                self.mparams.setdefault(libvirt.VIR_MIGRATE_PARAM_PERSIST_XML, persist)
        self.was_paused = self.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED

    def has_device(self) -> bool:
        return self.found is not None

    def unplug(self) -> None:
        plug.unplug(self.dom, name=self.name, timeout=self.unplug_timeout)

    def prepare(self) -> None:
        """libvirt's own Prepare runs inside virDomainMigrate3."""

    def migrate(self, timeout: float, say: Progress, t0: float) -> Completed:
        self.ddom = _Job(self.dom, self.dconn, self.mparams, self.flags).run(timeout, say, t0)
        stats = _stats(self.ddom, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) \
            or _stats(self.dom, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        done = Completed(transferred_mib=float(
            stats.get("data_processed", stats.get("memory_processed", 0))) / 2**20)
        if "downtime" in stats:
            done.downtime_ms = float(stats["downtime"])
        if "time_elapsed" in stats:
            done.job_ms = float(stats["time_elapsed"])
        if "setup_time" in stats:
            done.setup_ms = float(stats["setup_time"])
        return done

    def landed(self) -> bool:
        try:
            return bool(self.dconn.lookupByUUIDString(self.uuid).isActive())
        except libvirt.libvirtError:
            return False

    def plug(self) -> None:
        assert self.found is not None and self.report.dest_socket is not None
        if self.ddom is None:
            self.ddom = self.dconn.lookupByUUIDString(self.uuid)
        plug.attach(self.ddom, self.found.attach_xml(self.report.dest_socket),
                    self.report.dest_socket, name=self.name)

    def finish(self) -> None:
        """libvirt stopped the source when the job completed."""

    def plug_command(self) -> str:
        rep = self.report
        return (f"once that host's server is fixed: ivloop-libvirt plug {self.dname} "
                f"--connect '{rep.destination}'"
                + (f" --socket {rep.dest_socket}" if rep.dest_socket else ""))

    def roll_back(self) -> str:
        return _roll_back(self.sconn, self.dconn, self.uuid, found=self.found,
                          was_paused=self.was_paused, report=self.report)


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
    mover = LibvirtMove(dom, dconn, migrate_uri=migrate_uri, dest_socket=dest_socket,
                        name=name, max_bandwidth_mib=max_bandwidth_mib,
                        keep_source_definition=keep_source_definition,
                        extra_flags=extra_flags, params=params, unplug_timeout=unplug_timeout)

    def on_source(since: float) -> float | None:
        return switch_source(dom, since) if switch_source else None

    def on_dest(since: float) -> float | None:
        return switch_dest(mover.ddom, since) if switch_dest and mover.ddom else None
    return flow.run(mover, timeout=timeout, progress=progress,
                    switch_source=on_source, switch_dest=on_dest)


def _roll_back(sconn: lv.Connection, dconn: lv.Connection, uuid: str, *,
               found: FoundShmem | None, was_paused: bool, report: MigrationReport) -> str:
    """Source running with its device again: ""; else what an operator runs."""
    try:
        src = sconn.lookupByUUIDString(uuid)
        alive = lv.is_running(src)
    except libvirt.libvirtError:
        src, alive = None, False
    if src is None or not alive:
        moved = False
        with contextlib.suppress(libvirt.libvirtError):
            moved = bool(dconn.lookupByUUIDString(uuid).isActive())
        if moved:
            hint = (f"the domain runs on {report.destination} without its ivloop device: "
                    f"ivloop-libvirt plug {report.vm} --connect '{report.destination}'"
                    + (f" --socket {report.dest_socket}" if report.dest_socket else ""))
        else:
            hint = (f"the source domain is no longer running on {report.source} and not "
                    f"running on {report.destination} either; check `virsh list --all` on both")
        log.error("%s: %s", report.vm, hint)
        return hint
    try:
        # libvirt resumes a source whose migration failed; an aborted job or
        # a lost destination daemon can still leave it paused.
        if src.state()[0] == libvirt.VIR_DOMAIN_PAUSED and not was_paused:
            src.resume()
            log.info("%s: resumed on the source", report.vm)
        if found is not None and shmem.find_shmem(lv.live_xml(src), found.device.name) is None:
            plug.attach(src, found.attach_xml(), found.device.socket, name=found.device.name)
            log.info("%s: ivloop device back on the source", report.vm)
    except (libvirt.libvirtError, IvloopLibvirtError) as exc:
        hint = (f"the source keeps running but without shared memory ({lv.error_text(exc)}); "
                f"ivloop-libvirt plug {report.vm} --connect '{report.source}'"
                + (f" --socket {found.device.socket}" if found else ""))
        log.error("%s: %s", report.vm, hint)
        return hint
    return ""


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
