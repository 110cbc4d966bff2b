"""The shared region: a memfd holding header, peer directory and rings.

::

    [ header | directory: max_peers slots | ring i->j for every ordered pair ]

:func:`compute_layout` turns a size and a peer count into offsets;
:class:`Region` creates the memfd (or attaches to an existing region, for
introspection) and reads and writes the fields the server owns.

The server half of a slot is written only by :meth:`Region._write_server_half`,
under the ABI-2 sequence protocol: ``srv_seq`` odd, the fields, ``srv_seq``
even.  The header's ``nr_present`` and ``generation`` follow, generation
last.  The server keeps its own state (generation, presence, each slot's
seq) in Python and never reads it back from the region: every byte of the
region is untrusted, and a guest that scribbles over the header or a
server half must not steer the server; :meth:`Region.repair` puts back
what a member overwrote.  Guest halves are read with the same protocol by
:meth:`Region.read_guest_half`.

Why plain stores are enough: on x86-64 (TSO) stores from one thread become
visible to other CPUs in program order, and loads are not reordered with
other loads, so the guest's barriers (smp_wmb/smp_rmb are compiler
barriers there) have nothing to add on this side.  What Python must supply
is program order and single, untorn word accesses: each access here is its
own C call (``struct.pack_into``/``unpack_from``), so nothing is reordered
across it, and the *native* formats ("I", "Q") copy the word with one
fixed-size memcpy, which compiles to one aligned mov.  (The "<I" standard
formats store byte by byte; a reader could then see a half-updated seq.)
Native equals the ABI's little-endian on every host this runs on, which
:data:`_NATIVE_OK` checks.

A slot's index (its place in the directory and the ring matrix) is not the
QEMU peer ID of its occupant: the server never gives a peer ID out twice
(QEMU's ivshmem cannot take one back), while slots are reused.  Each slot
records its occupant's ID in ``peer_id``.  A leave clears ``present`` (and
may add IVL_SLOT_F_EVICTED); ``peer_id``, ``nic_mac`` and MAC_KNOWN keep
the departed occupant's values (useful when reading a dump) until the next
join overwrites them.  Since IDs are never reused, a
stale ``peer_id`` can never equal the IVPosition of a live guest.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
import platform
import stat
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from . import abi
from .errors import LayoutError, RegionError
from .protocol import MAX_PEER_ID

log = logging.getLogger(__name__)

PAGE_SIZE: Final = 4096
DEFAULT_MEMFD_NAME: Final = "ivloop"
_ZERO_CHUNK: Final = 1 << 20
# fallocate(2) modes (linux/falloc.h)
_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02


def _libc_fallocate() -> ctypes._NamedFuncPointer | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate()


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        have = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return have >= (major, minor)


# hugetlbfs zeroes the partial huge pages of a punched hole from 6.1 on
_HUGETLB_ZEROES_EDGES: Final = _kernel_at_least(6, 1)

_HDR = abi.IvlRegionHdr
_SLOT = abi.IvlSlot
MAC_LEN: Final = 6
#: Reads of a guest half before giving up for this round (the guest driver
#: uses the same bound): a writer caught mid-update is retried at once, one
#: that stays odd is skipped.
GUEST_HALF_TRIES: Final = 4

# The ordering argument in the module docstring holds for x86-64 only; the
# native formats equal the ABI's byte order only on little-endian hosts.
_NATIVE_OK: Final = sys.byteorder == "little" and platform.machine() in ("x86_64", "AMD64")


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


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass(frozen=True)
class SlotView:
    """A snapshot of one directory slot, decoded, copied in one go.

    It is not taken under the sequence protocol (it is for dumps and
    tests); decisions use :meth:`Region.read_guest_half`.  ``index`` is the
    slot (directory and ring index); ``peer_id`` the QEMU peer ID
    (IVPosition) of its occupant, meaningful while ``present`` (after a
    leave it still holds the departed occupant's ID, as ``nic_mac`` and
    ``srv_flags`` keep theirs).
    """

    index: int
    present: bool
    peer_id: int
    generation: int
    srv_seq: int
    srv_flags: int
    nic_mac: bytes
    mac: bytes
    state: abi.IvlSlotState | int  # an int when the guest wrote an unknown value
    seq: int
    heartbeat: int
    joined_gen: int
    leave_ack: int

    @property
    def mac_str(self) -> str:
        return format_mac(self.mac)

    @property
    def nic_mac_str(self) -> str:
        return format_mac(self.nic_mac)

    @property
    def mac_known(self) -> bool:
        return bool(self.srv_flags & abi.IVL_SLOT_F_MAC_KNOWN)

    @property
    def evicted(self) -> bool:
        return bool(self.srv_flags & abi.IVL_SLOT_F_EVICTED)

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
            srv_seq=raw.srv_seq,
            srv_flags=raw.srv_flags,
            nic_mac=bytes(raw.nic_mac),
            mac=bytes(raw.mac),
            state=state,
            seq=raw.seq,
            heartbeat=raw.heartbeat,
            joined_gen=raw.joined_gen,
            leave_ack=raw.leave_ack,
        )


@dataclass(frozen=True)
class ServerHalf:
    """What the server publishes in a slot's first cache line."""

    present: bool = False
    peer_id: int = 0
    generation: int = 0
    flags: int = 0  # IVL_SLOT_F_*
    nic_mac: bytes = bytes(MAC_LEN)


@dataclass(frozen=True)
class RegionRecord:
    """A server's own view of a region it published (:meth:`Region.record`, parsed)."""

    size: int
    max_peers: int
    ring_size: int
    page: int
    generation: int
    nr_present: int
    srv_seq: tuple[int, ...]
    halves: tuple[ServerHalf, ...]


@dataclass(frozen=True)
class GuestHalf:
    """A consistent copy of the fields a guest publishes under its ``seq``."""

    mac: bytes
    state: int  # raw: a hostile guest may write any value
    joined_gen: int
    seq: int

    @property
    def mac_str(self) -> str:
        return format_mac(self.mac)


def _offset(cls: type[ctypes.LittleEndianStructure], name: str) -> int:
    offset: int = getattr(cls, name).offset
    return offset


def _field(cls: type[ctypes.LittleEndianStructure], name: str, fmt: str) -> tuple[int, str]:
    descr = getattr(cls, name)
    assert struct.calcsize(fmt) == descr.size, (name, fmt)
    return descr.offset, fmt


# (offset within its struct, native struct format) of each word the server
# writes or the seq protocol reads: native, so that each is one untorn access.
_HDR_GENERATION = _field(_HDR, "generation", "Q")
_HDR_NR_PRESENT = _field(_HDR, "nr_present", "I")
_SLOT_PRESENT = _field(_SLOT, "present", "I")
_SLOT_PEER_ID = _field(_SLOT, "peer_id", "I")
_SLOT_GENERATION = _field(_SLOT, "generation", "Q")
_SLOT_SRV_SEQ = _field(_SLOT, "srv_seq", "I")
_SLOT_SRV_FLAGS = _field(_SLOT, "srv_flags", "I")
_SLOT_NIC_MAC: Final = _offset(_SLOT, "nic_mac")
_SLOT_RESERVED0: Final = _offset(_SLOT, "reserved0")
_SLOT_SEQ = _field(_SLOT, "seq", "I")
_SLOT_STATE = _field(_SLOT, "state", "I")
_SLOT_JOINED_GEN = _field(_SLOT, "joined_gen", "Q")
_SLOT_MAC: Final = _offset(_SLOT, "mac")
# The guest half's seq-protected fields, copied in one go: mac .. joined_gen.
_GUEST_SPAN: Final = (_SLOT_MAC, _SLOT_JOINED_GEN[0] + struct.calcsize(_SLOT_JOINED_GEN[1]))
_U32_MASK: Final = 0xFFFFFFFF
# A slot's whole server cache line: present, peer_id, generation, srv_seq,
# srv_flags, nic_mac, reserved0, pad0 (zero).
_SERVER_LINE: Final = struct.Struct("<IIQII6sH32x")
assert _SERVER_LINE.size == abi.IVL_CACHELINE


def _store(buf: mmap.mmap, offset: int, fmt: str, value: int) -> None:
    """One aligned native store (see the module docstring)."""
    struct.pack_into(fmt, buf, offset, value)


def _load(buf: mmap.mmap, offset: int, fmt: str) -> int:
    """One aligned native load."""
    value: int = struct.unpack_from(fmt, buf, offset)[0]
    return value


def _store_bytes(buf: mmap.mmap, offset: int, data: bytes) -> None:
    buf[offset : offset + len(data)] = data


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
        # The server's own view of what it published; never read back from
        # the region (guests can write there).
        self._generation = 0
        self._nr_present = 0
        self._halves = [ServerHalf() for _ in range(layout.max_peers)]
        self._srv_seq = [0] * layout.max_peers
        self._hdr_shadow: abi.IvlRegionHdr | None = None  # set by _init_header
        # Pages handed back to the kernel whole (a hole in the memfd) are this
        # big; a huge-page region's are its huge pages.
        self._page = mmap.PAGESIZE
        self._can_punch = _fallocate is not None

    # -- construction ---------------------------------------------------

    @classmethod
    def create(
        cls,
        size: int,
        max_peers: int,
        ring_size: int | None = None,
        *,
        name: str = DEFAULT_MEMFD_NAME,
        hugepage_size: int | None = None,
    ) -> Self:
        """Create, size, seal and initialise a new memfd region.

        With ``hugepage_size`` the memfd is backed by huge pages of that size
        (MFD_HUGETLB, sealed just the same), taken from the host's pool.
        """
        layout = compute_layout(size, max_peers, ring_size)
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        if hugepage_size is not None:
            if not is_power_of_two(hugepage_size) or size % hugepage_size:
                raise RegionError(
                    f"a {format_size(size)} region cannot be made of "
                    f"{format_size(hugepage_size)} huge pages"
                )
            flags |= os.MFD_HUGETLB | ((hugepage_size.bit_length() - 1) << os.MFD_HUGE_SHIFT)
        if not _NATIVE_OK:
            log.warning(
                "this host is %s/%s-endian: the directory's sequence protocol relies on x86-64 "
                "store ordering, guests may see torn directory entries",
                platform.machine(),
                sys.byteorder,
            )
        try:
            fd = os.memfd_create(name, flags)
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
            hint = ""
            if hugepage_size is not None:
                hint = (f" (are {size // hugepage_size} huge pages of "
                        f"{format_size(hugepage_size)} free? see /proc/meminfo)")  # fmt: skip
            raise RegionError(
                f"cannot size or map {format_size(size)} of shared memory: {exc}{hint}"
            ) from exc
        region = cls(fd, mapping, layout, owner=True)
        region._page = hugepage_size or mmap.PAGESIZE
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

    def _header_for(self, generation: int, nr_present: int) -> abi.IvlRegionHdr:
        lay = self.layout
        return _HDR(
            magic=abi.IVL_MAGIC,
            version=abi.IVL_ABI_VERSION,
            region_size=lay.size,
            max_peers=lay.max_peers,
            ring_size=lay.ring_size,
            dir_offset=lay.dir_offset,
            slot_size=abi.IVL_SLOT_SIZE,
            rings_offset=lay.rings_offset,
            ring_stride=lay.ring_stride,
            generation=generation,
            nr_present=nr_present,
        )

    def _init_header(self) -> None:
        lay = self.layout
        hdr = self._header_for(0, 0)
        # A fresh memfd reads as zeroes, so the directory and rings are zero
        # already; write them anyway so the invariant does not rest on that.
        # No QEMU has the fd yet, so this is the one write of server halves
        # that needs no sequence protocol (and it matches the zeroed shadow).
        self._zero(lay.dir_offset, lay.max_peers * abi.IVL_SLOT_SIZE)
        self._map[0 : ctypes.sizeof(hdr)] = bytes(hdr)
        self._hdr_shadow = hdr

    # -- handing over to the next server process --------------------------

    def record(self) -> dict[str, object]:
        """The server's own view of what it published, as plain data (JSON-able).

        With the memfd, this is all :meth:`adopt` needs to carry on writing
        the directory where this object stopped.
        """
        self._check_writer()
        return {
            "size": self.layout.size,
            "max_peers": self.layout.max_peers,
            "ring_size": self.layout.ring_size,
            "page": self._page,
            "generation": self._generation,
            "nr_present": self._nr_present,
            "srv_seq": list(self._srv_seq),
            "halves": [
                {"present": h.present, "peer_id": h.peer_id, "generation": h.generation,
                 "flags": h.flags, "nic_mac": h.nic_mac.hex()}
                for h in self._halves
            ],
        }  # fmt: skip

    @classmethod
    def adopt(cls, fd: int, record: RegionRecord) -> Self:
        """Take over a region another server process created, from its :meth:`record`.

        ``fd`` (owned from here on, closed on failure) must be a sealed memfd
        of the recorded size.  Nothing is read back from the region: the
        record is the server's truth, and the first :meth:`repair` restores
        whatever members wrote over the server's bytes in between.
        """
        try:
            layout = compute_layout(record.size, record.max_peers, record.ring_size)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != layout.size:
                raise RegionError(f"the handed-over region is {st.st_size} bytes, "
                                  f"not the {layout.size} its record says")  # fmt: skip
            wanted = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & wanted != wanted:
                raise RegionError("the handed-over region is not a sealed memfd")
            mapping = mmap.mmap(fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, LayoutError) as exc:
            os.close(fd)
            raise RegionError(f"cannot take over the handed-over region: {exc}") from exc
        except RegionError:
            os.close(fd)
            raise
        region = cls(fd, mapping, layout, owner=True)
        region._page = record.page
        region._generation = record.generation
        region._nr_present = record.nr_present
        region._srv_seq = list(record.srv_seq)
        region._halves = list(record.halves)
        region._hdr_shadow = region._header_for(record.generation, record.nr_present)
        return region

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
                    "srv_seq": s.srv_seq,
                    "srv_flags": s.srv_flags,
                    "mac_known": s.mac_known,
                    "evicted": s.evicted,
                    "nic_mac": s.nic_mac_str,
                    "mac": s.mac_str,
                    "state": s.state.name if isinstance(s.state, abi.IvlSlotState) else s.state,
                    "seq": s.seq,
                    "heartbeat": s.heartbeat,
                    "joined_gen": s.joined_gen,
                    "leave_ack": s.leave_ack,
                }
                for s in self.directory()
            ],
        }

    def read_guest_half(self, index: int, tries: int = GUEST_HALF_TRIES) -> GuestHalf | None:
        """The guest half of slot ``index`` under its seq, or None if it never settled.

        Up to ``tries`` attempts: load seq; odd means the guest is mid-update;
        else copy the fields and load seq again; equal means the copy is one
        the guest published.  No sleeping in between: a guest preempted
        mid-update is simply skipped this round.
        """
        self._check_open()
        base = self.layout.slot_offset(index)
        start, end = _GUEST_SPAN
        for _ in range(tries):
            seq1 = _load(self._map, base + _SLOT_SEQ[0], _SLOT_SEQ[1])
            if seq1 & 1:
                continue
            raw = self._map[base + start : base + end]
            seq2 = _load(self._map, base + _SLOT_SEQ[0], _SLOT_SEQ[1])
            if seq1 != seq2:
                continue
            state_off = _SLOT_STATE[0] - start
            jg_off = _SLOT_JOINED_GEN[0] - start
            return GuestHalf(
                mac=raw[:MAC_LEN],
                state=struct.unpack_from("<I", raw, state_off)[0],
                joined_gen=struct.unpack_from("<Q", raw, jg_off)[0],
                seq=seq1,
            )
        return None

    # -- writing (server side) -------------------------------------------

    def _zero(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self._map[offset : offset + n] = zeros[:n] if n < len(zeros) else zeros
            offset += n

    def _discard(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeroes, holding no memory where it can.

        A hole punched in the memfd: the pages wholly inside go back to the
        kernel (the next reader or writer gets a fresh zero page, in every
        mapping), and the kernel zeroes the partial pages at the edges only
        where they exist, so a ring costs host memory only once a pair uses
        it.  Huge pages' partial edges are zeroed by the kernel from Linux
        6.1 on; before that, and where the kernel cannot punch at all, the
        edges (or the whole range) are written with zeroes.
        """
        if self._can_punch and _fallocate is not None:
            rc = _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            if rc == 0:
                if self._page != mmap.PAGESIZE and not _HUGETLB_ZEROES_EDGES:
                    start = _round_up(offset, self._page)
                    end = max(start, (offset + length) // self._page * self._page)
                    self._zero(offset, min(start, offset + length) - offset)
                    self._zero(end, offset + length - end)
                return
            err = ctypes.get_errno()
            log.info("cannot punch holes in the shared memory (%s): rings are zeroed by "
                     "writing instead, which keeps their memory", os.strerror(err))
            self._can_punch = False
        self._zero(offset, length)

    def zero_rings_of(self, slot: int) -> None:
        """Every ring to and from slot index ``slot`` zeroed, its memory given back.

        The rings from ``slot`` are one run of the ring matrix (its row), the
        rings to it one ring per other slot (its column).
        """
        self._check_open()
        lay = self.layout
        self._discard(lay.ring_offset(slot, 0), lay.max_peers * lay.ring_stride)
        for other in range(lay.max_peers):
            if other != slot:
                self._discard(lay.ring_offset(other, slot), lay.ring_stride)

    def allocated_bytes(self) -> int:
        """Memory the region holds now: the memfd's allocated blocks, whoever touched them."""
        self._check_open()
        return os.fstat(self._fd).st_blocks * 512

    def _check_writer(self) -> None:
        self._check_open()
        if not self._owner:
            raise RegionError("only the server that created a region writes its directory")

    def server_half(self, index: int) -> ServerHalf:
        """What the server last published in slot ``index`` (its own record, not the region)."""
        self.layout.slot_offset(index)  # range check
        return self._halves[index]

    def _write_server_half(self, index: int, half: ServerHalf) -> None:
        """Publish ``half`` in slot ``index``: the only writer of present, peer_id,
        generation, srv_flags and nic_mac.

        srv_seq goes odd first (readers retry, or keep their previous view),
        then the fields, then srv_seq goes even.  The stores become visible
        in this order (module docstring), so a reader that saw the same even
        srv_seq before and after its copy saw exactly one published half.
        """
        self._check_writer()
        if len(half.nic_mac) != MAC_LEN:
            raise RegionError(f"nic_mac must be {MAC_LEN} bytes, not {len(half.nic_mac)}")
        if half.flags & ~abi.IVL_SLOT_KNOWN_FLAGS:
            raise RegionError(f"unknown slot flags {half.flags:#x}")
        base = self.layout.slot_offset(index)
        seq = self._srv_seq[index]
        m = self._map
        _store(m, base + _SLOT_SRV_SEQ[0], _SLOT_SRV_SEQ[1], (seq + 1) & _U32_MASK)
        _store(m, base + _SLOT_PEER_ID[0], _SLOT_PEER_ID[1], half.peer_id)
        _store(m, base + _SLOT_PRESENT[0], _SLOT_PRESENT[1], 1 if half.present else 0)
        _store(m, base + _SLOT_GENERATION[0], _SLOT_GENERATION[1], half.generation)
        _store(m, base + _SLOT_SRV_FLAGS[0], _SLOT_SRV_FLAGS[1], half.flags)
        _store_bytes(m, base + _SLOT_NIC_MAC, half.nic_mac)
        # reserved0 and pad0 too, so a scribbled line is restored whole.
        _store_bytes(m, base + _SLOT_RESERVED0, bytes(abi.IVL_CACHELINE - _SLOT_RESERVED0))
        seq = (seq + 2) & _U32_MASK
        _store(m, base + _SLOT_SRV_SEQ[0], _SLOT_SRV_SEQ[1], seq)
        self._srv_seq[index] = seq
        self._halves[index] = half

    def _publish_generation(self, nr_present: int, generation: int) -> None:
        # The header's generation is what a guest polls: the very last store.
        _store(self._map, _HDR_NR_PRESENT[0], _HDR_NR_PRESENT[1], nr_present)
        _store(self._map, _HDR_GENERATION[0], _HDR_GENERATION[1], generation)
        self._nr_present = nr_present
        self._generation = generation
        assert self._hdr_shadow is not None
        self._hdr_shadow.nr_present = nr_present
        self._hdr_shadow.generation = generation

    def _expected_server_line(self, index: int) -> bytes:
        half = self._halves[index]
        return _SERVER_LINE.pack(
            1 if half.present else 0,
            half.peer_id,
            half.generation,
            self._srv_seq[index],
            half.flags,
            half.nic_mac,
            0,
        )

    def repair(self) -> tuple[bool, dict[int, SlotView]]:
        """Undo what region members wrote over the server's own bytes.

        Any member can write anywhere, including a slot's server half (to
        rewrite its own nic_mac or MAC_KNOWN, or fake a rejoin) and the
        header.  Each call compares the header and every slot's server
        cache line with what the server published and rewrites whatever
        differs (slots through :meth:`_write_server_half`).  Returns whether
        the header was restored and, by slot, the slot as it was found.
        """
        self._check_writer()
        assert self._hdr_shadow is not None
        expected_hdr = bytes(self._hdr_shadow)
        header = self._map[0 : len(expected_hdr)] != expected_hdr
        if header:
            self._map[0 : len(expected_hdr)] = expected_hdr
        found: dict[int, SlotView] = {}
        for index in range(self.layout.max_peers):
            base = self.layout.slot_offset(index)
            if self._map[base : base + _SERVER_LINE.size] != self._expected_server_line(index):
                found[index] = self.slot(index)
                self._write_server_half(index, self._halves[index])
        return header, found

    def mark_present(self, index: int, peer_id: int, nic_mac: bytes | None = None) -> int:
        """Record that QEMU peer ``peer_id`` joined in slot ``index``; return the new generation.

        ``nic_mac``, when the server knows the occupant's data-NIC MAC, is
        published with IVL_SLOT_F_MAC_KNOWN; without it the flag is clear
        and nic_mac is zero.
        """
        self._check_writer()
        if not 0 <= peer_id <= MAX_PEER_ID:
            raise RegionError(f"peer ID {peer_id} is outside 0..{MAX_PEER_ID}")
        if self.server_half(index).present:
            raise RegionError(f"slot {index} is already present")
        if nic_mac is not None and len(nic_mac) != MAC_LEN:
            raise RegionError(f"nic_mac must be {MAC_LEN} bytes, not {len(nic_mac)}")
        generation = self._generation + 1
        self._write_server_half(
            index,
            ServerHalf(
                present=True,
                peer_id=peer_id,
                generation=generation,
                flags=abi.IVL_SLOT_F_MAC_KNOWN if nic_mac is not None else 0,
                nic_mac=nic_mac if nic_mac is not None else bytes(MAC_LEN),
            ),
        )
        self._publish_generation(self._nr_present + 1, generation)
        return generation

    def mark_absent(self, index: int, *, evicted: bool = False) -> int:
        """Record a leave in slot ``index``; return the new generation.

        peer_id, nic_mac and MAC_KNOWN are kept (useful in a dump) until the
        next join overwrites them.  ``evicted`` adds IVL_SLOT_F_EVICTED in
        the same update, so no reader sees the leave without the reason.
        """
        self._check_writer()
        old = self.server_half(index)
        if not old.present:
            raise RegionError(f"slot {index} is not present")
        generation = self._generation + 1
        flags = old.flags | (abi.IVL_SLOT_F_EVICTED if evicted else 0)
        self._write_server_half(
            index, ServerHalf(False, old.peer_id, generation, flags, old.nic_mac)
        )
        self._publish_generation(self._nr_present - 1, generation)
        return generation


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
