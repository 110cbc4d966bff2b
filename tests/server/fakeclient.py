"""A stand-in for QEMU's ivshmem-doorbell chardev client.

It decodes the server's messages independently of ivloop_server.protocol,
the way hw/misc/ivshmem.c does: read exactly 8 bytes per message with
recvmsg(), take at most one fd from SCM_RIGHTS, refuse truncated control
data.  Every fd it receives is closed by :meth:`FakeQemu.close`.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import select
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self, TypedDict

TIMEOUT = 5.0
_MAX_FDS = 4  # more than one fd per message is a server bug; leave room to see it


class ServerHalf(TypedDict):
    present: int
    peer_id: int
    generation: int
    srv_seq: int
    srv_flags: int
    nic_mac: bytes


class ProtocolViolation(AssertionError):
    """The server sent something QEMU would reject."""


@dataclass
class Message:
    raw: bytes
    value: int
    fd: int | None


@dataclass
class FakeQemu:
    sock: socket.socket
    vectors: int = 2
    own_id: int | None = None
    shm_fd: int | None = None
    own_vectors: list[int] = field(default_factory=list)
    peers: dict[int, list[int]] = field(default_factory=dict)
    gone: list[int] = field(default_factory=list)
    forgotten: set[int] = field(default_factory=set)
    _fds: set[int] = field(default_factory=set)
    _map: mmap.mmap | None = None

    @classmethod
    def connect(cls, path: Path, vectors: int = 2) -> Self:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        return cls(sock, vectors)

    @classmethod
    def join(cls, path: Path, vectors: int = 2) -> Self:
        """Connect and complete the setup the way QEMU does."""
        client = cls.connect(path, vectors)
        try:
            client.handshake()
        except BaseException:
            client.close()
            raise
        return client

    # -- receiving --------------------------------------------------------

    def recv(self, timeout: float = TIMEOUT) -> Message:
        """One message: exactly 8 bytes, at most one fd."""
        self.sock.settimeout(timeout)
        data = b""
        fds: list[int] = []
        while len(data) < 8:
            msg, anc, flags, _ = self.sock.recvmsg(8 - len(data), socket.CMSG_SPACE(_MAX_FDS * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(got)
            self._fds.update(fds)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolViolation("control data truncated")
            if not msg:
                raise EOFError(f"server closed the connection after {len(data)} bytes")
            data += msg
        if len(fds) > 1:
            raise ProtocolViolation(f"{len(fds)} fds attached to one message")
        return Message(data, struct.unpack("<q", data)[0], fds[0] if fds else None)

    def at_eof(self, timeout: float = TIMEOUT) -> bool:
        """True if the server closed the connection (without sending more)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def refused(self, timeout: float = TIMEOUT) -> bool:
        """True if the server turned us away so that QEMU fails cleanly.

        That is -1 where the version belongs (QEMU: "server sent version -1,
        expecting 0"), then EOF.  A bare EOF would leave a real QEMU spinning
        in its synchronous setup read, so it counts as a violation here.
        """
        self.sock.settimeout(timeout)
        first = self.sock.recv(8, socket.MSG_PEEK)
        if first == b"":
            raise ProtocolViolation("refused by a bare EOF: QEMU would hang in device realize")
        msg = self.recv(timeout)
        if msg.value != -1 or msg.fd is not None:
            raise ProtocolViolation(f"expected the refusal message -1, got {msg}")
        return self.at_eof(timeout)

    def pending(self) -> bool:
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def handshake(self) -> None:
        """Version, own ID, shared memory, then messages until all own vectors arrived."""
        version = self.recv()
        if version.value != 0 or version.fd is not None:
            raise ProtocolViolation(f"bad version message {version}")
        own = self.recv()
        if own.fd is not None or not 0 <= own.value <= 0xFFFF:
            raise ProtocolViolation(f"bad own-ID message {own}")
        self.own_id = own.value
        shm = self.recv()
        if shm.value != -1 or shm.fd is None:
            raise ProtocolViolation(f"expected -1 with the shared memory fd, got {shm}")
        self.shm_fd = shm.fd
        while len(self.own_vectors) < self.vectors:
            self.process(self.recv())

    def process(self, msg: Message) -> Message:
        """Apply a connect or disconnect notification, as QEMU's process_msg does."""
        if msg.value < 0 or msg.value > 0xFFFF:
            raise ProtocolViolation(f"invalid message {msg.value}")
        if msg.fd is None:
            if msg.value == self.own_id or msg.value not in self.peers:
                raise ProtocolViolation(f"disconnect for unknown peer {msg.value}")
            for fd in self.peers.pop(msg.value):
                self._close_fd(fd)
            self.gone.append(msg.value)
        elif msg.value == self.own_id:
            if len(self.own_vectors) >= self.vectors:
                raise ProtocolViolation("too many own vectors")
            self.own_vectors.append(msg.fd)
        else:
            if msg.value in self.forgotten:
                raise ProtocolViolation(f"connect for peer {msg.value}, which has left")
            vecs = self.peers.setdefault(msg.value, [])
            if len(vecs) >= self.vectors:
                raise ProtocolViolation(f"too many vectors for peer {msg.value}")
            vecs.append(msg.fd)
        return msg

    def forget(self, peer_id: int) -> None:
        """Close the eventfds kept for ``peer_id``, a peer the directory shows gone.

        QEMU keeps them when the server sends no leave message (its
        default); a test that sees hundreds of peers leave closes them to
        stay within its own fd limit.  A connect for that ID afterwards
        would be an ID given out twice: a ProtocolViolation.
        """
        for fd in self.peers.pop(peer_id):
            self._close_fd(fd)
        self.forgotten.add(peer_id)

    def next_event(self, timeout: float = TIMEOUT) -> Message:
        return self.process(self.recv(timeout))

    def expect_join(self, peer_id: int) -> None:
        for _ in range(self.vectors):
            msg = self.next_event()
            if msg.value != peer_id or msg.fd is None:
                raise AssertionError(f"expected a connect of {peer_id}, got {msg}")

    def expect_leave(self, peer_id: int) -> None:
        msg = self.next_event()
        if msg.value != peer_id or msg.fd is not None:
            raise AssertionError(f"expected a disconnect of {peer_id}, got {msg}")

    # -- doorbells --------------------------------------------------------

    def ring(self, peer_id: int, vector: int) -> None:
        os.eventfd_write(self.peers[peer_id][vector], 1)

    def take_interrupts(self, vector: int) -> int:
        """Read (and reset) the counter of own vector ``vector``; 0 if none pending."""
        fd = self.own_vectors[vector]
        # poll, then read: not O_NONBLOCK, a flag of the open file, which the
        # server and every QEMU share -- and QEMU sets it back to blocking
        # each time it receives the eventfd (char-socket.c).  Only the owner
        # reads its own vector, so readable stays readable.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(0):
            return 0
        return os.eventfd_read(fd)

    # -- the guest's side of the region ------------------------------------
    #
    # What a guest (driver or hostile) does through BAR2.  Offsets are the
    # header's (guest-driver/ivl_abi.h), written out here rather than taken
    # from ivloop_server.abi, so a mirror gone wrong cannot hide itself.

    SLOT_BASE = 4096
    SLOT_SIZE = 128
    MAC_OFF, STATE_OFF, SEQ_OFF, JOINED_GEN_OFF = 64, 72, 76, 88
    STATE_DOWN, STATE_UP, STATE_LEAVING = 0, 1, 2

    @property
    def region(self) -> mmap.mmap:
        """The shared region, mapped read-write as QEMU maps BAR2."""
        if self._map is None:
            if self.shm_fd is None:
                raise AssertionError("no shared memory received yet")
            self._map = mmap.mmap(self.shm_fd, os.fstat(self.shm_fd).st_size)
        return self._map

    def slot_base(self, slot: int) -> int:
        return self.SLOT_BASE + slot * self.SLOT_SIZE

    def server_half(self, slot: int) -> ServerHalf:
        """Slot ``slot``'s server half as the header lays it out (a raw copy)."""
        present, peer_id, gen, srv_seq, flags, nic_mac = struct.unpack_from(
            "<IIQII6s", self.region, self.slot_base(slot)
        )
        return {"present": present, "peer_id": peer_id, "generation": gen,
                "srv_seq": srv_seq, "srv_flags": flags, "nic_mac": nic_mac}  # fmt: skip

    def my_slot(self, max_peers: int = 64) -> int:
        """The present slot whose peer_id is my IVPosition, as a guest finds it."""
        for slot in range(max_peers):
            if (self.SLOT_BASE + (slot + 1) * self.SLOT_SIZE) > len(self.region):
                break
            half = self.server_half(slot)
            if half["present"] == 1 and half["peer_id"] == self.own_id:
                return slot
        raise AssertionError(f"no present slot holds peer {self.own_id}")

    def begin_update(self, slot: int) -> int:
        """Make the guest seq of ``slot`` odd (mid-update); return the new value."""
        base = self.slot_base(slot)
        seq = struct.unpack_from("<I", self.region, base + self.SEQ_OFF)[0]
        seq = (seq | 1) if seq & 1 == 0 else seq
        struct.pack_into("<I", self.region, base + self.SEQ_OFF, seq)
        return int(seq)

    def publish(self, mac: bytes, state: int = 1, joined_gen: int | None = None,
                slot: int | None = None, finish: bool = True) -> None:
        """Write my guest half under its seq: odd, mac/state/joined_gen, even.

        ``joined_gen`` defaults to the slot's generation (a guest going UP);
        ``finish=False`` leaves seq odd, as a guest stopped mid-update would.
        """
        slot = self.my_slot() if slot is None else slot
        base = self.slot_base(slot)
        if joined_gen is None:
            joined_gen = self.server_half(slot)["generation"]
        seq = self.begin_update(slot)
        self.region[base + self.MAC_OFF : base + self.MAC_OFF + 6] = mac
        struct.pack_into("<I", self.region, base + self.STATE_OFF, state)
        struct.pack_into("<Q", self.region, base + self.JOINED_GEN_OFF, joined_gen)
        if finish:
            struct.pack_into("<I", self.region, base + self.SEQ_OFF, (seq + 1) & 0xFFFFFFFF)

    # -- cleanup ----------------------------------------------------------

    def _close_fd(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            os.close(fd)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        with contextlib.suppress(OSError):
            self.sock.close()
        for fd in sorted(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.own_vectors.clear()
        self.peers.clear()
        self.shm_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
