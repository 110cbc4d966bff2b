"""The default: a leave updates the directory and rings vector 0, but sends
QEMU no "peer left" message (QEMU's ivshmem double-frees after one).  Each
QEMU keeps a departed peer's eventfds, so the server hands that ID on with
those same eventfds, and only to the next QEMU: nobody holds two sets."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

from ivloop_server import abi

from .conftest import ServerProcess, ServerThread
from .fakeclient import FakeQemu
from .storm import eventfd_ids


def wait_rung(client: FakeQemu, server: ServerThread | None = None) -> None:
    """Wait for ``client``'s membership doorbell (a join or leave it was not told of)."""
    for _ in range(200):
        if client.take_interrupts(abi.IVL_VEC_MEMBERSHIP):
            return
        if server is not None:
            server.call(lambda: None)
        else:
            time.sleep(0.01)
    raise AssertionError("membership doorbell not rung")


def same_doorbells(a: list[int], b: list[int]) -> bool:
    """Two lists of fds name the same eventfds, vector by vector."""
    ids_a, ids_b = eventfd_ids("self", a), eventfd_ids("self", b)
    return [ids_a[fd] for fd in a] == [ids_b[fd] for fd in b]


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


def test_cli_default_sends_no_leave_message_and_hands_the_id_on(
    spawn: Callable[..., ServerProcess], clients: list[FakeQemu]
) -> None:
    sp = spawn(notices=False)
    a = FakeQemu.join(sp.socket_path)
    b = FakeQemu.join(sp.socket_path)
    clients += [a, b]
    a.expect_join(1)
    a.take_interrupts(abi.IVL_VEC_MEMBERSHIP)
    b.close()
    wait_rung(a)  # the server has taken the leave
    c = FakeQemu.join(sp.socket_path)
    clients.append(c)
    assert c.own_id == 1, "the departed ID, handed on"
    d = FakeQemu.join(sp.socket_path)  # a new member: by its setup, a was sent all it will be
    clients.append(d)
    a.expect_join(2)  # the first thing a hears of: nothing about 1 (a leave, a second set)
    assert d.own_id == 2 and sorted(d.peers) == [0, 1]
    assert a.gone == [] and sorted(a.peers) == [1, 2]
    assert same_doorbells(a.peers[1], c.own_vectors), "a's kept eventfds are c's doorbells"


def test_a_departed_id_is_handed_on_with_the_eventfds_every_peer_kept(
    make_server: Callable[..., ServerThread]
) -> None:
    """The next joiner gets the lowest departed ID and that ID's eventfds: members
    told of the ID before get no message (QEMU takes no second set) and ring the
    newcomer through what they kept; what was rung for the one that left is gone."""
    server = make_server(leave_notices=False)
    with (FakeQemu.join(server.path) as a, FakeQemu.join(server.path) as b,
          FakeQemu.join(server.path) as c):
        a.expect_join(1)
        a.expect_join(2)
        b.expect_join(2)
        a.take_interrupts(abi.IVL_VEC_MEMBERSHIP)
        old = eventfd_ids("self", a.peers[1])
        c.close()
        wait_rung(a, server)
        b.close()
        wait_rung(a, server)
        a.ring(1, abi.IVL_VEC_DATA)  # a guest that has not yet seen the leave
        assert server.call(server.server.parked_ids) == [1, 2]
        with FakeQemu.join(server.path) as d:
            assert d.own_id == 1, "the lowest departed ID"
            assert sorted(d.peers) == [0]
            assert set(eventfd_ids("self", d.own_vectors).values()) == set(old.values())
            assert d.take_interrupts(abi.IVL_VEC_DATA) == 0, "a doorbell rung for b reached d"
            server.settle()
            assert not a.pending(), "a was sent something for an ID it holds"
            assert same_doorbells(a.peers[1], d.own_vectors)
            a.ring(1, abi.IVL_VEC_DATA)
            assert d.take_interrupts(abi.IVL_VEC_DATA) == 1
            d.ring(0, abi.IVL_VEC_DATA)
            assert a.take_interrupts(abi.IVL_VEC_DATA) == 1
            assert server.call(server.server.parked_ids) == [2]
            assert server.call(lambda: server.server.next_peer_id) == 2


def test_an_id_the_server_cut_off_is_never_handed_on(
    make_server: Callable[..., ServerThread]
) -> None:
    """A client the server drops may still hold its eventfds and read its own
    doorbells: its ID is retired, and the next joiner gets a new one."""
    server = make_server(leave_notices=False)
    with FakeQemu.join(server.path) as a, FakeQemu.join(server.path) as b:
        a.expect_join(1)
        a.take_interrupts(abi.IVL_VEC_MEMBERSHIP)
        b.sock.send(b"x")  # clients must not send: dropped, eventfds and all kept
        wait_rung(a, server)
        assert server.call(server.server.parked_ids) == []
        with FakeQemu.join(server.path) as c:
            assert c.own_id == 2
            a.expect_join(2)
            a.ring(1, abi.IVL_VEC_DATA)
            assert c.take_interrupts(abi.IVL_VEC_DATA) == 0
            assert b.take_interrupts(abi.IVL_VEC_DATA) == 1, "b still holds its doorbell"


def test_churn_keeps_ids_and_eventfds_within_the_most_members_at_once(
    make_server: Callable[..., ServerThread]
) -> None:
    """A member that stays while 50 others come and go one at a time sees one
    ID for all of them and holds its two eventfds, not 100."""
    server = make_server(max_peers=2, size=4 << 20, leave_notices=False)
    with FakeQemu.join(server.path) as anchor:
        for cycle in range(50):
            with FakeQemu.join(server.path) as guest:
                assert guest.own_id == 1, f"cycle {cycle}"
                if cycle == 0:
                    anchor.expect_join(1)
                guest.ring(0, abi.IVL_VEC_DATA)
                assert anchor.take_interrupts(abi.IVL_VEC_DATA) == 1
                anchor.ring(1, abi.IVL_VEC_DATA)
                assert guest.take_interrupts(abi.IVL_VEC_DATA) == 1
                server.settle()
                anchor.take_interrupts(abi.IVL_VEC_MEMBERSHIP)  # rung for the join
            wait_rung(anchor, server)
        server.settle()
        assert not anchor.pending()
        assert sorted(anchor.peers) == [1] and len(anchor.peers[1]) == 2
        assert server.call(lambda: server.server.next_peer_id) == 1


def test_help_explains_why_notices_are_off() -> None:
    out = subprocess.run([sys.executable, "-m", "ivloop_server", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--leave-notices" in out and "double-frees" in out
