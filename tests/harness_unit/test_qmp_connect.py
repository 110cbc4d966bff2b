"""Monitor's connect: a QEMU that bound its QMP socket but does not listen yet."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import QMPError
from harness.lab.qemu import Monitor

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}


def serve_once(sock: socket.socket, listen_after: float) -> None:
    """Listen after *listen_after* seconds, then answer one QMP handshake (the
    client's commands are JSON objects with no line ends)."""
    time.sleep(listen_after)
    sock.listen(1)
    conn, _ = sock.accept()
    with conn:
        conn.sendall(json.dumps(GREETING).encode() + b"\n")
        buf = ""
        decoder = json.JSONDecoder()
        while chunk := conn.recv(4096):
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                conn.sendall(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\n")


@pytest.fixture
def bound(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A UNIX socket bound at a path, not listening: QEMU between bind() and listen()."""
    path = tmp_path / "qmp.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    try:
        yield path, sock
    finally:
        sock.close()


async def handshake(path: Path, timeout: float) -> None:
    mon = Monitor(path)
    mon.connect_timeout = timeout
    async with mon:
        pass


def test_connect_waits_for_a_qemu_that_bound_but_does_not_listen_yet(
        bound: tuple[Path, socket.socket]) -> None:
    path, sock = bound
    t = threading.Thread(target=serve_once, args=(sock, 0.4), daemon=True)
    t.start()
    asyncio.run(handshake(path, timeout=5))
    t.join(timeout=5)


def test_connect_gives_up_on_a_socket_nobody_listens_on(
        bound: tuple[Path, socket.socket]) -> None:
    path, _ = bound
    t0 = time.monotonic()
    with pytest.raises(QMPError, match=r"cannot connect to QMP at .*refused"):
        asyncio.run(handshake(path, timeout=0.5))
    assert time.monotonic() - t0 < 5


def test_connect_fails_at_once_when_the_socket_is_missing(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(QMPError, match="No such file"):
        asyncio.run(handshake(tmp_path / "absent.sock", timeout=5))
    assert time.monotonic() - t0 < 2
