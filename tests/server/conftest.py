"""Fixtures for the ivloop-server tests: in-process and subprocess servers.

Sockets live under tmp_path, so tests are safe under pytest-xdist.  Every
fixture closes what it opened, on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ivloop_server.nic import NicResolver
from ivloop_server.server import IvshmemServer, ServerConfig

from .fakeclient import FakeQemu

T = TypeVar("T")
STARTUP_TIMEOUT = 15.0
HERE = Path(__file__).resolve().parent


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.005)


class ServerThread:
    """An IvshmemServer running on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig, resolver: NicResolver | None = None) -> None:
        self.config = config
        self.resolver = resolver
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(self._create())
        self.run(self.server.start())

    async def _create(self) -> IvshmemServer:
        return IvshmemServer(self.config, resolver=self.resolver)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (so it sees a consistent state)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def settle(self) -> None:
        """Return once every callback the loop was running or had queued has run.

        Joins and leaves each run in one callback, so after a client saw any
        message of one, settle() makes the whole of it visible.
        """
        self.call(lambda: None)

    def rounds(self, n: int = 3, timeout: float = 5.0) -> None:
        """Return after ``n`` more complete checks of the peers (police rounds)."""
        start = self.call(lambda: self.server.police_rounds)
        wait_until(lambda: self.server.police_rounds >= start + n, timeout, f"{n} police rounds")
        self.settle()

    @property
    def path(self) -> Path:
        return self.config.socket_path

    def close(self) -> None:
        try:
            if not self.loop.is_closed():
                self.run(self.server.stop("test teardown"))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def factory(**kwargs: Any) -> ServerThread:
        kwargs.setdefault("socket_path", tmp_path / f"ivl{len(servers)}.sock")
        kwargs.setdefault("size", 8 << 20)
        kwargs.setdefault("max_peers", 4)
        # Most tests check the documented protocol, leave notices included;
        # test_leave_without_notices.py checks the (QEMU-safe) default.
        kwargs.setdefault("leave_notices", True)
        resolver = kwargs.pop("resolver", None)
        st = ServerThread(ServerConfig(**kwargs), resolver)
        servers.append(st)
        return st

    yield factory
    for st in servers:
        st.close()


@pytest.fixture
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server()


@pytest.fixture
def clients() -> Iterator[list[FakeQemu]]:
    """Register FakeQemu instances here to have them closed after the test."""
    made: list[FakeQemu] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def join(clients: list[FakeQemu], server: ServerThread) -> Callable[[], FakeQemu]:
    def factory() -> FakeQemu:
        client = FakeQemu.join(server.path)
        clients.append(client)
        server.settle()
        return client

    return factory


# -- subprocess servers ----------------------------------------------------


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    stderr_path: Path
    extra: list[Any] = field(default_factory=list)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait()


def server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ivloop_server", *args]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``python -m ivloop_server``; by default wait until it is READY."""
    procs: list[ServerProcess] = []

    def factory(*args: str, socket_path: Path | None = None, ready: bool = True,
                notices: bool = True) -> ServerProcess:
        path = socket_path or tmp_path / "ivl.sock"
        if notices:  # the documented protocol; the default is tested on its own
            args = ("--leave-notices", *args)
        err = tmp_path / f"server{len(procs)}.stderr"
        rfd, wfd = os.pipe()
        try:
            with err.open("wb") as errf:
                proc = subprocess.Popen(
                    server_command("--socket", str(path), "--ready-fd", str(wfd), *args),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=errf,
                    pass_fds=(wfd,),
                )
            sp = ServerProcess(proc, path, err)
            procs.append(sp)
            os.close(wfd)
            wfd = -1
            if ready:
                readable, _, _ = select.select([rfd], [], [], STARTUP_TIMEOUT)
                data = os.read(rfd, 64) if readable else b""
                assert data == b"READY\n", f"server not ready: {sp.stderr()}"
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
        return sp

    yield factory
    for sp in procs:
        if sp.proc.poll() is None:
            sp.proc.kill()
        sp.proc.wait(10)
        if sp.proc.stdout is not None:
            sp.proc.stdout.close()


# -- clients that are real processes -------------------------------------------


@contextlib.contextmanager
def qemu_process(path: Path, *qemu_args: str) -> Iterator[tuple[FakeQemu, int]]:
    """A client whose connecting process has ``qemu_args`` as its argv."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "procclient.py"), str(path), str(theirs.fileno()),
         *qemu_args],
        pass_fds=(theirs.fileno(),),
    )  # fmt: skip
    theirs.close()
    client: FakeQemu | None = None
    try:
        ours.settimeout(10)
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        assert len(fds) == 1, "the helper did not pass its connection"
        sock = socket.socket(fileno=fds[0])
        client = FakeQemu(sock)
        client.handshake()
        yield client, proc.pid
    finally:
        if client is not None:
            client.close()
        ours.close()
        proc.wait(10)
