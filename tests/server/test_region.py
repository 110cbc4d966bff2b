"""Region layout arithmetic, creation, attach validation, size parsing."""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import struct
from pathlib import Path

import pytest

from ivloop_server import abi
from ivloop_server.__main__ import parse_size
from ivloop_server.errors import LayoutError, RegionError
from ivloop_server.region import (
    Region,
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


def test_peer_id_is_written_before_presence_and_generations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with Region.create(4 * M, 2) as region:
        slot1 = region.layout.slot_offset(1)
        names = {
            slot1 + field_offset(abi.IvlSlot, "peer_id"): "peer_id",
            slot1 + field_offset(abi.IvlSlot, "present"): "present",
            slot1 + field_offset(abi.IvlSlot, "generation"): "slot generation",
            field_offset(abi.IvlRegionHdr, "nr_present"): "nr_present",
            field_offset(abi.IvlRegionHdr, "generation"): "generation",
        }
        stores: list[str] = []
        put = Region._put

        def spy(self: Region, base: int, field: tuple[int, str], value: int) -> None:
            stores.append(names[base + field[0]])
            put(self, base, field, value)

        monkeypatch.setattr(Region, "_put", spy)
        region.mark_present(1, 65535)
        assert stores == ["peer_id", "present", "nr_present", "slot generation", "generation"]
        stores.clear()
        region.mark_absent(1)
        assert stores == ["present", "nr_present", "slot generation", "generation"]
        assert region.slot(1).peer_id == 65535
        for bad in (-1, 65536):
            with pytest.raises(RegionError, match=r"outside 0\.\.65535"):
                region.mark_present(0, bad)
        assert not region.slot(0).present


def test_attach_rejects_non_regions(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 8192)
    with pytest.raises(RegionError, match="bad magic"):
        Region.attach(junk)
    with pytest.raises(RegionError, match="too small"):
        Region.attach(tmp_path)
    with pytest.raises(RegionError, match="cannot open"):
        Region.attach(tmp_path / "missing")


def test_guest_written_fields_are_decoded() -> None:
    with Region.create(4 * M, 2) as region:
        slot1 = region.layout.slot_offset(1)
        # Write as guest 1 would, through a second shared mapping of the fd.
        with mmap.mmap(region.fd, 4 * M) as m:
            base = slot1 + field_offset(abi.IvlSlot, "mac")
            m[base : base + 6] = bytes.fromhex("525400123456")
            struct.pack_into("<I", m, slot1 + field_offset(abi.IvlSlot, "state"), 1)
            struct.pack_into("<Q", m, slot1 + field_offset(abi.IvlSlot, "heartbeat"), 42)
        s = region.slot(1)
        assert (s.mac_str, s.state, s.heartbeat) == ("52:54:00:12:34:56", abi.IVL_STATE_UP, 42)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("256K", 256 << 10), ("32M", 32 * M), ("1g", 1 << 30), ("64MiB", 64 * M)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1M", "1.5M", "32T", "banana"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)
