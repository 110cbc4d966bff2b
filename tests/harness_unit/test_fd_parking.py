"""Parking the fd numbers an ivshmem unplug frees (QEMU 7.2's stale handlers).

A child process stands in for QEMU: it opens fds, closes some (the unplug),
then keeps every fd the fake monitor sends it over a UNIX socket, the way
QEMU's `getfd` keeps one received with SCM_RIGHTS: on the lowest free number.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import pytest

from harness.backends import qmp
from harness.errors import StateError
from harness.lab import qemu

CHILD = r"""
import json, os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(int(sys.argv[2]))]
freed = fds[1::3]
for fd in freed:
    os.close(fd)
sock.sendall((json.dumps(freed) + "\n").encode())
while True:
    msg, got, _, _ = socket.recv_fds(sock, 16, 1)
    if not msg:
        break
    sock.sendall(b"k")   # keeps got[0], like getfd
"""


@dataclass
class FakeQemu:
    pid: int
    freed: set[int]
    sock: socket.socket
    proc: subprocess.Popen[bytes]


class FakeMonitor:
    """send_fd_scm + getfd: the fd goes to the child, which keeps it."""

    def __init__(self, q: FakeQemu) -> None:
        self.q = q
        self.client = self
        self.names: list[str] = []
        self.pending: int | None = None

    def send_fd_scm(self, fd: int) -> None:
        self.pending = fd

    async def cmd(self, name: str, args: Mapping[str, object] | None = None) -> Any:
        assert name == "getfd" and args is not None and self.pending is not None
        self.names.append(str(args["fdname"]))
        socket.send_fds(self.q.sock, [b"g"], [self.pending])
        assert self.q.sock.recv(1) == b"k"
        self.pending = None
        return {}


@pytest.fixture
def fake_qemu() -> Iterator[FakeQemu]:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno()), "12"],
                            pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        line = ours.makefile().readline()
        yield FakeQemu(proc.pid, set(json.loads(line)), ours, proc)
    finally:
        ours.close()
        proc.wait(timeout=10)


def park(mon: FakeMonitor, numbers: set[int], tag: str = "t") -> int:
    return asyncio.run(qmp.park_fds(cast(qemu.Monitor, mon), mon.q.pid, numbers, tag))


def test_every_freed_number_is_occupied_after_parking(fake_qemu: FakeQemu) -> None:
    freed = fake_qemu.freed
    assert len(freed) == 4 and not freed & qmp.open_fds(fake_qemu.pid)
    mon = FakeMonitor(fake_qemu)
    assert park(mon, freed) == len(freed)  # no other holes below them
    assert freed <= qmp.open_fds(fake_qemu.pid)
    assert len(set(mon.names)) == len(mon.names)  # getfd names are unique


def test_nothing_is_parked_when_nothing_is_free(fake_qemu: FakeQemu) -> None:
    mon = FakeMonitor(fake_qemu)
    assert park(mon, {0, 1, 2}) == 0
    assert mon.names == []


def test_a_second_unplug_parks_under_its_own_tag(fake_qemu: FakeQemu) -> None:
    mon = FakeMonitor(fake_qemu)
    first = sorted(fake_qemu.freed)
    park(mon, set(first[:2]), tag="u0")
    park(mon, set(first[2:]), tag="u1")
    assert fake_qemu.freed <= qmp.open_fds(fake_qemu.pid)
    assert [n.rsplit("-", 1)[0] for n in mon.names] == ["ivl-park-u0"] * 2 + ["ivl-park-u1"] * 2


def test_unknown_process_is_a_state_error() -> None:
    with pytest.raises(StateError, match="cannot list the fds of QEMU pid"):
        qmp.open_fds(2**22 + 12345)
