"""Membership: limits, faults, slot reuse (never ID reuse), ID exhaustion,
shutdown, state guards."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from ivloop_server import abi
from ivloop_server.errors import ConfigError, StateError
from ivloop_server.protocol import MAX_PEER_ID
from ivloop_server.server import IvshmemServer, Peer, PeerState, Runstate, ServerConfig

from .conftest import ServerThread
from .fakeclient import FakeQemu


def present(server: ServerThread) -> list[int]:
    """Indices of the present slots."""
    return server.call(lambda: [s.index for s in server.server.region.directory() if s.present])


def occupants(server: ServerThread) -> dict[int, int]:
    """Slot index -> QEMU peer ID, for the present slots."""
    return server.call(
        lambda: {s.index: s.peer_id for s in server.server.region.directory() if s.present}
    )


def test_over_the_limit_is_refused_and_others_keep_working(
    make_server: Callable[..., ServerThread],
    clients: list[FakeQemu],
    caplog: pytest.LogCaptureFixture,
) -> None:
    st = make_server(max_peers=2, size=4 << 20)
    a = FakeQemu.join(st.path)
    b = FakeQemu.join(st.path)
    clients += [a, b]
    a.expect_join(1)
    with caplog.at_level(logging.WARNING, logger="ivloop_server"):
        c = FakeQemu.connect(st.path)
        clients.append(c)
        assert c.refused(), "refused client gets -1 and EOF, nothing else"
        st.settle()
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "refuse"]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    assert "2 peer slots" in refusals[0].getMessage()
    assert not a.pending() and not b.pending()
    assert present(st) == [0, 1]
    # The two members still talk.
    b.ring(0, abi.IVL_VEC_DATA)
    assert a.take_interrupts(abi.IVL_VEC_DATA) == 1
    # And a slot freed by a leave is given out again, with a new ID.
    b.close()
    a.expect_leave(1)
    d = FakeQemu.join(st.path)
    clients.append(d)
    assert d.own_id == 2
    assert sorted(d.peers) == [0]
    st.settle()
    assert occupants(st) == {0: 0, 1: 2}


def test_client_that_sends_is_dropped_and_announced(
    server: ServerThread, join: Callable[[], FakeQemu], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = join(), join()
    a.expect_join(1)
    with caplog.at_level(logging.INFO, logger="ivloop_server"):
        b.sock.send(b"hello")
        a.expect_leave(1)
        server.settle()
    assert b.at_eof()
    assert present(server) == [0]
    leaves = [r for r in caplog.records if getattr(r, "event", None) == "leave"]
    assert [(r.peer, r.levelno) for r in leaves] == [(1, logging.WARNING)]  # type: ignore[attr-defined]
    assert "misbehaving" in leaves[0].reason  # type: ignore[attr-defined]


def test_client_that_vanishes_is_announced(
    server: ServerThread, join: Callable[[], FakeQemu]
) -> None:
    a, b, c = join(), join(), join()
    a.expect_join(1)
    a.expect_join(2)
    b.expect_join(2)
    b.close()
    a.expect_leave(1)
    c.expect_leave(1)
    assert a.gone == [1] and sorted(a.peers) == [2]
    assert present(server) == [0, 2]


def test_client_that_resets_is_announced(
    server: ServerThread, join: Callable[[], FakeQemu], clients: list[FakeQemu]
) -> None:
    a = join()
    # Closing with unread data makes the server's end see ECONNRESET.
    b = FakeQemu.connect(server.path)
    clients.append(b)
    a.expect_join(1)
    b.sock.close()
    a.expect_leave(1)
    server.settle()
    assert present(server) == [0]


def test_slot_is_reused_only_after_the_leave_and_id_never(
    server: ServerThread, join: Callable[[], FakeQemu]
) -> None:
    a, b = join(), join()
    a.expect_join(1)
    assert (a.own_id, b.own_id) == (0, 1)
    c = join()
    assert c.own_id == 2  # slot 2, the lowest free while 0 and 1 are held
    b.expect_join(2)
    assert occupants(server) == {0: 0, 1: 1, 2: 2}
    a.close()
    b.expect_leave(0)  # by now the directory says slot 0 is free and everyone knows
    c.expect_leave(0)
    d = join()
    # D takes the freed slot 0 but a new ID: QEMU cannot take ID 0 back.
    assert d.own_id == 3
    assert sorted(d.peers) == [1, 2]
    b.expect_join(3)
    c.expect_join(3)
    assert not b.pending() and not c.pending()
    assert sorted(b.peers) == [2, 3] and sorted(c.peers) == [1, 3]
    assert occupants(server) == {0: 3, 1: 1, 2: 2}
    peers = server.call(server.server.peers)
    assert {pid: p.slot for pid, p in peers.items()} == {1: 1, 2: 2, 3: 0}
    # The new occupant's eventfds are new: B's doorbell for 3 reaches D.
    b.ring(3, abi.IVL_VEC_DATA)
    assert d.take_interrupts(abi.IVL_VEC_DATA) == 1
    d.ring(1, abi.IVL_VEC_DATA)
    assert b.take_interrupts(abi.IVL_VEC_DATA) == 1


def test_ids_keep_growing_while_slots_are_reused(
    make_server: Callable[..., ServerThread],
    clients: list[FakeQemu],
    caplog: pytest.LogCaptureFixture,
) -> None:
    st = make_server(max_peers=2, size=4 << 20)
    anchor = FakeQemu.join(st.path)
    clients.append(anchor)
    seen = []
    with caplog.at_level(logging.INFO, logger="ivloop_server"):
        for cycle in range(20):
            with FakeQemu.join(st.path) as guest:
                assert guest.own_id is not None
                seen.append(guest.own_id)
                assert sorted(guest.peers) == [0]
                anchor.expect_join(guest.own_id)
                st.settle()
                assert occupants(st) == {0: 0, 1: guest.own_id}, f"cycle {cycle}"
                guest.ring(0, abi.IVL_VEC_DATA)
                assert anchor.take_interrupts(abi.IVL_VEC_DATA) == 1
                anchor.ring(guest.own_id, abi.IVL_VEC_DATA)
                assert guest.take_interrupts(abi.IVL_VEC_DATA) == 1
            anchor.expect_leave(seen[-1])
        st.settle()  # the leave is logged after it is announced
    assert seen == list(range(1, 21))
    assert sorted(anchor.peers) == [] and anchor.gone == seen
    assert st.call(lambda: st.server.next_peer_id) == 21
    joins = [r for r in caplog.records if getattr(r, "event", None) == "join"]
    leaves = [r for r in caplog.records if getattr(r, "event", None) == "leave"]
    assert [(r.peer, r.slot) for r in joins] == [(i, 1) for i in seen]  # type: ignore[attr-defined]
    assert [(r.peer, r.slot) for r in leaves] == [(i, 1) for i in seen]  # type: ignore[attr-defined]


def test_peer_ids_used_up_refuses_new_clients_and_others_keep_working(
    make_server: Callable[..., ServerThread],
    clients: list[FakeQemu],
    caplog: pytest.LogCaptureFixture,
) -> None:
    st = make_server(max_peers=4, first_peer_id=MAX_PEER_ID - 1)
    a = FakeQemu.join(st.path)
    b = FakeQemu.join(st.path)
    clients += [a, b]
    assert (a.own_id, b.own_id) == (MAX_PEER_ID - 1, MAX_PEER_ID)
    a.expect_join(MAX_PEER_ID)
    st.settle()
    assert occupants(st) == {0: MAX_PEER_ID - 1, 1: MAX_PEER_ID}

    def refused() -> None:
        c = FakeQemu.connect(st.path)
        clients.append(c)
        assert c.refused(), "refused client gets -1 and EOF, nothing else"
        st.settle()

    assert st.call(lambda: st.server.peer_ids_left) == 0
    assert "0 peer IDs left; no new peer can join: restart the server and re-plug" in st.call(
        st.server.status_text
    )
    with caplog.at_level(logging.WARNING, logger="ivloop_server"):
        refused()  # slots are free, IDs are not
        refusals = [r for r in caplog.records if getattr(r, "event", None) == "refuse"]
        assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR
        assert "peer IDs are used up" in refusals[0].reason  # type: ignore[attr-defined]
        message = refusals[0].getMessage()
        assert "\n" not in message
        assert "members keep working" in message
        assert "restart the server and re-plug every VM of this host" in message
        assert "ivloop-libvirt server-restart" in message and "harness server-restart" in message
        assert not a.pending() and not b.pending()
        assert occupants(st) == {0: MAX_PEER_ID - 1, 1: MAX_PEER_ID}
        # The members still talk.
        b.ring(MAX_PEER_ID - 1, abi.IVL_VEC_DATA)
        assert a.take_interrupts(abi.IVL_VEC_DATA) == 1
        a.ring(MAX_PEER_ID, abi.IVL_VEC_DATA)
        assert b.take_interrupts(abi.IVL_VEC_DATA) == 1
        # A leave frees a slot but no ID: still refused; the leave is announced.
        b.close()
        a.expect_leave(MAX_PEER_ID)
        refused()
        refusals = [r for r in caplog.records if getattr(r, "event", None) == "refuse"]
        assert len(refusals) == 2
        # One ERROR says what to do; each further plug attempt is a WARNING.
        assert refusals[1].levelno == logging.WARNING
        assert "2 connections refused so far" in refusals[1].getMessage()
        assert [r.levelno for r in caplog.records].count(logging.ERROR) == 1
        assert not a.pending()
        assert occupants(st) == {0: MAX_PEER_ID - 1}
    assert st.server.runstate is Runstate.RUNNING


def test_running_low_on_peer_ids_is_warned_once_ahead(
    make_server: Callable[..., ServerThread],
    clients: list[FakeQemu],
    caplog: pytest.LogCaptureFixture,
) -> None:
    st = make_server(max_peers=4, first_peer_id=MAX_PEER_ID + 1 - 1002)  # 1002 IDs left
    with caplog.at_level(logging.WARNING, logger="ivloop_server"):
        for left in (1001, 1000, 999):
            with FakeQemu.join(st.path):
                st.settle()
                assert st.call(lambda: st.server.peer_ids_left) == left
    lows = [r for r in caplog.records if getattr(r, "event", None) == "ids_low"]
    assert len(lows) == 1 and lows[0].ids_left == 1000  # type: ignore[attr-defined]
    assert "restart the server and re-plug its VMs at a quiet moment" in lows[0].getMessage()


@pytest.mark.parametrize("first", [-1, MAX_PEER_ID + 1])
def test_first_peer_id_is_validated(tmp_path: Path, first: int) -> None:
    with pytest.raises(ConfigError, match="first peer ID"):
        ServerConfig(tmp_path / "s.sock", first_peer_id=first).validate()


def test_send_error_drops_only_that_peer(
    server: ServerThread, join: Callable[[], FakeQemu]
) -> None:
    a, b = join(), join()
    a.expect_join(1)
    b.sock.shutdown(socket.SHUT_RD)  # the server's next send to B fails (EPIPE)
    c = join()
    assert sorted(c.peers) == [0, 1]  # B was still present when C joined
    a.expect_join(2)
    a.expect_leave(1)
    c.expect_leave(1)
    server.settle()
    assert present(server) == [0, 2]
    c.ring(0, abi.IVL_VEC_DATA)
    assert a.take_interrupts(abi.IVL_VEC_DATA) == 1


def test_stop_drops_everyone_and_removes_the_socket(
    server: ServerThread, join: Callable[[], FakeQemu]
) -> None:
    a, b = join(), join()
    a.expect_join(1)
    assert server.path.is_socket()
    server.run(server.server.stop("test"))
    assert server.server.runstate is Runstate.STOPPED
    assert not server.path.exists()
    # Peers leave in ID order: A first (B is told), then B (nobody left to tell).
    assert a.at_eof()
    b.expect_leave(0)
    assert b.take_interrupts(abi.IVL_VEC_MEMBERSHIP) == 1
    assert b.at_eof()
    server.run(server.server.stop("again"))  # idempotent


def test_peer_state_machine_guards() -> None:
    left, right = socket.socketpair()
    peer = Peer(0, 0, left, [], pid=0)
    try:
        with pytest.raises(StateError, match="joining to gone"):
            peer.transition(PeerState.GONE)
        peer.transition(PeerState.ACTIVE)
        with pytest.raises(StateError):
            peer.transition(PeerState.JOINING)
        peer.transition(PeerState.LEAVING)
        peer.transition(PeerState.GONE)
        with pytest.raises(StateError):
            peer.transition(PeerState.ACTIVE)
    finally:
        peer.close()
        right.close()


def test_server_runstate_guards(tmp_path: Path) -> None:
    def state(server: IvshmemServer) -> Runstate:
        return server.runstate  # a call, so mypy does not narrow across awaits

    async def scenario() -> None:
        server = IvshmemServer(ServerConfig(tmp_path / "s.sock", size=4 << 20, max_peers=2))
        assert state(server) is Runstate.IDLE
        async with server:
            assert state(server) is Runstate.RUNNING
            with pytest.raises(StateError):
                await server.start()
        assert state(server) is Runstate.STOPPED
        with pytest.raises(StateError):
            await server.start()
        with pytest.raises(StateError):
            _ = server.region

    asyncio.run(scenario())
