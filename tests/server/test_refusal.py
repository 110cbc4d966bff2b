"""Refusing a QEMU without hanging it.

QEMU reads its setup synchronously when the ivshmem device is realized and
retries a read that returns 0 for ever, and with a hot-plug its chardev
connects (chardev-add) before the device reads (device_add); if the
connection is closed in between, QEMU drops it and device_add spins.  So a
refused connection gets -1 as its version and stays open until that has
been read.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

import pytest

import ivloop_server.server as server_mod

from .conftest import ServerThread, wait_until
from .fakeclient import FakeQemu


def closed_by_server(client: FakeQemu) -> bool:
    """Has the server shut its end (even with our unread data still queued)?"""
    poller = select.poll()
    poller.register(client.sock, select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in poller.poll(0))


def full(make_server: Callable[..., ServerThread], clients: list[FakeQemu],
         **kwargs: object) -> ServerThread:  # fmt: skip
    st = make_server(max_peers=2, size=4 << 20, **kwargs)
    clients += [FakeQemu.join(st.path), FakeQemu.join(st.path)]
    clients[0].expect_join(1)
    return st


def test_refusal_waits_until_it_is_read(
    make_server: Callable[..., ServerThread], clients: list[FakeQemu]
) -> None:
    st = full(make_server, clients, police_interval=0.02)
    late = FakeQemu.connect(st.path)  # like chardev-add: connected, not reading yet
    clients.append(late)
    st.settle()
    st.rounds(10)
    assert not closed_by_server(late), "closed before the refusal was read: QEMU would hang"
    assert st.call(lambda: len(st.server._refused)) == 1
    assert late.refused()  # device_add reads it; only then does EOF come
    wait_until(lambda: st.call(lambda: len(st.server._refused)) == 0, what="refusal released")


def test_unread_refusal_is_closed_after_the_linger(
    make_server: Callable[..., ServerThread], clients: list[FakeQemu]
) -> None:
    st = full(make_server, clients, police_interval=0.02, refuse_linger=0.3)
    late = FakeQemu.connect(st.path)
    clients.append(late)
    st.settle()
    t0 = time.monotonic()
    wait_until(lambda: closed_by_server(late), what="the linger to end")
    assert time.monotonic() - t0 >= 0.25
    assert late.refused()  # the message is still there to read, then EOF


def test_refused_client_that_hangs_up_is_released(
    make_server: Callable[..., ServerThread], clients: list[FakeQemu]
) -> None:
    st = full(make_server, clients)
    late = FakeQemu.connect(st.path)
    st.settle()
    assert st.call(lambda: len(st.server._refused)) == 1
    late.close()
    wait_until(lambda: st.call(lambda: len(st.server._refused)) == 0, what="release")


def test_held_refusals_are_bounded(
    make_server: Callable[..., ServerThread], clients: list[FakeQemu],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(server_mod, "_MAX_REFUSED", 2)
    st = full(make_server, clients)
    waiting = [FakeQemu.connect(st.path) for _ in range(3)]
    clients += waiting
    st.settle()
    assert st.call(lambda: len(st.server._refused)) == 2
    wait_until(lambda: closed_by_server(waiting[0]), what="the oldest to be let go")
    assert not closed_by_server(waiting[1]) and not closed_by_server(waiting[2])
    assert all(c.refused() for c in waiting)


def test_stop_closes_held_refusals(
    make_server: Callable[..., ServerThread], clients: list[FakeQemu]
) -> None:
    st = full(make_server, clients)
    late = FakeQemu.connect(st.path)
    clients.append(late)
    st.settle()
    st.run(st.server.stop("test"))
    assert closed_by_server(late)
    assert late.refused()


def test_bare_eof_counts_as_a_violation() -> None:
    """The fake's own check: a refusal by close alone would hang QEMU."""
    ours, theirs = socket.socketpair()
    theirs.close()
    client = FakeQemu(ours)
    try:
        with pytest.raises(AssertionError, match="bare EOF"):
            client.refused(timeout=1)
    finally:
        client.close()
