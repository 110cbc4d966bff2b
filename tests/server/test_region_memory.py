"""The host pays for the rings a pair uses, not for the slots a region offers.

A 64-peer region for 64 KiB frames is 2 GiB (4,032 rings).  Joining used to
zero a slot's 127 rings by writing them, which made them resident: with
the old server, 4 idle members of a 2 GiB region held 124 MiB, 64 held
1025 MiB, and a join took 59-69 ms.  Now a join and a leave punch holes
instead: 64 idle members hold under 1 MiB (0.0 MiB measured), a join takes
about 1-3 ms, a ring costs memory once a pair writes it, and a member's
leave gives its rings back.
"""

from __future__ import annotations

import logging
import mmap
import time
from collections.abc import Callable
from typing import Any

from ivloop_server import abi
from ivloop_server.region import min_region_size

from .conftest import ServerThread, wait_until
from .fakeclient import FakeQemu

MiB = 1 << 20
FULL_HOUSE = 64


def allocated(server: ServerThread) -> int:
    return server.server.region.allocated_bytes()


def test_sixty_four_idle_members_hold_almost_none_of_a_2g_region(
        make_server: Callable[..., ServerThread], clients: list[FakeQemu],
        record_property: Callable[[str, object], None]) -> None:
    size = min_region_size(FULL_HOUSE)
    assert size == 2 << 30  # the smallest region with a 64 KiB frame's room in every ring
    server = make_server(size=size, max_peers=FULL_HOUSE, ring_release_delay=0.05)
    empty = allocated(server)
    t0 = time.monotonic()
    for _ in range(FULL_HOUSE):
        clients.append(FakeQemu.join(server.path))
    join_s = (time.monotonic() - t0) / FULL_HOUSE
    server.settle()
    idle = allocated(server)
    record_property("allocated_mib", {"empty": empty / MiB, "64 idle": idle / MiB})
    record_property("join_ms", round(join_s * 1000, 1))
    # the header and the directory (64 slots), nothing of the 4,032 rings
    assert idle < 1 * MiB, f"{idle / MiB:.1f} MiB resident with 64 idle members"

    # A pair exchanging frames makes its ring resident, and only that ring.
    lay = server.server.layout
    writer = clients[0]
    region = writer.region
    src, dst = writer.my_slot(FULL_HOUSE), clients[1].my_slot(FULL_HOUSE)
    data = lay.ring_offset(src, dst) + abi.IVL_RING_CTRL_SIZE
    region[data:data + lay.ring_size] = b"\xa5" * lay.ring_size
    used = allocated(server)
    assert lay.ring_size <= used - idle <= lay.ring_size + 2 * mmap.PAGESIZE, used - idle

    # The writer leaves: once the release delay passed, its rings are gone.
    clients.remove(writer)
    writer.close()
    wait_until(lambda: allocated(server) <= idle, timeout=5,
               what="the leaver's rings given back")


def test_a_new_member_finds_its_rings_zeroed_after_a_writer_left(
        make_server: Callable[..., ServerThread], clients: list[FakeQemu]) -> None:
    server = make_server(size=8 * MiB, max_peers=4, ring_release_delay=3600)
    a, b = FakeQemu.join(server.path), FakeQemu.join(server.path)
    clients += [a, b]
    server.settle()
    lay = server.server.layout
    slot_a, slot_b = a.my_slot(4), b.my_slot(4)
    ring = lay.ring_offset(slot_a, slot_b)
    a.region[ring:ring + lay.ring_stride] = b"\x5a" * lay.ring_stride
    back = lay.ring_offset(slot_b, slot_a)
    b.region[back + 100:back + 200] = b"\x5a" * 100  # unaligned: an edge write
    clients.remove(a)
    a.close()
    server.settle()
    c = FakeQemu.join(server.path)  # takes a's slot (the lowest free one)
    clients.append(c)
    server.settle()
    assert c.my_slot(4) == slot_a
    view = c.region
    assert view[ring:ring + lay.ring_stride] == bytes(lay.ring_stride)
    assert view[back:back + lay.ring_stride] == bytes(lay.ring_stride)


def test_without_size_the_server_picks_one_that_fits_its_peers(spawn: Callable[..., Any]
                                                               ) -> None:
    sp = spawn("--max-peers", "64")
    with FakeQemu.join(sp.socket_path) as client:
        assert len(client.region) == 2 << 30
    assert sp.terminate() == 0
    err = sp.stderr()
    assert "region size 2G picked for 64 peers (--size sets it)" in err, err
    assert "region 2G, 64 peers, rings of 256K" in err, err


def test_a_peer_that_left_leaves_no_logger_behind(
        make_server: Callable[..., ServerThread]) -> None:
    """IDs are never reused: a logger kept per ID grew the server without bound."""
    server = make_server()

    def peer_loggers() -> int:
        return sum(name.startswith("ivloop_server.server.peer")
                   for name in logging.Logger.manager.loggerDict)

    before = peer_loggers()
    for _ in range(50):
        with FakeQemu.join(server.path):
            server.settle()
        server.settle()
    wait_until(lambda: peer_loggers() <= before, timeout=5, what="peer loggers dropped")


def test_a_house_of_64_with_8_vectors_takes_every_joiner_whole(
        make_server: Callable[..., ServerThread], clients: list[FakeQemu]) -> None:
    """523 setup messages to the last joiner: more than a default send buffer holds."""
    server = make_server(size=min_region_size(FULL_HOUSE), max_peers=FULL_HOUSE, vectors=8)
    for _ in range(FULL_HOUSE):
        clients.append(FakeQemu.join(server.path, vectors=8))
    server.settle()
    assert len(clients[-1].peers) == FULL_HOUSE - 1
    assert all(len(fds) == 8 for fds in clients[-1].peers.values())
