"""Running one server as a process: daemon, pidfile, readiness, signals.

:func:`serve` runs an :class:`~ivloop_server.server.IvshmemServer` until
SIGTERM or SIGINT (SIGHUP rereads the NIC map), writing and removing the
pidfile and reporting readiness through :class:`Readiness` (``--ready-fd``,
the process that started a daemon, the service manager via
:mod:`~ivloop_server.sdnotify`).  :func:`daemonize` forks into a daemon as
ivshmem-server does.  Nothing here prints: the daemon logs, and the
command line (:mod:`~ivloop_server.cli`) reports what fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError, IvloopServerError, PidfileError
from .nic import load_nic_map
from .sdnotify import Notifier
from .server import IvshmemServer, ServerConfig

# The package's logger, not this module's: the server's own messages have
# always been logged as "ivloop_server".
log = logging.getLogger("ivloop_server")

#: What the daemon's parent says when the daemon dies without a word.
_SILENT_DEATH = "the daemon exited before it accepted connections (its log, on stderr, says why)"


class DaemonStartError(IvloopServerError):
    """The daemon could not start; raised in the process that started it."""


# -- pidfile -----------------------------------------------------------------


def _pidfile_owner(path: Path) -> int | None:
    """PID of a running ivloop-server other than this process named by ``path``."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None  # gone (or not ours to see): a stale pidfile
    return pid if b"ivloop" in cmdline else None


def _write_pidfile(path: Path) -> None:
    owner = _pidfile_owner(path)
    if owner is not None:
        raise PidfileError(
            f"pidfile {path} names ivloop-server process {owner}, still running; stop it "
            "or choose another --pidfile"
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror or exc}") from exc


def _remove_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()


# -- readiness and the run loop ----------------------------------------------


class Readiness:
    """Whoever waits for the server to accept connections: --ready-fd, the
    process that started a daemon, the service manager (sd_notify)."""

    def __init__(self, fds: Sequence[int], notifier: Notifier, *, daemon_fd: int | None = None,
                 mainpid: int | None = None) -> None:  # fmt: skip
        self.fds = list(fds)
        self.notifier = notifier
        #: The pipe to the process that daemonized us (also in ``fds``).
        self.daemon_fd = daemon_fd
        self.mainpid = mainpid

    def ready(self, status: str) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.write(fd, b"READY\n")
            except OSError as exc:
                log.warning("cannot report readiness on fd %d: %s", fd, exc.strerror)
            finally:
                os.close(fd)
        self.daemon_fd = None
        self.notifier.ready(status, mainpid=self.mainpid)

    def failed(self, message: str) -> bool:
        """Report a start-up failure; True if the daemon's parent will print it."""
        self.notifier.notify(f"STATUS=failed: {' '.join(message.split())[:400]}")
        told = False
        if self.daemon_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.daemon_fd, f"ERROR {message}\n".encode())
                told = True
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)
        self.daemon_fd = None
        return told


async def serve(
    config: ServerConfig,
    pidfile: Path | None,
    ready_fd: int | None = None,
    nic_macs: Path | None = None,
    *,
    readiness: Readiness | None = None,
) -> None:
    """Run a server until SIGTERM or SIGINT; SIGHUP rereads the ``nic_macs`` file.

    Readiness (``ready_fd``, ``readiness``: the daemon's parent, sd_notify)
    is reported once connections are accepted and the pidfile is written.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = ["stop requested"]
    if readiness is None:
        readiness = Readiness([] if ready_fd is None else [ready_fd], Notifier(None))
    elif ready_fd is not None:
        readiness.fds.append(ready_fd)
    notifier = readiness.notifier
    server = IvshmemServer(config)
    watchdog: list[asyncio.TimerHandle] = []

    def on_signal(sig: signal.Signals) -> None:
        reason[0] = f"received {sig.name}"
        notifier.stopping(f"stopping: {reason[0]}, dropping {len(server.peers())} peers")
        stop.set()

    def on_hup() -> None:
        if nic_macs is None:
            log.info("SIGHUP: no --nic-macs file to reread", extra={"event": "reload"})
            return
        notifier.reloading()
        try:
            try:
                mapping = load_nic_map(nic_macs)
            except ConfigError as exc:
                log.error("SIGHUP: %s; keeping the previous map", exc,
                          extra={"event": "reload", "reason": str(exc)})  # fmt: skip
                return
            server.set_nic_map(mapping)
            log.info(
                "SIGHUP: reread %s: %d QEMUs mapped (applies to QEMUs that connect from now on)",
                nic_macs,
                len(mapping),
                extra={"event": "reload", "entries": len(mapping)},
            )
        finally:
            notifier.ready(server.status_text())

    def ping() -> None:
        notifier.watchdog()
        if interval is not None and not stop.is_set():
            watchdog[:] = [loop.call_later(interval, ping)]

    interval = notifier.watchdog_interval
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await server.start()
        if pidfile is not None:
            _write_pidfile(pidfile)

        def on_change() -> None:
            notifier.status(server.status_text())

        server.on_change = on_change
        readiness.ready(server.status_text())
        if interval is not None:
            ping()
        await stop.wait()
    finally:
        for handle in watchdog:
            handle.cancel()
        await server.stop(reason[0])
        if pidfile is not None:
            _remove_pidfile(pidfile)
        for sig in (*signals, signal.SIGHUP):
            loop.remove_signal_handler(sig)


# -- daemon ------------------------------------------------------------------


def daemonize() -> int | None:
    """Fork into a daemon, as ivshmem-server does without -F.

    The calling process waits until the daemon reports (through a pipe
    written by :class:`Readiness`): it gets None once the daemon accepts
    connections, :class:`DaemonStartError` (the daemon's one-line reason)
    if it could not start.  In the daemon -- the grandchild, in its own
    session, stdin and stdout on /dev/null, stderr kept for the log
    unless it is no file, working directory / -- it returns the pipe's
    fd, for ``Readiness.daemon_fd``.
    """
    rfd, wfd = os.pipe()
    child = os.fork()
    if child > 0:
        os.close(wfd)
        os.waitpid(child, 0)  # the session leader in between exits at once
        data = b""
        with os.fdopen(rfd, "rb") as pipe:
            data = pipe.read()
        if data.startswith(b"READY"):
            return None
        text = data.decode(errors="replace").strip()
        raise DaemonStartError(text[6:] if text.startswith("ERROR ") else _SILENT_DEATH)
    # Child: a new session, then a second fork so the daemon is no session
    # leader and can never get a controlling terminal back.
    os.close(rfd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if not stat.S_ISREG(os.fstat(2).st_mode):
        # A terminal or a pipe would tie the daemon to its caller (a shell's
        # $(...) or ssh would wait for it); the log goes to syslog instead.
        os.dup2(null, 2)
    os.close(null)
    return wfd
