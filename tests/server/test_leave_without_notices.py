"""The default: a leave updates the directory and rings vector 0, but sends
QEMU no "peer left" message (QEMU's ivshmem double-frees after one)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from ivloop_server import abi

from .conftest import ServerProcess, ServerThread
from .fakeclient import FakeQemu


def test_leave_rings_membership_but_sends_no_message(
    make_server: Callable[..., ServerThread]
) -> None:
    server = make_server(leave_notices=False)
    with FakeQemu.join(server.path) as a, FakeQemu.join(server.path) as b:
        a.expect_join(1)
        a.take_interrupts(abi.IVL_VEC_MEMBERSHIP)
        b.close()
        # vector 0 rings: the guest rereads the directory ...
        for _ in range(100):
            if a.take_interrupts(abi.IVL_VEC_MEMBERSHIP):
                break
            server.call(lambda: None)
        else:
            raise AssertionError("membership doorbell not rung on leave")
        # ... which no longer shows peer 1, while QEMU got no message at all.
        slots = server.call(lambda: [(s.present, s.peer_id) for s in
                                     server.server.region.directory()][:2])
        assert slots == [(True, 0), (False, 1)]
        assert not a.pending()
        assert a.gone == [] and 1 in a.peers  # QEMU keeps the stale eventfds


def test_cli_default_sends_no_leave_message(
    spawn: Callable[..., ServerProcess], clients: list[FakeQemu]
) -> None:
    sp = spawn(notices=False)
    a = FakeQemu.join(sp.socket_path)
    b = FakeQemu.join(sp.socket_path)
    clients += [a, b]
    a.expect_join(1)
    b.close()
    # No check right after close(): the server may not have seen the leave
    # yet.  Messages to `a` are ordered, so had the leave sent one, it would
    # come before the join of 2, and expect_join(2) would fail on it.
    c = FakeQemu.join(sp.socket_path)  # a new ID, never 1 again
    clients.append(c)
    a.expect_join(2)
    assert c.own_id == 2
    assert a.gone == [] and 1 in a.peers  # QEMU keeps the stale eventfds


def test_help_explains_why_notices_are_off() -> None:
    out = subprocess.run([sys.executable, "-m", "ivloop_server", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--leave-notices" in out and "double-frees" in out
