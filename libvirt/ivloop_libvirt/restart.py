"""Restart a host's ivloop-server and re-plug every running domain that uses it.

ivloop-server gives out 16-bit peer IDs and retires the IDs of QEMUs it cut
off, and a region cannot be handed from one server process to the next, so
the way out of an exhausted or broken server is a new one with every guest
re-joining it:

1. unplug the device from each running domain whose ``<shmem>`` uses this
   socket (the guests leave cleanly and fall back to their lower NIC);
2. run the operator's restart command (``systemctl restart ivloop-server``:
   how the server runs on a host is the operator's choice, so this package
   does not start one itself); without a command, just re-plug against the
   server that is running now (after systemd restarted a crashed one);
3. wait until the socket is a new one (its inode changed), when the path is
   visible from here; a ``Type=notify`` unit is ready when systemctl returns;
4. plug the device back into each domain unplugged in step 1, at the same
   address.

Each domain's result is in the report; one failing domain does not stop
the others.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import time
from collections.abc import Sequence

import libvirt

from . import lv, plug, shmem
from .errors import IvloopLibvirtError, ServerRestartError
from .flow import Progress
from .reports import DomainResult, RestartReport
from .shmem import DEFAULT_NAME, FoundShmem

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 120.0
SOCKET_WAIT = 30.0



def users_of(conn: lv.Connection, socket: str, name: str = DEFAULT_NAME
             ) -> list[tuple[lv.Domain, FoundShmem]]:
    """Running domains on *conn* whose ivloop device *name* uses *socket*."""
    try:
        doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    except libvirt.libvirtError as exc:
        raise lv.translate(exc, "listing the running domains", lv.uri_of(conn)) from exc
    users = []
    for dom in doms:
        found = shmem.find_shmem(lv.live_xml(dom), name)
        if found is not None and os.path.normpath(found.device.socket) == \
                os.path.normpath(socket):
            users.append((dom, found))
    return sorted(users, key=lambda u: lv.safe_name(u[0]))


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def _wait_new_socket(path: str, before: tuple[int, int] | None, timeout: float) -> None:
    """Until *path* is a socket other than *before*; a warning if it never becomes one."""
    deadline = time.monotonic() + timeout
    while True:
        now = _inode(path)
        if now is not None and now != before:
            return
        if time.monotonic() >= deadline:
            log.warning("%s is %s after %.0f s; plugging anyway", path,
                        "still the old socket" if now else "not a socket", timeout)
            return
        time.sleep(0.05)


def server_restart(conn: lv.Connection, socket: str = shmem.DEFAULT_SOCKET, *,
                   command: Sequence[str] | None = None, name: str = DEFAULT_NAME,
                   command_timeout: float = COMMAND_TIMEOUT, socket_wait: float = SOCKET_WAIT,
                   unplug_timeout: float = plug.UNPLUG_TIMEOUT,
                   progress: Progress | None = None) -> RestartReport:
    """Unplug every user of *socket*, run *command*, plug them all again.

    Returns the report with ``ok`` True, or raises :class:`ServerRestartError`
    carrying it.  *socket_wait* 0 skips waiting for a new socket (a remote
    *conn*: the path is not visible here).
    """
    say: Progress = progress or (lambda what, info: None)
    report = RestartReport(socket=socket, command=list(command or []))
    users = users_of(conn, socket, name)
    results = {lv.safe_name(d): DomainResult(lv.safe_name(d)) for d, _ in users}
    report.domains = list(results.values())
    unplugged: list[tuple[lv.Domain, FoundShmem]] = []
    for dom, found in users:
        r = results[lv.safe_name(dom)]
        say("unplug", {"domain": r.domain})
        try:
            plug.unplug(dom, name=name, timeout=unplug_timeout)
        except IvloopLibvirtError as exc:
            r.error = f"unplug: {exc}"
            log.error("%s", r.error)
            continue
        r.unplugged = True
        unplugged.append((dom, found))

    before = _inode(socket)
    if command:
        say("restart", {"command": list(command)})
        try:
            proc = subprocess.run(list(command), capture_output=True, text=True, check=False,
                                  timeout=command_timeout)
            report.command_status = proc.returncode
            report.command_output = (proc.stdout + proc.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            report.command_output = str(exc)
        if report.command_status != 0:
            log.error("server restart command %s failed (%s): %s", list(command),
                      report.command_status, report.command_output)
        elif socket_wait > 0:
            _wait_new_socket(socket, before, socket_wait)

    for dom, found in unplugged:
        r = results[lv.safe_name(dom)]
        say("plug", {"domain": r.domain})
        try:
            plug.attach(dom, found.attach_xml(), socket, name=name)
        except IvloopLibvirtError as exc:
            r.error = f"plug: {exc}"
            log.error("%s", r.error)
            continue
        r.plugged = True

    failed = [r for r in report.domains if not r.plugged]
    command_failed = bool(command) and report.command_status != 0
    report.ok = not failed and not command_failed
    if not report.ok:
        parts = []
        if command_failed:
            tail = report.command_output.splitlines()[-1:] or ["no output"]
            parts.append(f"the restart command failed ({report.command_status}): {tail[0]}")
        if failed:
            parts.append("not re-plugged: " + ", ".join(f"{r.domain} ({r.error})"
                                                        for r in failed))
        raise ServerRestartError("; ".join(parts), report)
    return report
