"""Region layout arithmetic, creation, attach validation, size parsing."""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import ivloop_server.region as region_mod
from ivloop_server import abi
from ivloop_server.errors import LayoutError, RegionError
from ivloop_server.options import parse_size
from ivloop_server.region import (
    Region,
    ServerHalf,
    compute_layout,
    find_server_region,
    min_region_size,
    read_directory,
)

M = 1 << 20


def field_offset(cls: type[ctypes.LittleEndianStructure], name: str) -> int:
    return int(getattr(cls, name).offset)


def test_default_layout() -> None:
    lay = compute_layout(32 * M, 8)
    # 4096 header + 8 * 128 directory = 5120, rounded up to a page.
    assert lay.rings_offset == 8192
    # 64 rings in 32M - 8K: (33554432 - 8192) / 64 - 256 = 523904 -> 256K.
    assert lay.ring_size == 256 << 10
    assert lay.ring_stride == 256 + (256 << 10)
    assert lay.ring_offset(0, 1) == 8192 + lay.ring_stride
    assert lay.ring_offset(7, 7) == 8192 + 63 * lay.ring_stride
    assert lay.rings_end <= 32 * M


@pytest.mark.parametrize(
    ("size", "peers", "ring"),
    [(64 * M, 8, 512 << 10), (4 * M, 2, 512 << 10), (1 << 34, 2, abi.IVL_RING_MAX_SIZE)],
)
def test_largest_ring_that_fits(size: int, peers: int, ring: int) -> None:
    lay = compute_layout(size, peers)
    assert lay.ring_size == ring
    assert lay.rings_end <= size


def test_too_small_names_a_size_that_works() -> None:
    with pytest.raises(LayoutError, match=r"use --size 32M or more"):
        compute_layout(16 * M, 8)
    assert min_region_size(8) == 32 * M
    assert compute_layout(32 * M, 8).ring_size == abi.IVL_RING_MIN_SIZE


def test_forced_ring_size() -> None:
    assert compute_layout(64 * M, 8, 256 << 10).ring_size == 256 << 10
    with pytest.raises(LayoutError, match="power of two"):
        compute_layout(64 * M, 8, 300 << 10)
    with pytest.raises(LayoutError, match="power of two between"):
        compute_layout(64 * M, 8, 128 << 10)
    with pytest.raises(LayoutError, match="use --size 128M"):
        compute_layout(64 * M, 8, 1 * M)


def test_not_power_of_two() -> None:
    with pytest.raises(LayoutError, match="not a power of two"):
        compute_layout(24 * M, 2)


def test_create_initialises_and_seals(tmp_path: Path) -> None:
    with Region.create(4 * M, 2) as region:
        raw = region.read(0, 72)
        assert struct.unpack_from("<IIQ", raw) == (abi.IVL_MAGIC, abi.IVL_ABI_VERSION, 4 * M)
        assert [s.present for s in region.directory()] == [False, False]
        with pytest.raises(OSError):
            os.ftruncate(region.fd, 8 * M)  # F_SEAL_GROW
        assert region.mark_present(1, 7) == 1
        assert region.mark_present(0, 8) == 2
        with pytest.raises(RegionError, match="already present"):
            region.mark_present(0, 9)
        assert region.mark_absent(1) == 3
        with pytest.raises(RegionError, match="not present"):
            region.mark_absent(1)
        hdr = region.header()
        assert (hdr.generation, hdr.nr_present) == (3, 1)
        # A leave keeps the departed occupant's peer_id; present is what counts.
        assert [(s.present, s.peer_id, s.generation) for s in read_directory(region.fd)] == [
            (True, 8, 2),
            (False, 7, 3),
        ]
        assert region.slot_of(8) == region.slot(0)
        assert region.slot_of(7) is None
        dumped = region.as_dict()["directory"]
        assert isinstance(dumped, list)
        assert [d["peer_id"] for d in dumped] == [8, 7]
        proc_path = find_server_region(os.getpid())
        with Region.attach(proc_path) as view:
            assert view.slot(0).present
            with pytest.raises(RegionError, match="only the server"):
                view.mark_present(1, 10)
    assert region.closed


# A slot's server line as the header lays it out (independent of region.py).
SERVER_LINE = struct.Struct("<IIQII6sH32x")


def server_line(m: mmap.mmap | bytes, base: int) -> tuple[int, ...]:
    """(present, peer_id, generation, srv_seq, srv_flags, nic_mac) at ``base``."""
    return tuple(SERVER_LINE.unpack_from(m, base)[:6])


def test_server_half_is_written_under_srv_seq(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a reader can see after every single store: seq odd, or a whole half.

    x86-64 makes stores visible in program order, so the states a reader can
    observe are exactly the region after each store.  A stable (even seq)
    state must equal the complete half before or after the update; seq goes
    odd before any field changes and even after the last; the header's
    generation is the very last store.
    """
    with Region.create(4 * M, 2) as region:
        base = region.layout.slot_offset(1)
        names = {
            base + field_offset(abi.IvlSlot, n): n
            for n in ("present", "peer_id", "generation", "srv_seq", "srv_flags", "nic_mac",
                      "reserved0")
        }
        names[field_offset(abi.IvlRegionHdr, "nr_present")] = "hdr.nr_present"
        names[field_offset(abi.IvlRegionHdr, "generation")] = "hdr.generation"
        seen: list[tuple[str, tuple[int, ...]]] = []
        store, store_bytes = region_mod._store, region_mod._store_bytes
        mapping = region._map

        def spy(buf: mmap.mmap, offset: int, fmt: str, value: int) -> None:
            store(buf, offset, fmt, value)
            seen.append((names[offset], server_line(mapping, base)))

        def spy_bytes(buf: mmap.mmap, offset: int, data: bytes) -> None:
            store_bytes(buf, offset, data)
            seen.append((names[offset], server_line(mapping, base)))

        monkeypatch.setattr(region_mod, "_store", spy)
        monkeypatch.setattr(region_mod, "_store_bytes", spy_bytes)
        mac = bytes.fromhex("525400000001")
        steps: list[Callable[[], int]] = [
            lambda: region.mark_present(1, 65535, mac),
            lambda: region.mark_absent(1, evicted=True),
            lambda: region.mark_present(1, 7),
            lambda: region.mark_absent(1),
        ]
        before = server_line(mapping, base)
        for step in steps:
            seen.clear()
            step()
            after = server_line(mapping, base)
            order = [name for name, _ in seen]
            assert order[0] == "srv_seq" and order[-3] == "srv_seq", order
            assert order[-2:] == ["hdr.nr_present", "hdr.generation"], order
            assert set(order[1:-3]) == {"present", "peer_id", "generation", "srv_flags", "nic_mac",
                                        "reserved0"}  # fmt: skip
            for name, state in seen:
                if state[3] % 2 == 0:
                    assert state in (before, after), (name, state, before, after)
            assert seen[0][1][3] % 2 == 1 and after[3] == before[3] + 2
            before = after
        # Present with the MAC, then evicted (MAC_KNOWN kept), then a join
        # without a MAC clears both flags.
        assert region.slot(1).srv_seq == 8


def test_server_lines_are_written_only_by_write_server_half(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inside = [False]
    stores: list[int] = []
    with Region.create(8 * M, 4) as region:
        lay = region.layout

        def check(offset: int) -> None:
            rel = offset - lay.dir_offset
            if 0 <= rel < lay.max_peers * abi.IVL_SLOT_SIZE and rel % abi.IVL_SLOT_SIZE < 64:
                assert inside[0], f"store into a server half at {offset} outside the one writer"
                stores.append(offset)

        store, store_bytes = region_mod._store, region_mod._store_bytes
        write = Region._write_server_half

        def spy(buf: mmap.mmap, offset: int, fmt: str, value: int) -> None:
            check(offset)
            store(buf, offset, fmt, value)

        def spy_bytes(buf: mmap.mmap, offset: int, data: bytes) -> None:
            check(offset)
            store_bytes(buf, offset, data)

        def writer(self: Region, index: int, half: object) -> None:
            inside[0] = True
            try:
                write(self, index, half)  # type: ignore[arg-type]
            finally:
                inside[0] = False

        monkeypatch.setattr(region_mod, "_store", spy)
        monkeypatch.setattr(region_mod, "_store_bytes", spy_bytes)
        monkeypatch.setattr(Region, "_write_server_half", writer)
        region.mark_present(2, 1, bytes.fromhex("525400000001"))
        region.mark_present(0, 2)
        region.mark_absent(2, evicted=True)
        with mmap.mmap(region.fd, 8 * M) as m:
            m[lay.slot_offset(0) : lay.slot_offset(0) + 8] = bytes(8)
        region.repair()
        region.mark_absent(0)
    assert len(stores) >= 5 * 8


def test_flags_and_nic_mac_follow_joins_and_leaves() -> None:
    known, evicted = abi.IVL_SLOT_F_MAC_KNOWN, abi.IVL_SLOT_F_EVICTED
    mac = bytes.fromhex("525400abcdef")
    with Region.create(4 * M, 2) as region:
        region.mark_present(0, 3, mac)
        s = region.slot(0)
        assert (s.present, s.srv_flags, s.nic_mac_str) == (True, known, "52:54:00:ab:cd:ef")
        assert s.mac_known and not s.evicted
        region.mark_absent(0, evicted=True)
        s = region.slot(0)
        assert (s.present, s.srv_flags, s.nic_mac, s.peer_id) == (False, known | evicted, mac, 3)
        region.mark_present(0, 4)
        s = region.slot(0)
        assert (s.present, s.srv_flags, s.nic_mac) == (True, 0, bytes(6))
        region.mark_absent(0)
        assert region.slot(0).srv_flags == 0
        with pytest.raises(RegionError, match="6 bytes"):
            region.mark_present(0, 5, b"\x52\x54")
        dumped = region.as_dict()["directory"]
        assert isinstance(dumped, list)
        assert {k: dumped[0][k] for k in ("srv_seq", "srv_flags", "mac_known", "evicted")} == {
            "srv_seq": 8, "srv_flags": 0, "mac_known": False, "evicted": False,
        }  # fmt: skip


def test_peer_id_range_is_checked() -> None:
    with Region.create(4 * M, 2) as region:
        for bad in (-1, 65536):
            with pytest.raises(RegionError, match=r"outside 0\.\.65535"):
                region.mark_present(0, bad)
        assert not region.slot(0).present
        assert region.mark_present(0, 65535) == 1


def test_server_ignores_what_guests_write_over_its_state() -> None:
    """A guest scribbling the header or a server half cannot steer the server."""
    with Region.create(4 * M, 2) as region:
        region.mark_present(0, 1)
        with mmap.mmap(region.fd, 4 * M) as m:
            struct.pack_into("<Q", m, field_offset(abi.IvlRegionHdr, "generation"), 1 << 60)
            struct.pack_into("<I", m, field_offset(abi.IvlRegionHdr, "nr_present"), 0)
            struct.pack_into("<I", m, region.layout.slot_offset(1), 1)  # slot 1 "present"
            assert region.mark_present(1, 2) == 2  # not refused, not 2^60 + 1
            assert region.mark_absent(0) == 3
            assert region.header().nr_present == 1  # not 0 - 1


def test_repair_restores_header_and_server_halves() -> None:
    with Region.create(4 * M, 2) as region:
        mac = bytes.fromhex("525400000002")
        region.mark_present(1, 9, mac)
        good_hdr = region.read(0, 64)
        base = region.layout.slot_offset(1)
        good_line = region.read(base, 64)
        assert region.repair() == (False, {})
        with mmap.mmap(region.fd, 4 * M) as m:
            # A guest rewrites its own nic_mac to match a lie and fakes a rejoin.
            m[base + 24 : base + 30] = bytes.fromhex("525400000099")
            struct.pack_into("<Q", m, base + 8, 77)
            struct.pack_into("<I", m, field_offset(abi.IvlRegionHdr, "ring_size"), 1)
            m[base + 40] = 0xFF  # pad0 too: the whole line is the server's
            header, found = region.repair()
            assert header
            assert sorted(found) == [1]
            assert (found[1].generation, found[1].nic_mac_str) == (77, "52:54:00:00:00:99")
            assert region.read(0, 64) == good_hdr
            line = server_line(m, base)
            assert line[:3] + line[4:] == server_line(good_line, 0)[:3] + server_line(
                good_line, 0)[4:]  # fmt: skip
            # srv_seq moved on by one update (odd then even), so readers re-read.
            assert line[3] == server_line(good_line, 0)[3] + 2
            assert region.repair() == (False, {})


def test_read_guest_half_uses_the_guest_seq(monkeypatch: pytest.MonkeyPatch) -> None:
    with Region.create(4 * M, 2) as region, mmap.mmap(region.fd, 4 * M) as m:
        base = region.layout.slot_offset(0)
        m[base + 64 : base + 70] = bytes.fromhex("525400000003")
        struct.pack_into("<I", m, base + 72, 1)
        struct.pack_into("<Q", m, base + 88, 5)
        struct.pack_into("<I", m, base + 76, 4)  # seq even: published
        half = region.read_guest_half(0)
        assert half is not None
        assert (half.mac_str, half.state, half.joined_gen, half.seq) == (
            "52:54:00:00:00:03", 1, 5, 4)  # fmt: skip
        struct.pack_into("<I", m, base + 76, 5)  # odd: mid-update, never settles
        assert region.read_guest_half(0) is None
        struct.pack_into("<I", m, base + 72, 0xDEAD)  # garbage state comes back raw
        struct.pack_into("<I", m, base + 76, 6)
        half = region.read_guest_half(0)
        assert half is not None and half.state == 0xDEAD

        # seq changes under the copy: retried, and given up after the bound.
        load = region_mod._load
        calls: list[int] = []

        def changing(buf: mmap.mmap, offset: int, fmt: str) -> int:
            calls.append(offset)
            return 2 * len(calls)  # even, but different on every load

        monkeypatch.setattr(region_mod, "_load", changing)
        assert region.read_guest_half(0, tries=3) is None
        assert len(calls) == 6
        seq_reads = iter([8, 10, 12, 12])  # changed once, then stable

        monkeypatch.setattr(region_mod, "_load", lambda b, o, f: next(seq_reads))
        half = region.read_guest_half(0)
        assert half is not None and half.seq == 12
        monkeypatch.setattr(region_mod, "_load", load)


READER = r"""
import struct, sys
sys.path.insert(0, sys.argv[3])
from ivloop_server.region import Region
region = Region.attach(sys.argv[1])
base, m = region.layout.slot_offset(0), region._map
stable = odd = changed = bad = 0
while stable < int(sys.argv[2]):
    s1 = struct.unpack_from("I", m, base + 16)[0]
    if s1 & 1:
        odd += 1
        continue
    line = m[base : base + 32]
    s2 = struct.unpack_from("I", m, base + 16)[0]
    if s1 != s2:
        changed += 1
        continue
    stable += 1
    present, peer_id, gen, _, flags, mac = struct.unpack_from("<IIQII6s", line)
    if (present, peer_id, flags, mac) != (gen % 2, gen & 0xFFFF, gen & 3, gen.to_bytes(6, "big")):
        bad += 1
print(stable, odd, changed, bad)
"""


@pytest.mark.parametrize("protocol", [True, False], ids=["srv_seq", "without_srv_seq"])
def test_concurrent_reader_sees_only_whole_halves(
    protocol: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader in another process, on another CPU, never takes a torn half.

    The control run leaves srv_seq alone (the writer skips it): the same
    reader then does see torn halves, which shows the check has teeth.
    """
    with Region.create(4 * M, 2) as region:
        if not protocol:
            store, seq_at = region_mod._store, region.layout.slot_offset(0) + 16

            def no_seq(buf: mmap.mmap, offset: int, fmt: str, value: int) -> None:
                if offset != seq_at:
                    store(buf, offset, fmt, value)

            monkeypatch.setattr(region_mod, "_store", no_seq)
        src = Path(__file__).resolve().parents[2] / "qemu-dev"
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, f"/proc/{os.getpid()}/fd/{region.fd}", "100000",
             str(src)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        gen = 0
        while reader.poll() is None:
            gen += 1
            region._write_server_half(
                0, ServerHalf(bool(gen % 2), gen & 0xFFFF, gen, gen & 3, gen.to_bytes(6, "big"))
            )
        out, _ = reader.communicate(timeout=30)
    stable, odd, changed, bad = map(int, out.split())
    assert reader.returncode == 0 and stable == 100000 and gen > 1000
    if protocol:
        assert bad == 0, (stable, odd, changed, bad)
        assert odd + changed > 0, "the reader never raced the writer"
    else:
        assert bad > 0, (stable, odd, changed, bad)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("256K", 256 << 10), ("32M", 32 * M), ("1g", 1 << 30), ("64MiB", 64 * M),
     # QEMU's syntax, which ivshmem-server's -l takes: B..E suffixes, fractions, hex.
     ("512B", 512), ("1.5M", 3 * M // 2), ("32T", 32 << 40), ("1E", 1 << 60),
     ("0x400000", 4 * M), ("4m", 4 * M)],
)  # fmt: skip
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1M", "0.3", "1.5B", "32X", "0xZZ", "banana"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)
