"""One ivloop-server per simulated host, run inside the host's namespace
under a supervisor that keeps its descriptors across a hand-over.

By default the server is this harness's own (``python -m ivloop_server``
from the tree or the venv).  With ``$IVLOOP_SERVER_ROOT`` set, it is the
one the ``ivloop-host`` Debian package installed under that root: ``/``
for the machine's own installation, or a directory the package was
unpacked into (``dpkg-deb -x``), run by the system's Python with that
root's ``dist-packages`` -- the files the package ships, nothing of the tree.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from harness.errors import LaunchError, ServerBinaryError
from harness.lab import procs
from harness.lab.state import ProcRecord

log = logging.getLogger(__name__)

SERVER_ROOT_ENV = "IVLOOP_SERVER_ROOT"
#: Where the ivloop-host package puts the server and its Python package.
PACKAGED_BINARY = "usr/bin/ivloop-server"
PACKAGED_PYTHONPATH = "usr/lib/python3/dist-packages"


def server_command(environ: dict[str, str] | None = None) -> list[str]:
    """The command that runs ivloop-server: the harness's own, or a package's."""
    env = os.environ if environ is None else environ
    root = env.get(SERVER_ROOT_ENV)
    if not root:
        return [sys.executable, "-m", "ivloop_server"]
    binary = Path(root) / PACKAGED_BINARY
    if not binary.is_file():
        raise ServerBinaryError(f"${SERVER_ROOT_ENV}={root}: no {binary} (install the ivloop-host "
                            "package there, or unpack it: dpkg-deb -x ivloop-host_*.deb DIR)")
    if Path(root).resolve() == Path("/"):
        return [str(binary)]
    # The packaged script runs with the interpreter its #! names (the
    # system's python3), which finds the packaged modules on PYTHONPATH.
    return ["env", f"PYTHONPATH={Path(root).resolve() / PACKAGED_PYTHONPATH}", str(binary)]


def start(netns: str, sock: Path, logfile: Path, pidfile: Path, *, size: str, max_peers: int,
          timeout: float = 15) -> tuple[ProcRecord, ProcRecord]:
    """Start ivloop-server for one host under its fd-store supervisor; return once it is
    READY, with the records of (the server, the supervisor).

    The supervisor (:mod:`harness.lab.fdstore`) is to the server what
    systemd is to the packaged unit, so that ``hand_over`` works here too.
    """
    pidfile.unlink(missing_ok=True)
    argv = [
        "ip", "netns", "exec", netns,
        sys.executable, "-m", "harness.lab.fdstore", "--pidfile", str(pidfile), "--",
        *server_command(),
        "--socket", str(sock), "--size", size, "--max-peers", str(max_peers),
        "--vectors", "2", "--log-format", "json",
    ]  # fmt: skip
    pid = procs.spawn_detached(argv, logfile)
    supervisor = ProcRecord.of(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = procs.exit_status(pid)
        if code is not None:
            raise LaunchError("ivloop-server exited during start-up", argv, code,
                              logfile.read_text(errors="replace"))
        server = _ready_pid(pidfile)
        if server is not None:
            log.info("ivloop-server for %s listening on %s (pid %d)", netns, sock, server.pid)
            return server, supervisor
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    procs.reap(pid)
    raise LaunchError(f"ivloop-server did not say READY within {timeout:.0f} s", argv, None,
                      logfile.read_text(errors="replace"))


def _ready_pid(pidfile: Path) -> ProcRecord | None:
    """The server the supervisor last saw READY (its pidfile), if that one runs."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    record = ProcRecord.of(pid)
    return record if record.alive() else None


def hand_over(server: ProcRecord, supervisor: ProcRecord, pidfile: Path,
              timeout: float = 15) -> ProcRecord:  # fmt: skip
    """Have ``server`` hand its region and members over to a new server (SIGUSR2); the
    new server's record, once it is READY."""
    if not server.alive() or not supervisor.alive():
        raise LaunchError("no running ivloop-server under its supervisor to hand over",
                          [], None, "")  # fmt: skip
    os.kill(server.pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = _ready_pid(pidfile)
        if new is not None and new.pid != server.pid:
            return new
        if not supervisor.alive():
            break
        time.sleep(0.05)
    raise LaunchError("ivloop-server did not hand over (its log says why)", [], None, "")
