"""A stand-in for QEMU's ivshmem-doorbell chardev client.

It decodes the server's messages independently of ivloop_server.protocol,
the way hw/misc/ivshmem.c does: read exactly 8 bytes per message with
recvmsg(), take at most one fd from SCM_RIGHTS, refuse truncated control
data.  Every fd it receives is closed by :meth:`FakeQemu.close`.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

TIMEOUT = 5.0
_MAX_FDS = 4  # more than one fd per message is a server bug; leave room to see it


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
    _fds: set[int] = field(default_factory=set)

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
            vecs = self.peers.setdefault(msg.value, [])
            if len(vecs) >= self.vectors:
                raise ProtocolViolation(f"too many vectors for peer {msg.value}")
            vecs.append(msg.fd)
        return msg

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
        os.set_blocking(fd, False)
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    # -- cleanup ----------------------------------------------------------

    def _close_fd(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            os.close(fd)

    def close(self) -> None:
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
