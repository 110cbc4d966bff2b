"""One ivloop-server per simulated host, run inside the host's namespace."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

from .errors import LaunchError
from .state import ProcRecord

log = logging.getLogger(__name__)


def start(netns: str, sock: Path, logfile: Path, *, size: str, max_peers: int,
          timeout: float = 15) -> ProcRecord:
    """Start ivloop-server for one host; return once its socket accepts."""
    argv = [
        "ip", "netns", "exec", netns, sys.executable, "-m", "ivloop_server",
        "--socket", str(sock), "--size", size, "--max-peers", str(max_peers),
        "--vectors", "2", "--log-format", "json",
    ]  # fmt: skip
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    record = ProcRecord.of(proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise LaunchError("ivloop-server exited during start-up", argv, code,
                              logfile.read_text(errors="replace"))
        # The server binds and listens in one step; a test connection would
        # count as a peer joining, so the socket's presence is the signal.
        if sock.exists():
            log.info("ivloop-server for %s listening on %s (pid %d)", netns, sock, proc.pid)
            return record
        time.sleep(0.05)
    proc.kill()
    raise LaunchError(f"ivloop-server did not listen within {timeout:.0f} s", argv, None,
                      logfile.read_text(errors="replace"))
