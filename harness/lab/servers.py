"""One ivloop-server per simulated host, run inside the host's namespace.

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


def start(netns: str, sock: Path, logfile: Path, *, size: str, max_peers: int,
          timeout: float = 15) -> ProcRecord:
    """Start ivloop-server for one host; return once its socket accepts."""
    argv = [
        "ip", "netns", "exec", netns, *server_command(),
        "--socket", str(sock), "--size", size, "--max-peers", str(max_peers),
        "--vectors", "2", "--log-format", "json",
    ]  # fmt: skip
    pid = procs.spawn_detached(argv, logfile)
    record = ProcRecord.of(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = procs.exit_status(pid)
        if code is not None:
            raise LaunchError("ivloop-server exited during start-up", argv, code,
                              logfile.read_text(errors="replace"))
        # The server binds and listens in one step; a test connection would
        # count as a peer joining, so the socket's presence is the signal.
        if sock.exists():
            log.info("ivloop-server for %s listening on %s (pid %d)", netns, sock, pid)
            return record
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    procs.reap(pid)
    raise LaunchError(f"ivloop-server did not listen within {timeout:.0f} s", argv, None,
                      logfile.read_text(errors="replace"))
