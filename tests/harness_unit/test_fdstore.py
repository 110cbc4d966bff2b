"""The lab's fd-store supervisor (harness.lab.fdstore) with a real ivloop-server.

What the VM test's hand-over relies on: READY written to the pidfile, a
hand-over restarting the server at once with its members kept, any other
exit ending the supervisor with the same status, signals passed on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.fakeclient import FakeQemu

TIMEOUT = 10.0


class Supervised:
    def __init__(self, tmp_path: Path) -> None:
        self.sock = tmp_path / "ivl.sock"
        self.pidfile = tmp_path / "server.pid"
        self.log = tmp_path / "server.log"
        argv = [sys.executable, "-m", "harness.lab.fdstore", "--pidfile", str(self.pidfile),
                "--", sys.executable, "-m", "ivloop_server", "--socket", str(self.sock),
                "--max-peers", "4"]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)  # fmt: skip

    def server_pid(self, other_than: int = 0) -> int:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                pid = int(self.pidfile.read_text())
            except (OSError, ValueError):
                pid = 0
            if pid and pid != other_than:
                return pid
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"no READY server: {self.log.read_text()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Supervised]:
    s = Supervised(tmp_path)
    yield s
    s.close()


@pytest.fixture
def members() -> Iterator[list[FakeQemu]]:
    made: list[FakeQemu] = []
    yield made
    for m in made:
        m.close()


def test_a_hand_over_restarts_the_server_with_its_members(
    supervised: Supervised, members: list[FakeQemu]
) -> None:
    first = supervised.server_pid()
    a = FakeQemu.join(supervised.sock)
    members.append(a)
    os.kill(first, signal.SIGUSR2)
    second = supervised.server_pid(other_than=first)
    assert supervised.proc.poll() is None
    assert not a.pending(), "the member heard from the server across the hand-over"
    b = FakeQemu.join(supervised.sock)
    members.append(b)
    assert os.fstat(b.shm_fd or -1).st_ino == os.fstat(a.shm_fd or -1).st_ino
    a.expect_join(b.own_id or 0)
    # A real stop, through the supervisor: passed on, members dropped, status 0.
    supervised.proc.send_signal(signal.SIGTERM)
    assert supervised.proc.wait(TIMEOUT) == 0
    assert a.at_eof() and b.at_eof()
    assert not Path(f"/proc/{second}").exists(), "the server outlived its supervisor"
    assert not supervised.pidfile.with_suffix(".notify.sock").exists()


def test_a_killed_server_ends_its_supervisor(supervised: Supervised) -> None:
    pid = supervised.server_pid()
    os.kill(pid, signal.SIGKILL)
    assert supervised.proc.wait(TIMEOUT) == 128 + signal.SIGKILL
