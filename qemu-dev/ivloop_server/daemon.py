"""Running one server as a process: daemon, pidfile, readiness, signals.

:func:`serve` runs an :class:`~ivloop_server.server.IvshmemServer` until
SIGTERM or SIGINT (SIGHUP rereads the NIC map; SIGUSR2 hands the region and
its members over to the next server process, :mod:`~ivloop_server.handoff`,
and ends this one; a server started with handed-over descriptors takes
them over), writing and removing the
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

from . import handoff
from .errors import ConfigError, HandOffError, IvloopServerError, PidfileError, StateError
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


async def _start(server: IvshmemServer, notifier: Notifier) -> None:
    """Start ``server``: take over what a previous process handed over, if it did."""
    fds = handoff.inherited()
    if not fds:
        await server.start()
        return
    names = list(fds)
    try:
        state = handoff.load(fds)
        why = server.mismatch(state)
        if why is None:
            await server.resume(state, fds)
            return
        # Serve the old region just long enough to drop its members in order
        # (each guest falls back to the lower path), then make the new one.
        log.error("the configuration changed (%s): dropping the %d peers handed over and "
                  "starting a new region; re-plug the VMs (ivloop-libvirt server-restart)",
                  why, len(state.peers), extra={"event": "resume_failed", "reason": why})
        old = IvshmemServer(server.config_of(state))
        await old.resume(state, fds)
        await old.stop("the server's configuration changed across the hand-over")
    except HandOffError as exc:
        handoff.close_all(fds)
        log.error("cannot take over from the previous server process: %s; starting with a new "
                  "region (running VMs must be re-plugged: ivloop-libvirt server-restart)", exc,
                  extra={"event": "resume_failed", "reason": str(exc)})  # fmt: skip
    finally:
        # From here on the server alone holds them: a member it drops sees EOF.
        handoff.unstore(notifier, names)
    await server.start()


async def serve(
    config: ServerConfig,
    pidfile: Path | None,
    ready_fd: int | None = None,
    nic_macs: Path | None = None,
    *,
    readiness: Readiness | None = None,
) -> bool:
    """Run a server until SIGTERM or SIGINT, or until it hands over (SIGUSR2); SIGHUP
    rereads the ``nic_macs`` file.  True if it handed over.

    Readiness (``ready_fd``, ``readiness``: the daemon's parent, sd_notify)
    is reported once connections are accepted and the pidfile is written.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = ["stop requested"]
    handed_off = [False]
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

    def on_hand_off() -> None:
        if stop.is_set():
            return
        nr_peers = len(server.peers())
        try:
            leavings = server.hand_off()
            handoff.store(notifier, leavings)
        except (HandOffError, StateError) as exc:
            log.error("SIGUSR2: cannot hand over: %s; still serving", exc,
                      extra={"event": "hand_off_failed", "reason": str(exc)})  # fmt: skip
            return
        log.info("SIGUSR2: region, socket and %d peers are in the service manager's store "
                 "for the next server process", nr_peers,
                 extra={"event": "hand_off", "peers": nr_peers, "fds": len(leavings.fds) + 1})
        notifier.status(f"handing {nr_peers} peers over to the next server process")
        server.detach()
        handed_off[0] = True
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
    loop.add_signal_handler(signal.SIGUSR2, on_hand_off)
    try:
        await _start(server, notifier)
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
        for sig in (*signals, signal.SIGHUP, signal.SIGUSR2):
            loop.remove_signal_handler(sig)
    return handed_off[0]


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
