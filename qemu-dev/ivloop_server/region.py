"""The shared region: a memfd holding header, peer directory and rings.

::

    [ header | directory: max_peers slots | ring i->j for every ordered pair ]

:func:`compute_layout` turns a size and a peer count into offsets;
:class:`Region` creates the memfd (or attaches to an existing region, for
introspection) and reads and writes the fields the server owns.

Field writes go through ``struct.pack_into`` on the mapping, one aligned
store per field, in program order.  Where a guest reads a group of fields
guarded by a generation number, the payload is written first and the
generation last; on x86-64 (TSO) stores become visible in program order, so
a guest that reads the generation with acquire semantics sees the payload.

A slot's index (its place in the directory and the ring matrix) is not the
QEMU peer ID of its occupant: the server never gives a peer ID out twice
(QEMU's ivshmem cannot take one back), while slots are reused.  Each slot
records its occupant's ID in ``peer_id``.  On a leave only ``present`` is
cleared; ``peer_id`` keeps the departed occupant's ID (useful when reading
a dump) until the next join overwrites it.  Since IDs are never reused, a
stale ``peer_id`` can never equal the IVPosition of a live guest.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from . import abi
from .errors import LayoutError, RegionError
from .protocol import MAX_PEER_ID

PAGE_SIZE: Final = 4096
DEFAULT_MEMFD_NAME: Final = "ivloop"
_ZERO_CHUNK: Final = 1 << 20

_HDR = abi.IvlRegionHdr
_SLOT = abi.IvlSlot


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def format_size(value: int) -> str:
    """Render a byte count the way --size accepts it (32M, 1G, 4096)."""
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift}{suffix}"
    return str(value)


@dataclass(frozen=True)
class Layout:
    """Where everything lives in a region of ``size`` bytes."""

    size: int
    max_peers: int
    ring_size: int
    dir_offset: int
    rings_offset: int
    ring_stride: int

    def slot_offset(self, index: int) -> int:
        if not 0 <= index < self.max_peers:
            raise IndexError(f"slot {index} out of range 0..{self.max_peers - 1}")
        return self.dir_offset + index * abi.IVL_SLOT_SIZE

    def ring_offset(self, producer: int, consumer: int) -> int:
        """Offset of the control block of ring ``producer -> consumer``."""
        for index in (producer, consumer):
            if not 0 <= index < self.max_peers:
                raise IndexError(f"peer {index} out of range 0..{self.max_peers - 1}")
        return self.rings_offset + (producer * self.max_peers + consumer) * self.ring_stride

    @property
    def rings_end(self) -> int:
        return self.rings_offset + self.max_peers * self.max_peers * self.ring_stride


def _rings_offset(max_peers: int) -> int:
    return _round_up(abi.IVL_HDR_SIZE + max_peers * abi.IVL_SLOT_SIZE, PAGE_SIZE)


def min_region_size(max_peers: int, ring_size: int = abi.IVL_RING_MIN_SIZE) -> int:
    """Smallest power-of-two region holding ``max_peers`` with rings of ``ring_size``."""
    need = _rings_offset(max_peers) + max_peers * max_peers * (abi.IVL_RING_CTRL_SIZE + ring_size)
    return _next_power_of_two(need)


def compute_layout(size: int, max_peers: int, ring_size: int | None = None) -> Layout:
    """Lay out a region; raise :class:`LayoutError` naming a size that would work.

    Without ``ring_size`` the rings get the largest power of two that fits,
    clamped to IVL_RING_MAX_SIZE.
    """
    if not is_power_of_two(size):
        raise LayoutError(f"region size {size} is not a power of two")
    if not 1 <= max_peers <= abi.IVL_MAX_PEERS:
        raise LayoutError(f"max peers {max_peers} is outside 1..{abi.IVL_MAX_PEERS}")
    rings_offset = _rings_offset(max_peers)
    nr_rings = max_peers * max_peers
    per_ring = (size - rings_offset) // nr_rings - abi.IVL_RING_CTRL_SIZE
    if ring_size is None:
        if per_ring < abi.IVL_RING_MIN_SIZE:
            raise LayoutError(
                f"region size {format_size(size)} leaves {max(per_ring, 0)} bytes per ring for "
                f"{max_peers} peers, below the minimum {format_size(abi.IVL_RING_MIN_SIZE)}; "
                f"use --size {format_size(min_region_size(max_peers))} or more, "
                f"or fewer --max-peers"
            )
        ring_size = min(1 << (per_ring.bit_length() - 1), abi.IVL_RING_MAX_SIZE)
    else:
        if not is_power_of_two(ring_size) or not (
            abi.IVL_RING_MIN_SIZE <= ring_size <= abi.IVL_RING_MAX_SIZE
        ):
            raise LayoutError(
                f"ring size {ring_size} must be a power of two between "
                f"{format_size(abi.IVL_RING_MIN_SIZE)} and {format_size(abi.IVL_RING_MAX_SIZE)}"
            )
        if ring_size > per_ring:
            raise LayoutError(
                f"ring size {format_size(ring_size)} for {max_peers} peers does not fit in "
                f"{format_size(size)}; use --size "
                f"{format_size(min_region_size(max_peers, ring_size))} or more"
            )
    return Layout(
        size=size,
        max_peers=max_peers,
        ring_size=ring_size,
        dir_offset=abi.IVL_HDR_SIZE,
        rings_offset=rings_offset,
        ring_stride=abi.IVL_RING_CTRL_SIZE + ring_size,
    )


@dataclass(frozen=True)
class SlotView:
    """A snapshot of one directory slot, decoded.

    ``index`` is the slot (directory and ring index); ``peer_id`` the QEMU
    peer ID (IVPosition) of its occupant, meaningful while ``present`` (after
    a leave it still holds the departed occupant's ID).
    """

    index: int
    present: bool
    peer_id: int
    generation: int
    mac: bytes
    state: abi.IvlSlotState | int  # an int when the guest wrote an unknown value
    heartbeat: int
    joined_gen: int

    @property
    def mac_str(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    @classmethod
    def from_struct(cls, index: int, raw: abi.IvlSlot) -> SlotView:
        state: abi.IvlSlotState | int
        try:
            state = abi.IvlSlotState(raw.state)
        except ValueError:
            state = int(raw.state)
        return cls(
            index=index,
            present=raw.present != 0,
            peer_id=raw.peer_id,
            generation=raw.generation,
            mac=bytes(raw.mac),
            state=state,
            heartbeat=raw.heartbeat,
            joined_gen=raw.joined_gen,
        )


def _field(cls: type[ctypes.LittleEndianStructure], name: str, fmt: str) -> tuple[int, str]:
    descr = getattr(cls, name)
    assert struct.calcsize(fmt) == descr.size, (name, fmt)
    return descr.offset, fmt


# (offset within its struct, struct format) of each field the server writes.
_HDR_GENERATION = _field(_HDR, "generation", "<Q")
_HDR_NR_PRESENT = _field(_HDR, "nr_present", "<I")
_SLOT_PRESENT = _field(_SLOT, "present", "<I")
_SLOT_PEER_ID = _field(_SLOT, "peer_id", "<I")
_SLOT_GENERATION = _field(_SLOT, "generation", "<Q")


class Region:
    """A mapped ivloop region.

    Create one for a server with :meth:`create`; look at one another process
    owns with :meth:`attach` (read-only unless asked).  Close it, or use it
    as a context manager.
    """

    def __init__(self, fd: int, mapping: mmap.mmap, layout: Layout, *, owner: bool) -> None:
        self._fd = fd
        self._map = mapping
        self.layout = layout
        self._owner = owner
        self._closed = False

    # -- construction ---------------------------------------------------

    @classmethod
    def create(
        cls,
        size: int,
        max_peers: int,
        ring_size: int | None = None,
        *,
        name: str = DEFAULT_MEMFD_NAME,
    ) -> Self:
        """Create, size, seal and initialise a new memfd region."""
        layout = compute_layout(size, max_peers, ring_size)
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise RegionError(f"cannot create the shared memory (memfd_create): {exc}") from exc
        try:
            os.ftruncate(fd, size)
            # Nobody, not even a QEMU holding the fd, may resize the region
            # under the mappings (that would turn accesses into SIGBUS).
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            )
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise RegionError(
                f"cannot size or map {format_size(size)} of shared memory: {exc}"
            ) from exc
        region = cls(fd, mapping, layout, owner=True)
        region._init_header()
        return region

    @classmethod
    def attach(cls, source: int | str | os.PathLike[str], *, writable: bool = False) -> Self:
        """Map an existing region from an fd or a path, and validate its header.

        ``source`` may be an open fd (it is duplicated), a file holding a
        region, or ``/proc/PID/fd/N`` of a process holding the memfd (see
        :func:`find_server_region`).
        """
        try:
            if isinstance(source, int):
                fd = os.dup(source)
            else:
                fd = os.open(source, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise RegionError(f"cannot open region {source}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < abi.IVL_HDR_SIZE:
                raise RegionError(f"{source} is not an ivloop region (too small or not a file)")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mapping = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, prot)
        except OSError as exc:
            os.close(fd)
            raise RegionError(f"cannot map region {source}: {exc}") from exc
        except RegionError:
            os.close(fd)
            raise
        try:
            hdr = _HDR.from_buffer_copy(mapping, 0)
            layout = cls._validate(hdr, st.st_size, source)
        except RegionError:
            mapping.close()
            os.close(fd)
            raise
        return cls(fd, mapping, layout, owner=False)

    @staticmethod
    def _validate(hdr: abi.IvlRegionHdr, file_size: int, source: object) -> Layout:
        if hdr.magic != abi.IVL_MAGIC:
            raise RegionError(f"{source}: bad magic {hdr.magic:#x}, not an ivloop region")
        if hdr.version != abi.IVL_ABI_VERSION:
            raise RegionError(
                f"{source}: ABI version {hdr.version}, this tool knows {abi.IVL_ABI_VERSION}"
            )
        if hdr.region_size != file_size:
            raise RegionError(
                f"{source}: header says {hdr.region_size} bytes, the file has {file_size}"
            )
        try:
            layout = compute_layout(hdr.region_size, hdr.max_peers, hdr.ring_size)
        except LayoutError as exc:
            raise RegionError(f"{source}: inconsistent header: {exc}") from exc
        found = (hdr.dir_offset, hdr.slot_size, hdr.rings_offset, hdr.ring_stride)
        expected = (layout.dir_offset, abi.IVL_SLOT_SIZE, layout.rings_offset, layout.ring_stride)
        if found != expected:
            raise RegionError(f"{source}: inconsistent header: layout {found} != {expected}")
        return layout

    def _init_header(self) -> None:
        lay = self.layout
        hdr = _HDR(
            magic=abi.IVL_MAGIC,
            version=abi.IVL_ABI_VERSION,
            region_size=lay.size,
            max_peers=lay.max_peers,
            ring_size=lay.ring_size,
            dir_offset=lay.dir_offset,
            slot_size=abi.IVL_SLOT_SIZE,
            rings_offset=lay.rings_offset,
            ring_stride=lay.ring_stride,
            generation=0,
            nr_present=0,
        )
        # A fresh memfd reads as zeroes, so the directory and rings are zero
        # already; write them anyway so the invariant does not rest on that.
        self._zero(lay.dir_offset, lay.max_peers * abi.IVL_SLOT_SIZE)
        self._map[0 : ctypes.sizeof(hdr)] = bytes(hdr)

    # -- lifetime -------------------------------------------------------

    @property
    def fd(self) -> int:
        """The region's file descriptor (the server sends it to each QEMU)."""
        self._check_open()
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._map.close()
        os.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RegionError("region is closed")

    # -- reading --------------------------------------------------------

    def header(self) -> abi.IvlRegionHdr:
        """A copy of the header."""
        self._check_open()
        return _HDR.from_buffer_copy(self._map, 0)

    def slot(self, index: int) -> SlotView:
        self._check_open()
        raw = _SLOT.from_buffer_copy(self._map, self.layout.slot_offset(index))
        return SlotView.from_struct(index, raw)

    def directory(self) -> list[SlotView]:
        """Snapshots of every directory slot, in slot order."""
        return [self.slot(i) for i in range(self.layout.max_peers)]

    def slot_of(self, peer_id: int) -> SlotView | None:
        """The present slot whose occupant has QEMU peer ID ``peer_id``, if any.

        This is how a guest finds its own slot (``peer_id`` == IVPosition).
        """
        return next((s for s in self.directory() if s.present and s.peer_id == peer_id), None)

    def ring_ctrl(self, producer: int, consumer: int) -> abi.IvlRingCtrl:
        self._check_open()
        return abi.IvlRingCtrl.from_buffer_copy(
            self._map, self.layout.ring_offset(producer, consumer)
        )

    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.layout.size:
            raise IndexError(f"range {offset}+{length} outside the region")
        return self._map[offset : offset + length]

    def as_dict(self) -> dict[str, object]:
        """Header and directory as plain data (for --dump and the harness)."""
        hdr = self.header()
        return {
            "header": {name: getattr(hdr, name) for name, *_ in _HDR._fields_ if name != "pad"},
            "directory": [
                {
                    "index": s.index,
                    "present": s.present,
                    "peer_id": s.peer_id,
                    "generation": s.generation,
                    "mac": s.mac_str,
                    "state": s.state.name if isinstance(s.state, abi.IvlSlotState) else s.state,
                    "heartbeat": s.heartbeat,
                    "joined_gen": s.joined_gen,
                }
                for s in self.directory()
            ],
        }

    # -- writing (server side) -------------------------------------------

    def _put(self, base: int, field: tuple[int, str], value: int) -> None:
        offset, fmt = field
        struct.pack_into(fmt, self._map, base + offset, value)

    def _get(self, base: int, field: tuple[int, str]) -> int:
        offset, fmt = field
        value: int = struct.unpack_from(fmt, self._map, base + offset)[0]
        return value

    def _zero(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self._map[offset : offset + n] = zeros[:n] if n < len(zeros) else zeros
            offset += n

    def zero_rings_of(self, slot: int) -> None:
        """Zero every ring to and from slot index ``slot`` (control blocks and data)."""
        self._check_open()
        lay = self.layout
        for other in range(lay.max_peers):
            self._zero(lay.ring_offset(slot, other), lay.ring_stride)
            if other != slot:
                self._zero(lay.ring_offset(other, slot), lay.ring_stride)

    def _set_presence(self, index: int, peer_id: int | None) -> int:
        """Join (``peer_id`` given) or leave (None) slot ``index``."""
        self._check_open()
        if not self._owner:
            raise RegionError("only the server that created a region writes its directory")
        present = peer_id is not None
        slot = self.layout.slot_offset(index)
        generation = self._get(0, _HDR_GENERATION) + 1
        nr_present = self._get(0, _HDR_NR_PRESENT) + (1 if present else -1)
        # Payload first, generations last: the header's generation is what a
        # guest polls, so it is the very last store.  A leave keeps peer_id.
        if peer_id is not None:
            self._put(slot, _SLOT_PEER_ID, peer_id)
        self._put(slot, _SLOT_PRESENT, 1 if present else 0)
        self._put(0, _HDR_NR_PRESENT, nr_present)
        self._put(slot, _SLOT_GENERATION, generation)
        self._put(0, _HDR_GENERATION, generation)
        return generation

    def mark_present(self, index: int, peer_id: int) -> int:
        """Record that QEMU peer ``peer_id`` joined in slot ``index``; return the new generation.

        ``peer_id`` is written before ``present`` and the generations.
        """
        if not 0 <= peer_id <= MAX_PEER_ID:
            raise RegionError(f"peer ID {peer_id} is outside 0..{MAX_PEER_ID}")
        if self._get(self.layout.slot_offset(index), _SLOT_PRESENT):
            raise RegionError(f"slot {index} is already present")
        return self._set_presence(index, peer_id)

    def mark_absent(self, index: int) -> int:
        """Record a leave in slot ``index`` (``peer_id`` is kept); return the new generation."""
        if not self._get(self.layout.slot_offset(index), _SLOT_PRESENT):
            raise RegionError(f"slot {index} is not present")
        return self._set_presence(index, None)


def find_server_region(pid: int, name: str = DEFAULT_MEMFD_NAME) -> Path:
    """``/proc/PID/fd/N`` of the ivloop memfd held by server process ``pid``."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = sorted(fd_dir.iterdir(), key=lambda p: int(p.name))
    except OSError as exc:
        raise RegionError(f"cannot list the fds of process {pid}: {exc}") from exc
    for entry in entries:
        with contextlib.suppress(OSError):
            if os.readlink(entry).startswith(f"/memfd:{name} "):
                return entry
    raise RegionError(f"process {pid} holds no memfd named {name!r}; is it an ivloop-server?")


def read_directory(source: int | str | os.PathLike[str]) -> list[SlotView]:
    """Directory of the region at ``source`` (fd, path, or /proc/PID/fd/N)."""
    with Region.attach(source) as region:
        return region.directory()


def iter_present(region: Region) -> Iterator[SlotView]:
    return (slot for slot in region.directory() if slot.present)
