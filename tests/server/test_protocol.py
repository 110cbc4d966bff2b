"""The server's side of QEMU's ivshmem protocol, seen by fake QEMU clients."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable

from ivloop_server import abi
from ivloop_server.region import Region

from .conftest import ServerThread
from .fakeclient import FakeQemu, Message


def fd_kind(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def raw_messages(client: FakeQemu, count: int) -> list[Message]:
    return [client.recv() for _ in range(count)]


def shape(msgs: list[Message]) -> list[tuple[bytes, str | None]]:
    """Each message as (its 8 bytes, the kind of fd attached)."""
    out: list[tuple[bytes, str | None]] = []
    for m in msgs:
        kind = None
        if m.fd is not None:
            link = fd_kind(m.fd)
            kind = "memfd" if link.startswith("/memfd:ivloop") else link
        out.append((m.raw, kind))
    return out


def q(value: int) -> bytes:
    return struct.pack("<q", value)


EFD = "anon_inode:[eventfd]"


def test_first_client_sequence_byte_for_byte(server: ServerThread, clients: list[FakeQemu]) -> None:
    a = FakeQemu.connect(server.path)
    clients.append(a)
    msgs = raw_messages(a, 5)
    assert shape(msgs) == [
        (b"\x00" * 8, None),  # protocol version 0
        (b"\x00" * 8, None),  # own ID 0
        (b"\xff" * 8, "memfd"),  # -1 + shared memory
        (q(0), EFD),  # own vector 0
        (q(0), EFD),  # own vector 1
    ]
    assert not a.pending()


def test_second_client_sequence_and_notice_to_first(
    server: ServerThread, clients: list[FakeQemu]
) -> None:
    a = FakeQemu.connect(server.path)
    clients.append(a)
    first = raw_messages(a, 5)
    b = FakeQemu.connect(server.path)
    clients.append(b)
    second = raw_messages(b, 7)
    assert shape(second) == [
        (q(0), None),
        (q(1), None),
        (q(-1), "memfd"),
        (q(0), EFD),  # peer 0, vector 0
        (q(0), EFD),  # peer 0, vector 1
        (q(1), EFD),  # own vector 0
        (q(1), EFD),  # own vector 1
    ]
    notice = raw_messages(a, 2)
    server.settle()
    assert shape(notice) == [(q(1), EFD), (q(1), EFD)]
    assert not a.pending() and not b.pending()

    # Both got the same region.
    assert os.fstat(first[2].fd).st_ino == os.fstat(second[2].fd).st_ino  # type: ignore[arg-type]

    # B's copies of A's eventfds are A's own, vector by vector, and back.
    a_own = [first[3].fd, first[4].fd]
    b_own = [second[5].fd, second[6].fd]
    b_copy_of_a = [second[3].fd, second[4].fd]
    a_copy_of_b = [notice[0].fd, notice[1].fd]
    for fd in a_own + b_own:
        assert fd is not None
        os.set_blocking(fd, False)
    # Joining rang A's membership vector once; clear it before testing data.
    assert os.eventfd_read(a_own[0]) == 1  # type: ignore[arg-type]
    os.eventfd_write(b_copy_of_a[1], 5)  # type: ignore[arg-type]
    assert os.eventfd_read(a_own[1]) == 5  # type: ignore[arg-type]
    os.eventfd_write(a_copy_of_b[0], 3)  # type: ignore[arg-type]
    assert os.eventfd_read(b_own[0]) == 3  # type: ignore[arg-type]


def test_region_fd_maps_initialised_header(
    server: ServerThread, join: Callable[[], FakeQemu]
) -> None:
    a = join()
    assert a.shm_fd is not None
    size = os.fstat(a.shm_fd).st_size
    assert size == 8 << 20
    with mmap.mmap(a.shm_fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        hdr = abi.IvlRegionHdr.from_buffer_copy(m, 0)
        slot0 = abi.IvlSlot.from_buffer_copy(m, abi.IVL_HDR_SIZE)
        assert bytes(m[0:4]) == b"IVLP"
    assert (hdr.magic, hdr.version) == (abi.IVL_MAGIC, abi.IVL_ABI_VERSION)
    assert hdr.region_size == 8 << 20
    assert (hdr.max_peers, hdr.dir_offset, hdr.slot_size) == (4, 4096, 128)
    # 4 peers: directory ends at 4096 + 512, rings start at the next page;
    # 16 rings of (256 + ring) in 8M - 8K: the largest power of two is 256K.
    assert (hdr.rings_offset, hdr.ring_size, hdr.ring_stride) == (
        8192,
        256 << 10,
        256 + (256 << 10),
    )
    assert (hdr.generation, hdr.nr_present) == (1, 1)
    assert (slot0.present, slot0.generation) == (1, 1)


def test_vector0_rung_on_join_and_leave(server: ServerThread, join: Callable[[], FakeQemu]) -> None:
    a = join()
    assert a.take_interrupts(abi.IVL_VEC_MEMBERSHIP) == 0
    b = join()
    a.expect_join(1)
    assert a.take_interrupts(abi.IVL_VEC_MEMBERSHIP) == 1
    assert a.take_interrupts(abi.IVL_VEC_DATA) == 0
    assert b.take_interrupts(abi.IVL_VEC_MEMBERSHIP) == 0  # the joiner is not rung
    c = join()
    a.expect_join(2)
    b.expect_join(2)
    c.close()
    a.expect_leave(2)
    b.expect_leave(2)
    server.settle()
    assert a.take_interrupts(abi.IVL_VEC_MEMBERSHIP) == 2  # C's join and leave
    assert b.take_interrupts(abi.IVL_VEC_MEMBERSHIP) == 2
    assert a.take_interrupts(abi.IVL_VEC_DATA) == 0


def test_data_doorbell_between_peers(join: Callable[[], FakeQemu]) -> None:
    a = join()
    b = join()
    a.expect_join(1)
    b.ring(0, abi.IVL_VEC_DATA)
    b.ring(0, abi.IVL_VEC_DATA)
    a.ring(1, abi.IVL_VEC_DATA)
    assert a.take_interrupts(abi.IVL_VEC_DATA) == 2
    assert b.take_interrupts(abi.IVL_VEC_DATA) == 1


Dir = tuple[int, int, list[tuple[bool, int, int]]]


def directory(server: ServerThread) -> Dir:
    """Header generation, nr_present, and (present, peer_id, generation) of each slot."""

    def read() -> Dir:
        region = server.server.region
        hdr = region.header()
        return (
            hdr.generation,
            hdr.nr_present,
            [(s.present, s.peer_id, s.generation) for s in region.directory()],
        )

    return server.call(read)


def test_directory_tracks_joins_and_leaves(
    server: ServerThread, join: Callable[[], FakeQemu]
) -> None:
    free = (False, 0, 0)
    assert directory(server) == (0, 0, [free] * 4)
    a, b, c = join(), join(), join()
    assert directory(server) == (3, 3, [(True, 0, 1), (True, 1, 2), (True, 2, 3), free])
    b.close()
    a.expect_join(1)
    a.expect_join(2)
    a.expect_leave(1)
    c.expect_leave(1)
    # A leave clears present and keeps the departed occupant's peer_id.
    assert directory(server) == (4, 2, [(True, 0, 1), (False, 1, 4), (True, 2, 3), free])
    d = join()
    assert d.own_id == 3  # slot 1, new ID
    c.expect_join(3)
    assert directory(server) == (5, 3, [(True, 0, 1), (True, 3, 5), (True, 2, 3), free])
    a.close()
    c.expect_leave(0)
    d.expect_leave(0)
    assert directory(server) == (6, 2, [(False, 0, 6), (True, 3, 5), (True, 2, 3), free])
    e = join()
    assert e.own_id == 4
    assert directory(server) == (7, 3, [(True, 4, 7), (True, 3, 5), (True, 2, 3), free])
    assert server.call(lambda: server.server.region.slot_of(4)) == server.call(
        lambda: server.server.region.slot(0)
    )
    assert server.call(lambda: server.server.region.slot_of(0)) is None  # gone, not present


def test_rings_to_and_from_a_slot_are_zeroed_on_join(
    server: ServerThread, join: Callable[[], FakeQemu]
) -> None:
    a = join()
    assert a.shm_fd is not None
    lay = server.server.layout
    with mmap.mmap(a.shm_fd, lay.size) as m:
        m[lay.rings_offset : lay.rings_end] = b"\xaa" * (lay.rings_end - lay.rings_offset)
        b = join()
        assert b.own_id == 1

        def ring(i: int, j: int) -> bytes:
            off = lay.ring_offset(i, j)
            return m[off : off + lay.ring_stride]

        clean = bytes(lay.ring_stride)
        dirty = b"\xaa" * lay.ring_stride
        for i in range(lay.max_peers):
            assert ring(i, 1) == clean, f"ring {i}->1"
            assert ring(1, i) == clean, f"ring 1->{i}"
        assert ring(0, 0) == dirty
        assert ring(0, 2) == dirty and ring(2, 3) == dirty and ring(3, 0) == dirty
        # The header and directory were not touched by the ring zeroing.
        assert m[0:4] == b"IVLP"

        # Rings are zeroed by slot, not by peer ID: B (ID 1, slot 1) leaves,
        # C gets ID 2 in slot 1, and the rings of slot 1 are clean again.
        m[lay.rings_offset : lay.rings_end] = b"\xaa" * (lay.rings_end - lay.rings_offset)
        b.close()
        a.expect_join(1)
        a.expect_leave(1)
        c = join()
        assert c.own_id == 2
        for i in range(lay.max_peers):
            assert ring(i, 1) == clean, f"ring {i}->1"
            assert ring(1, i) == clean, f"ring 1->{i}"
        assert ring(2, 2) == dirty and ring(0, 2) == dirty and ring(2, 0) == dirty


def test_server_region_matches_attach_view(
    server: ServerThread, join: Callable[[], FakeQemu]
) -> None:
    a = join()
    join()
    assert a.shm_fd is not None
    with Region.attach(a.shm_fd) as view:
        assert view.layout == server.server.layout
        assert [s.present for s in view.directory()] == [True, True, False, False]
        assert [s.peer_id for s in view.directory()] == [0, 1, 0, 0]
        assert view.as_dict()["header"]["nr_present"] == 2  # type: ignore[index]
