"""QEMU's ivshmem server protocol (docs/specs/ivshmem-spec.rst), server side.

The connection is one-way.  Every message is one little-endian signed
64-bit integer, sometimes with one file descriptor attached by SCM_RIGHTS.
On connect the server sends, in order:

1. the protocol version, :data:`PROTOCOL_VERSION` (no fd);
2. the client's own ID (no fd);
3. :data:`SHM_MESSAGE` (-1) with the shared-memory fd;
4. for each other client: its ID once per vector, each with one of its
   eventfds, in vector order;
5. the client's own ID once per vector, each with one of its own eventfds.

Afterwards a peer ID with an fd announces (one vector of) a new peer, and
a peer ID without an fd announces that the peer left.

A connection the server refuses gets :data:`REFUSED` in place of the
version, and EOF once it has read that.  EOF alone is not enough: QEMU reads its setup messages
synchronously, and ``ivshmem_recv_msg`` retries a read that returns 0
forever, so a QEMU refused by a bare close spins in device realize with the
big lock held (seen with QEMU 7.2; the loop is unchanged upstream).  A
wrong version fails realize at once ("server sent version -1, expecting
0"): the QEMU exits at start-up, or its device_add returns that error.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Final

PROTOCOL_VERSION: Final = 0
SHM_MESSAGE: Final = -1
MAX_PEER_ID: Final = 0xFFFF  # the doorbell register holds 16 bits of ID
REFUSED: Final = -1  # sent as the "version" of a refused connection

_MSG: Final = struct.Struct("<q")
MESSAGE_SIZE: Final = _MSG.size


class ShortSendError(OSError):
    """The kernel accepted only part of a message."""


def encode(value: int) -> bytes:
    """The 8 bytes of one message."""
    return _MSG.pack(value)


def decode(data: bytes) -> int:
    """The value of one 8-byte message."""
    value: int = _MSG.unpack(data)[0]
    return value


def send_message(sock: socket.socket, value: int, fd: int | None = None) -> None:
    """Send one message, with ``fd`` attached by SCM_RIGHTS if given.

    The socket is expected to be non-blocking: a peer that does not drain
    its socket raises BlockingIOError rather than stalling the server.
    Raises OSError (including :class:`ShortSendError`) on failure.
    """
    data = encode(value)
    if fd is None:
        sent = sock.send(data, socket.MSG_NOSIGNAL)
    else:
        sent = socket.send_fds(sock, [data], [fd], socket.MSG_NOSIGNAL)
    if sent != len(data):
        raise ShortSendError(f"sent {sent} of {len(data)} bytes")


def setup_messages(
    own_id: int,
    shm_fd: int,
    own_vectors: Sequence[int],
    others: Sequence[tuple[int, Sequence[int]]],
) -> list[tuple[int, int | None]]:
    """The (value, fd) sequence a newly connected client receives, steps 1-5."""
    msgs: list[tuple[int, int | None]] = [
        (PROTOCOL_VERSION, None),
        (own_id, None),
        (SHM_MESSAGE, shm_fd),
    ]
    for peer_id, vectors in others:
        msgs.extend((peer_id, fd) for fd in vectors)
    msgs.extend((own_id, fd) for fd in own_vectors)
    return msgs


def join_messages(peer_id: int, vectors: Sequence[int]) -> list[tuple[int, int | None]]:
    """What every other client receives when ``peer_id`` joins."""
    return [(peer_id, fd) for fd in vectors]


def leave_message(peer_id: int) -> tuple[int, None]:
    """What every other client receives when ``peer_id`` leaves."""
    return (peer_id, None)
