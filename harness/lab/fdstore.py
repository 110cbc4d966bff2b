"""A service manager for one ivloop-server, as systemd is for its unit.

The lab has no systemd as PID 1, yet its servers should hand over as the
packaged unit's does (``harness server-restart HOST --hand-over``).  This
supervisor gives one server what the unit gives it:

- a notification socket (``NOTIFY_SOCKET``): READY=1 makes it write the
  server's PID to ``--pidfile`` (the harness waits for that);
- a file-descriptor store (``FDSTORE=1``/``FDNAME=``, ``FDSTOREREMOVE=1``,
  ``BARRIER=1``), of ``FDSTORE`` entries at most, as
  ``FileDescriptorStoreMax=`` in the unit;
- ``RestartForceExitStatus=75``: a server that exits 75 has handed over,
  and is started again at once with the store's descriptors from fd 3 on
  (``LISTEN_FDS``, ``LISTEN_FDNAMES``, ``LISTEN_PID``).

Any other exit of the server ends the supervisor with the same status, so
a killed server is gone as it was without one.  SIGTERM, SIGINT and SIGUSR2
are passed on to the server; the server dies with the supervisor
(PR_SET_PDEATHSIG).  Run inside the host's namespace::

    python -m harness.lab.fdstore --pidfile FILE -- ivloop-server ARGS...
"""

from __future__ import annotations

import argparse
import array
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Final

log = logging.getLogger("harness.fdstore")

EXIT_HANDED_OFF: Final = 75
STORE_MAX: Final = 4163  # as the packaged unit's FileDescriptorStoreMax=
_MAX_FDS: Final = 253  # SCM_MAX_FD


def read_notification(sock: socket.socket) -> tuple[dict[str, str], list[int]] | None:
    """One datagram from a notification socket: its KEY=VALUE lines and the descriptors
    it carried; None if none is waiting (a non-blocking socket) or the wait timed out."""
    try:
        data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(_MAX_FDS * 4))
    except (BlockingIOError, TimeoutError):
        return None
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % 4])
            fds.extend(got)
    fields = dict(line.split("=", 1) for line in data.decode(errors="replace").splitlines()
                  if "=" in line)  # fmt: skip
    return fields, fds


class FdStore:
    """A unit's file-descriptor store: what FDSTORE=1, FDSTOREREMOVE=1 and BARRIER=1 do."""

    def __init__(self, limit: int = STORE_MAX) -> None:
        self.limit = limit
        #: name -> fd, in the order stored (the order of LISTEN_FDNAMES).
        self.fds: dict[str, int] = {}
        #: Names refused because the store was full.
        self.dropped: list[str] = []

    def apply(self, fields: dict[str, str], fds: list[int]) -> None:
        """Act on one notification; every descriptor it carried is kept or closed."""
        if fields.get("FDSTORE") == "1":
            name = fields.get("FDNAME", "stored")
            for fd in fds:
                old = self.fds.pop(name, None)
                if old is not None:
                    os.close(old)
                if len(self.fds) >= self.limit:
                    log.warning("store full: dropping %s", name)
                    self.dropped.append(name)
                    os.close(fd)
                else:
                    self.fds[name] = fd
            fds = []
        elif fields.get("FDSTOREREMOVE") == "1":
            old = self.fds.pop(fields.get("FDNAME", ""), None)
            if old is not None:
                os.close(old)
        for fd in fds:  # BARRIER=1's pipe (closing it answers), or anything unasked for
            os.close(fd)

    def listen_env(self) -> dict[str, str]:
        """LISTEN_FDS and LISTEN_FDNAMES for the next process (LISTEN_PID is its own)."""
        if not self.fds:
            return {}
        return {"LISTEN_FDS": str(len(self.fds)), "LISTEN_FDNAMES": ":".join(self.fds)}

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


#: What systemd does between fork and exec, run as ``python -c`` in the new
#: process: the stored descriptors moved to 3, 4, ... (out of the way first),
#: the others closed, LISTEN_PID its own PID, and the process killed with
#: its parent (PR_SET_PDEATHSIG, 1), so a server never outlives whoever
#: started it.
_EXEC_WITH_FDS = """
import ctypes, fcntl, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]
for target, fd in enumerate(high, 3):
    os.dup2(fd, target)
    os.close(fd)
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)
if fds:
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


def exec_with_fds(argv: list[str], fds: list[int]) -> list[str]:
    """``argv`` started as systemd starts a unit with stored descriptors ``fds``
    (give the command to Popen with ``pass_fds=fds`` and LISTEN_FDS/LISTEN_FDNAMES)."""
    return [sys.executable, "-c", _EXEC_WITH_FDS, ",".join(map(str, fds)), *argv]


class Supervisor:
    def __init__(self, argv: list[str], pidfile: Path, store_max: int = STORE_MAX) -> None:
        self.argv = argv
        self.pidfile = pidfile
        # *.sock: what 'harness down' removes from the state directory.
        self.address = str(pidfile.with_suffix(".notify.sock"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.store = FdStore(store_max)
        self.proc: subprocess.Popen[bytes] | None = None
        self.child = 0
        self.restarts = 0

    # -- the server process -----------------------------------------------------

    def spawn(self) -> None:
        fds = list(self.store.fds.values())
        env = {**os.environ, "NOTIFY_SOCKET": self.address, "FDSTORE": str(self.store.limit)}
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
        env.update(self.store.listen_env())
        # stdin, stdout and stderr are the supervisor's: /dev/null and the log.
        self.proc = subprocess.Popen(exec_with_fds(self.argv, fds), env=env, pass_fds=fds)
        self.child = self.proc.pid
        log.info("started %s (pid %d) with %d stored descriptors", self.argv[0], self.child,
                 len(fds))  # fmt: skip

    # -- notifications ------------------------------------------------------------

    def drain(self) -> None:
        while (got := read_notification(self.sock)) is not None:
            fields, fds = got
            self.store.apply(fields, fds)
            if fields.get("READY") == "1":
                tmp = self.pidfile.with_name(f".{self.pidfile.name}.tmp")
                tmp.write_text(f"{self.child}\n")
                tmp.replace(self.pidfile)

    # -- the loop -------------------------------------------------------------------

    def run(self) -> int:
        def forward(sig: int, _frame: object) -> None:
            if self.child:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.child, sig)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            signal.signal(sig, forward)
        self.spawn()
        try:
            while True:
                select.select([self.sock], [], [], 0.1)
                self.drain()
                assert self.proc is not None
                code = self.proc.poll()
                if code is None:
                    continue
                self.drain()  # whatever it said before it went
                if code != EXIT_HANDED_OFF:
                    log.info("server pid %d exited with %d", self.child, code)
                    return code if code >= 0 else 128 - code
                self.restarts += 1
                log.info("server pid %d handed over (%d descriptors stored); starting the "
                         "next", self.child, len(self.store.fds))  # fmt: skip
                self.spawn()
        finally:
            self.close()

    def close(self) -> None:
        self.store.close()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.lab.fdstore",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--pidfile", type=Path, required=True,
                        help="written with the server's PID each time it says READY=1")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no server command after --")
    logging.basicConfig(level=logging.INFO, format="fdstore: %(message)s")
    try:
        supervisor = Supervisor(command, args.pidfile)
    except OSError as exc:
        print(f"fdstore: cannot bind the notification socket: {exc}", file=sys.stderr)
        return 1
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
