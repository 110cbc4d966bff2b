"""Park the fd numbers a TCG hot-unplug of ivshmem leaves behind.

After an ivshmem-doorbell device is hot-unplugged from a TCG guest, QEMU
(7.2, and upstream's hw/misc/ivshmem-pci.c still) keeps the fd handlers of
its vector eventfds registered although the fds are closed.  The next file
QEMU opens gets one of those numbers, and the stale handler fires on it:
checked on libvirt 9.0 / QEMU 7.2, plugging the device again (a rollback,
``server-restart``, ``plug`` after ``unplug``) killed QEMU ("Unable to read
from monitor: Connection reset by peer", domain log "reason=crashed").

The harness does the same over raw QMP: hand QEMU an eventfd (QMP
``getfd`` with the fd attached, here through libvirt's
``virDomainQemuMonitorCommandWithFiles``) for every freed number, so
QEMU's own lowest-free-number allocation fills exactly those holes and the
stale handlers watch harmless, never-signalled eventfds.  Only for domains
of type ``qemu`` (TCG: with KVM the vectors are irqfds) whose QEMU runs on
this machine (its ``/proc/PID/fd`` is the only way to see the numbers).
libvirt marks such a domain tainted ("custom-monitor").
"""

from __future__ import annotations

import logging
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from . import lv
from .fdholes import holes

log = logging.getLogger(__name__)

PROC = Path("/proc")


def wanted(domain_xml: str) -> bool:
    """True for a TCG domain (``<domain type='qemu'>``), where the stale handlers bite."""
    try:
        return ET.fromstring(domain_xml).get("type") == "qemu"
    except ET.ParseError:
        return False


def qemu_pid(uuid: str, proc: Path = PROC) -> int | None:
    """The PID of the local process whose command line has ``-uuid UUID``, or None."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == b"-uuid" and argv[i + 1].decode(errors="replace").lower() == uuid.lower():
                return int(entry.name)
    return None


def open_fds(pid: int, proc: Path = PROC) -> set[int]:
    try:
        return {int(n) for n in os.listdir(proc / str(pid) / "fd")}
    except OSError:
        return set()


Send = Callable[[int, str], None]  # hand fd to QEMU under a name


def park(pid: int, numbers: set[int], send: Send,
         fds_of: Callable[[int], set[int]] = open_fds) -> int:
    """Fill every free number in *numbers* (and the holes below) with an eventfd."""
    parked = 0
    stamp = time.monotonic_ns()
    for _ in holes(pid, numbers, fds_of):
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            send(fd, f"ivl-park-{stamp}-{parked}")
        finally:
            os.close(fd)
        parked += 1
    return parked


def monitor_sender(dom: lv.Domain) -> Send:
    """Send through libvirt: QMP ``getfd`` with the fd attached."""
    import libvirt_qemu  # noqa: PLC0415 (only where parking is needed)

    def send(fd: int, name: str) -> None:
        cmd = f'{{"execute": "getfd", "arguments": {{"fdname": "{name}"}}}}'
        libvirt_qemu.qemuMonitorCommandWithFiles(dom, cmd, [fd], 0)
    return send


class Parker:
    """Around one unplug: note QEMU's fds before, park the freed ones after."""

    def __init__(self, dom: lv.Domain, domain_xml: str, enabled: bool | None = None) -> None:
        self.dom = dom
        self.pid: int | None = None
        self.before: set[int] = set()
        if enabled is False or (enabled is None and not wanted(domain_xml)):
            return
        try:
            self.pid = qemu_pid(dom.UUIDString())
        except OSError:
            self.pid = None
        if self.pid is None:
            log.info("%s: its QEMU is not on this machine: freed fd numbers not parked "
                     "(a later plug of a TCG guest may crash QEMU 7.2)", lv.safe_name(dom))
            return
        self.before = open_fds(self.pid)

    def after_unplug(self) -> int:
        if self.pid is None:
            return 0
        try:
            n = park(self.pid, self.before - open_fds(self.pid), monitor_sender(self.dom))
        except Exception as exc:  # parking must not turn a done unplug into a failure
            log.warning("%s: could not park the fds the unplug freed: %s",
                        lv.safe_name(self.dom), lv.error_text(exc))
            return 0
        log.debug("QEMU pid %d: parked %d fds after unplugging ivshmem", self.pid, n)
        return n
