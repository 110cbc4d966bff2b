"""One ivloop-server per simulated host, run inside the host's namespace."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from harness.errors import LaunchError
from harness.lab import procs
from harness.lab.state import ProcRecord

log = logging.getLogger(__name__)


def start(netns: str, sock: Path, logfile: Path, *, size: str, max_peers: int,
          timeout: float = 15) -> ProcRecord:
    """Start ivloop-server for one host; return once its socket accepts."""
    argv = [
        "ip", "netns", "exec", netns, sys.executable, "-m", "ivloop_server",
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
