"""Python mirror of guest-driver/ivl_abi.h, the ivloop shared-region ABI.

The C header is the single source of truth.  tests/server/test_abi.py
compiles a probe of it and compares every constant, every struct size and
every field offset and size with this module, so any drift fails a test.

All multi-byte fields are little-endian; the structures are
``ctypes.LittleEndianStructure`` so they mean the same on any host.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Final

IVL_MAGIC: Final = 0x504C5649  # "IVLP" in memory order
IVL_ABI_VERSION: Final = 2

IVL_CACHELINE: Final = 64
IVL_HDR_SIZE: Final = 4096  # the header owns the first page
IVL_SLOT_SIZE: Final = 128  # sizeof(struct ivl_slot)
IVL_MAX_PEERS: Final = 64  # hard cap on max_peers
IVL_RING_CTRL_SIZE: Final = 256  # sizeof(struct ivl_ring_ctrl)
IVL_RING_MIN_SIZE: Final = 256 * 1024  # fits a 64 KiB TSO frame twice
IVL_RING_MAX_SIZE: Final = 64 * 1024 * 1024
IVL_REC_ALIGN: Final = 16
IVL_MAX_FRAME: Final = 65536 + 256  # GSO frame + L2 headroom

# Doorbell (MSI-X) vectors.
IVL_VEC_MEMBERSHIP: Final = 0  # directory changed
IVL_VEC_DATA: Final = 1  # a ring has new records or space
IVL_NR_VECTORS: Final = 2

# ivshmem BAR0 registers (QEMU docs/specs/ivshmem-spec.rst).
IVL_REG_INTRMASK: Final = 0x00
IVL_REG_INTRSTATUS: Final = 0x04
IVL_REG_IVPOSITION: Final = 0x08
IVL_REG_DOORBELL: Final = 0x0C

# srv_flags.  MAC_KNOWN: the server learned nic_mac from the occupant's QEMU
# (its command line or the operator's map); guests send to the slot only while
# its mac equals nic_mac.  EVICTED: the server caught the occupant claiming a
# MAC that is not its NIC's and cut it off; guests treat the slot as absent.
IVL_SLOT_F_MAC_KNOWN: Final = 0x0001
IVL_SLOT_F_EVICTED: Final = 0x0002
IVL_SLOT_KNOWN_FLAGS: Final = 0x0003

# A leaver waits this long for every UP peer's leave_ack bit.
IVL_LEAVE_ACK_MS: Final = 500

IVL_HEARTBEAT_MS: Final = 100
IVL_HEARTBEAT_TIMEOUT_MS: Final = 1000

IVL_REC_PAD: Final = 0x0001  # filler up to the ring's end
IVL_REC_CSUM_PARTIAL: Final = 0x0002  # checksum still to be filled in
IVL_REC_CSUM_VALID: Final = 0x0004  # checksum already verified
IVL_REC_KNOWN_FLAGS: Final = 0x0007

IVL_GSO_NONE: Final = 0
IVL_GSO_TCPV4: Final = 1
IVL_GSO_TCPV6: Final = 2
IVL_GSO_UDP_L4: Final = 3
IVL_GSO_ECN: Final = 0x80  # or'ed into gso_type


class IvlSlotState(enum.IntEnum):
    """enum ivl_slot_state: written by the guest into its slot."""

    IVL_STATE_DOWN = 0  # no driver, or driver not ready
    IVL_STATE_UP = 1  # consuming its rings; peers may send
    IVL_STATE_LEAVING = 2  # draining: peers must stop sending


IVL_STATE_DOWN: Final = IvlSlotState.IVL_STATE_DOWN
IVL_STATE_UP: Final = IvlSlotState.IVL_STATE_UP
IVL_STATE_LEAVING: Final = IvlSlotState.IVL_STATE_LEAVING

_u8 = ctypes.c_uint8
_le16 = ctypes.c_uint16
_le32 = ctypes.c_uint32
_le64 = ctypes.c_uint64


# The class-level annotations only tell mypy the Python type each ctypes
# field converts to; ctypes itself reads _fields_.


class IvlRegionHdr(ctypes.LittleEndianStructure):
    """struct ivl_region_hdr, at offset 0; written by the server only."""

    magic: int
    version: int
    region_size: int
    max_peers: int
    ring_size: int
    dir_offset: int
    slot_size: int
    rings_offset: int
    ring_stride: int
    generation: int
    nr_present: int
    reserved0: int

    _fields_ = (
        ("magic", _le32),
        ("version", _le32),
        ("region_size", _le64),
        ("max_peers", _le32),
        ("ring_size", _le32),
        ("dir_offset", _le32),
        ("slot_size", _le32),
        ("rings_offset", _le64),
        ("ring_stride", _le64),
        ("generation", _le64),
        ("nr_present", _le32),
        ("reserved0", _le32),
    )


class IvlSlot(ctypes.LittleEndianStructure):
    """struct ivl_slot: directory slot i.

    The first cache line is written by the server only, the second by the
    guest occupying the slot only.  Slot index and QEMU peer ID differ: QEMU
    cannot take a peer ID back (its ivshmem frees a departed peer's eventfd
    array and then reuses it), so the server never reuses an ID; a guest
    finds its slot as the present slot whose ``peer_id`` equals its
    IVPosition, and rings a peer at that slot's ``peer_id``.

    Both halves are read with a sequence protocol (ABI 2): the writer makes
    its half's seq (``srv_seq``, ``seq``) odd, writes the fields, then makes
    it even again; a reader retries, or keeps its previous view, while the
    seq is odd or changed across its copy.  ``heartbeat`` and ``leave_ack``
    are single aligned words outside the protocol.
    """

    # written by the server only
    present: int
    peer_id: int  # QEMU peer ID (IVPosition) of the occupant
    generation: int
    srv_seq: int  # odd while the server rewrites this half
    srv_flags: int  # IVL_SLOT_F_*
    nic_mac: ctypes.Array[ctypes.c_uint8]  # the occupant's data-NIC MAC, if MAC_KNOWN
    reserved0: int
    pad0: ctypes.Array[ctypes.c_uint8]
    # written by the guest at IVPosition i only
    mac: ctypes.Array[ctypes.c_uint8]
    reserved1: int
    state: int
    seq: int  # odd while the guest rewrites mac/state/joined_gen
    heartbeat: int
    joined_gen: int
    leave_ack: int  # bit j: slot j is LEAVING and I no longer send to it
    pad1: ctypes.Array[ctypes.c_uint8]

    _fields_ = (
        ("present", _le32),
        ("peer_id", _le32),
        ("generation", _le64),
        ("srv_seq", _le32),
        ("srv_flags", _le32),
        ("nic_mac", _u8 * 6),
        ("reserved0", _le16),
        ("pad0", _u8 * 32),
        ("mac", _u8 * 6),
        ("reserved1", _le16),
        ("state", _le32),
        ("seq", _le32),
        ("heartbeat", _le64),
        ("joined_gen", _le64),
        ("leave_ack", _le64),
        ("pad1", _u8 * 24),
    )


class IvlRingCtrl(ctypes.LittleEndianStructure):
    """struct ivl_ring_ctrl: control block at the start of ring i->j."""

    prod: int
    pad0: ctypes.Array[ctypes.c_uint8]
    cons: int
    need_kick: int
    pad1: ctypes.Array[ctypes.c_uint8]
    reserved: ctypes.Array[ctypes.c_uint8]

    _fields_ = (
        ("prod", _le32),
        ("pad0", _u8 * 60),
        ("cons", _le32),
        ("need_kick", _le32),
        ("pad1", _u8 * 56),
        ("reserved", _u8 * 128),
    )


class IvlRecHdr(ctypes.LittleEndianStructure):
    """struct ivl_rec_hdr: header of one record in a ring."""

    len: int
    flags: int
    gso_type: int
    gso_size: int
    csum_start: int
    csum_offset: int
    reserved: int

    _fields_ = (
        ("len", _le32),
        ("flags", _le16),
        ("gso_type", _le16),
        ("gso_size", _le16),
        ("csum_start", _le16),
        ("csum_offset", _le16),
        ("reserved", _le16),
    )


#: C struct name -> its mirror, for the ABI test and for tools.
STRUCTS: Final[dict[str, type[ctypes.LittleEndianStructure]]] = {
    "ivl_region_hdr": IvlRegionHdr,
    "ivl_slot": IvlSlot,
    "ivl_ring_ctrl": IvlRingCtrl,
    "ivl_rec_hdr": IvlRecHdr,
}

# Checked at import so a mistyped field never reaches a region.
assert ctypes.sizeof(IvlSlot) == IVL_SLOT_SIZE
# Server and guest never write the same cache line of a slot.
assert getattr(IvlSlot, "pad0").offset + getattr(IvlSlot, "pad0").size == IVL_CACHELINE  # noqa: B009
assert getattr(IvlSlot, "mac").offset == IVL_CACHELINE  # noqa: B009
assert ctypes.sizeof(IvlRingCtrl) == IVL_RING_CTRL_SIZE
assert ctypes.sizeof(IvlRecHdr) == IVL_REC_ALIGN
assert ctypes.sizeof(IvlRegionHdr) <= IVL_HDR_SIZE
