"""Detached processes: started here, owned by the state directory.

QEMU and ivloop-server must outlive the CLI call that started them, so they
are spawned in their own session without a Popen object (whose destructor
would complain that they still run).  Whoever stops them reaps them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from harness.errors import LaunchError


def spawn_detached(argv: list[str], logfile: Path) -> int:
    """Start *argv* in a new session with stdout/stderr appended to *logfile*."""
    exe = shutil.which(argv[0])
    if exe is None:
        raise LaunchError(f"{argv[0]} is not installed (run 'make deps')", argv, None, "")
    out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.posix_spawn(
            exe, argv, os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, out, 1),
                          (os.POSIX_SPAWN_DUP2, out, 2)],
            setsid=True,
        )  # fmt: skip
    finally:
        os.close(out)
        os.close(devnull)


def exit_status(pid: int) -> int | None:
    """The exit status of our child *pid* if it has ended (reaping it), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (another harness call started it)
        return None if Path(f"/proc/{pid}").exists() else -1
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def reap(pid: int) -> None:
    """Collect *pid* if it is our exited child; harmless otherwise."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
