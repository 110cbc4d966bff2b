"""The service manager's notification protocol (sd_notify), spoken directly.

A service started by systemd with ``Type=notify`` finds the manager's
datagram socket in ``$NOTIFY_SOCKET``: a path, or an abstract socket name
written with a leading ``@``.  Each notification is one datagram of
newline-separated ``KEY=VALUE`` lines: ``READY=1`` once the service does
its job (here: the socket accepts connections), ``STOPPING=1`` when it
begins to shut down, ``RELOADING=1`` around a reload, ``STATUS=...`` a line
``systemctl status`` shows, ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC``
when the unit has ``WatchdogSec=``, ``MAINPID=`` when the process that
serves is not the one systemd started.

Without ``$NOTIFY_SOCKET`` every call does nothing.  A notification that
cannot be sent is logged once and never stops the server: the manager
alone suffers from a lost datagram (a start timeout), and says so.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import MutableMapping
from typing import Final

log = logging.getLogger(__name__)

#: What systemd reads at most per datagram is far more; our lines are short.
_MAX_STATUS: Final = 400


def parse_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a socket address; None if it is not AF_UNIX."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None  # e.g. "vsock:..." (systemd 253+): not spoken here


class Notifier:
    """Sends notifications to the service manager, if there is one.

    :meth:`from_environ` reads ``$NOTIFY_SOCKET`` (and the watchdog's
    ``$WATCHDOG_USEC``/``$WATCHDOG_PID``) and removes them from the
    environment, as ``sd_notify(unset_environment=1)`` does, so that no
    child process talks to the manager in the server's name.
    """

    def __init__(self, address: str | bytes | None, *, watchdog_usec: int = 0,
                 description: str = "", fdstore_max: int = 0) -> None:  # fmt: skip
        self.address = address
        self.description = description
        #: Descriptors the unit's store may hold (``$FDSTORE``: systemd 254 and
        #: later set it from FileDescriptorStoreMax=; ivloop's units set it too).
        self.fdstore_max = fdstore_max if address is not None else 0
        #: Microseconds between the manager's watchdog deadlines (0: none).
        self.watchdog_usec = watchdog_usec if address is not None else 0
        self._sock: socket.socket | None = None
        self._failed = False
        self._last_status: str | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *,
                     unset: bool = True) -> Notifier:  # fmt: skip
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        usec_text = env.get("WATCHDOG_USEC", "")
        pid_text = env.get("WATCHDOG_PID", "")
        if unset:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        if not value:
            return cls(None)
        address = parse_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET=%s is not a UNIX socket path or @name; the service "
                        "manager will not hear from this server", value)  # fmt: skip
            return cls(None, description=value)
        fdstore_text = env.get("FDSTORE", "0")
        fdstore_max = int(fdstore_text) if fdstore_text.isdigit() else 0
        return cls(address, watchdog_usec=_watchdog_usec(usec_text, pid_text), description=value,
                   fdstore_max=fdstore_max)  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.address is not None and not self._failed

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; True if it was sent."""
        if self.address is None or self._failed:
            return False
        data = "\n".join(lines).encode() + b"\n"
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            self._failed = True
            log.warning("cannot notify the service manager at %s: %s; no further notifications",
                        self.description or self.address, exc.strerror or exc)  # fmt: skip
            self.close()
            return False
        return True

    def send_fds(self, lines: list[str], fds: list[int], timeout: float = 10.0) -> None:
        """Send ``lines`` with ``fds`` attached; OSError (or TimeoutError) if it fails.

        Unlike :meth:`notify`, a failure is the caller's to handle: a file
        descriptor that did not reach the store must not be counted on.
        """
        if self.address is None:
            raise OSError("no service manager (NOTIFY_SOCKET is not set)")
        data = "\n".join(lines).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            sock.sendmsg([data], rights, 0, self.address)

    def store_fd(self, name: str, fd: int) -> None:
        """Put ``fd`` in the unit's file-descriptor store as ``name`` (FDSTORE=1)."""
        self.send_fds(["FDSTORE=1", f"FDNAME={name}"], [fd])

    def remove_fd(self, name: str) -> None:
        """Take ``name`` out of the unit's file-descriptor store (FDSTOREREMOVE=1)."""
        self.send_fds(["FDSTOREREMOVE=1", f"FDNAME={name}"], [])

    def barrier(self, timeout: float = 10.0) -> None:
        """Return once the manager has handled every notification sent before.

        sd_notify_barrier(): the write end of a pipe goes with BARRIER=1 and
        the manager closes it after the earlier datagrams; POLLHUP on the
        read end says so.  TimeoutError if it does not come in ``timeout``.
        """
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                self.send_fds(["BARRIER=1"], [wfd], timeout)
            finally:
                os.close(wfd)
            poller = select.poll()
            poller.register(rfd, select.POLLHUP)
            if not poller.poll(int(timeout * 1000)):
                raise TimeoutError(f"the service manager did not answer BARRIER=1 in {timeout:g} s")
        finally:
            os.close(rfd)

    def ready(self, status: str | None = None, *, mainpid: int | None = None) -> bool:
        lines = ["READY=1"]
        if mainpid is not None:
            lines.append(f"MAINPID={mainpid}")
        if status is not None:
            lines.append(_status_line(status))
            self._last_status = status
        return self.notify(*lines)

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        """Send STATUS=text, unless it is the one sent last."""
        if text == self._last_status:
            return False
        self._last_status = text
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the deadline), None without one."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec > 0 else None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.split())[:_MAX_STATUS]


def _watchdog_usec(usec_text: str, pid_text: str) -> int:
    """The watchdog period meant for this process, 0 if none (sd_watchdog_enabled)."""
    try:
        usec = int(usec_text) if usec_text else 0
        if pid_text and int(pid_text) != os.getpid():
            return 0
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r / WATCHDOG_PID=%r: not numbers",
                    usec_text, pid_text)  # fmt: skip
        return 0
    return max(usec, 0)

