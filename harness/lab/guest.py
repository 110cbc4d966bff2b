"""Commands in guests, over SSH on each VM's management NIC, through fabric.

The management NIC is QEMU user-mode networking with the guest's port 22
forwarded to 127.0.0.1 *inside the host's namespace*; connections are made
from that namespace (see :func:`hostnet.connect`).  Measured traffic never
uses this path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fabric import Connection
from invoke.exceptions import CommandTimedOut, UnexpectedExit
from invoke.runners import Result

from harness.errors import GuestError
from harness.lab import hostnet

log = logging.getLogger(__name__)


def ensure_key(path: Path) -> str:
    """Create an ed25519 key pair at *path* if needed; return the public key line."""
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        path.touch(mode=0o600)
        path.write_bytes(pem)
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        path.with_suffix(".pub").write_bytes(pub + b" ivloop-harness\n")
    return path.with_suffix(".pub").read_text().split(" ivloop-harness")[0].strip()


#: Bytes per read when relaying a command's input and output.
CHUNK = 64 * 1024
_LOST = (OSError, paramiko.SSHException, EOFError)


def _reader(stdin: BinaryIO) -> Callable[[int], bytes]:
    """What *stdin* has, up to n bytes, as soon as it has any.

    A real descriptor is read with ``os.read``: a daemon thread blocked in a
    buffered ``read`` holds the buffer's lock, and closing that buffer at
    interpreter exit then aborts Python.
    """
    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):  # BytesIO and the like
        read: Callable[[int], bytes] = getattr(stdin, "read1", stdin.read)
        return read
    return functools.partial(os.read, fd)


def _feed(chan: paramiko.Channel, stdin: BinaryIO) -> None:
    """Copy *stdin* into the command's standard input; close that at EOF."""
    read = _reader(stdin)
    try:
        while data := read(CHUNK):
            chan.sendall(data)
    except _LOST:
        return  # the command exited, or the connection is gone: nobody reads
    with contextlib.suppress(*_LOST):
        chan.shutdown_write()  # EOF for the command, as ssh sends it


def _drain(recv: Callable[[int], bytes], sink: BinaryIO, failed: list[Exception],
           chan: paramiko.Channel) -> None:
    """Copy one of the command's output streams to *sink* until its end."""
    try:
        while data := recv(CHUNK):
            sink.write(data)
            sink.flush()
    except Exception as exc:  # e.g. BrokenPipeError: handed to the caller
        failed.append(exc)
        chan.close()  # the remote command loses its reader, as through ssh


def relay(chan: paramiko.Channel, stdin: BinaryIO, out: BinaryIO, err: BinaryIO,
          timeout: float | None = None) -> int | None:
    """Relay a started command's standard streams over *chan*, byte for byte.

    Returns the exit status (paramiko's -1 if the channel closed without
    one), or None if *timeout* passed first.  The input is fed from a daemon
    thread that is not waited for: like ssh, the call returns when the
    command has exited, even if *stdin* never ends.  An error writing *out*
    or *err* closes the channel and is raised here.
    """
    failed: list[Exception] = []
    threading.Thread(target=_feed, args=(chan, stdin), name="ssh-stdin", daemon=True).start()
    drains = [threading.Thread(target=_drain, args=(recv, sink, failed, chan),
                               name=f"ssh-{name}", daemon=True)
              for name, recv, sink in (("stdout", chan.recv, out),
                                       ("stderr", chan.recv_stderr, err))]
    for t in drains:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    try:
        for t in drains:
            t.join(left())
            if t.is_alive():
                return None
        if failed:
            raise failed[0]
        if not chan.status_event.wait(left()):
            return None
        return int(chan.exit_status)
    finally:
        if any(t.is_alive() for t in drains):  # timed out or interrupted
            chan.close()  # ends their reads; let them finish their last write
            for t in drains:
                t.join(1.0)


def _no_exit_status(exited: int | None) -> bool:
    """True when the channel closed without an exit status: paramiko's
    ``recv_exit_status`` then says -1 (which a shell would show as 255)."""
    return exited is None or exited < 0


class Guest:
    """An SSH session to one VM; a context manager that owns the connection."""

    def __init__(self, vm: str, netns: str, port: int, key: Path) -> None:
        self.vm = vm
        self.netns = netns
        self.port = port
        self.key = key
        self.log = log.getChild(vm)
        self._conn: Connection | None = None
        self._sock: socket.socket | None = None

    def open(self, timeout: float = 120.0) -> Guest:
        """Connect, retrying until *timeout* while the guest boots."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._connect()
                return self
            except (OSError, paramiko.SSHException, EOFError) as exc:
                last = exc
                self.close()
                time.sleep(0.5)
        raise GuestError(self.vm, "ssh", None, f"unreachable after {timeout:.0f} s: {last}")

    def _banner(self) -> None:
        """Wait-free check that sshd answers: until it does, QEMU's user-mode
        network accepts the forwarded connection and closes it at once."""
        with hostnet.connect(self.netns, self.port) as probe:
            probe.settimeout(5)
            if not probe.recv(4).startswith(b"SSH-"):
                raise ConnectionRefusedError(f"{self.vm}: no SSH banner yet")

    def _connect(self) -> None:
        self._banner()
        self._sock = hostnet.connect(self.netns, self.port)
        pkey = paramiko.Ed25519Key.from_private_key_file(str(self.key))
        conn = Connection(
            "127.0.0.1", user="root", port=self.port, connect_timeout=10,
            connect_kwargs={
                "sock": self._sock, "pkey": pkey, "look_for_keys": False,
                "allow_agent": False, "banner_timeout": 20, "auth_timeout": 20,
            },
        )  # fmt: skip
        conn.open()
        self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Guest:
        if self._conn is None:
            self.open()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def run(self, command: str, timeout: float | None = 60, check: bool = True) -> str:
        """Run *command*; return its stdout, raise :class:`GuestError` on failure."""
        if self._conn is None:
            self.open()
        assert self._conn is not None
        self.log.debug("run: %s", command)
        try:
            result = self._conn.run(command, hide=True, warn=not check, timeout=timeout,
                                    pty=False, in_stream=False)
        except UnexpectedExit as exc:
            r = exc.result
            raise GuestError(self.vm, command, r.exited, r.stdout + r.stderr) from None
        except CommandTimedOut as exc:
            raise GuestError(self.vm, command, None, f"timed out after {exc.timeout} s") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise GuestError(self.vm, command, None, f"connection lost: {exc}") from exc
        if check and result.exited != 0:
            raise GuestError(self.vm, command, result.exited, result.stdout + result.stderr)
        return str(result.stdout)

    def _run_to_exit(self, command: str, timeout: float | None, **kwargs: Any) -> Result:
        """Run *command* with ``warn=True``; return fabric's result once it has an
        exit status.  A lost connection or a timeout raises :class:`GuestError`."""
        if self._conn is None:
            self.open()
        assert self._conn is not None
        try:
            # fabric's Connection.run is untyped; it returns invoke's Result
            result: Result = self._conn.run(command, warn=True, timeout=timeout, pty=False,
                                            in_stream=False, **kwargs)
        except CommandTimedOut as exc:
            raise GuestError(self.vm, command, None, f"timed out after {exc.timeout} s") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise GuestError(self.vm, command, None, f"connection lost: {exc}") from exc
        if _no_exit_status(result.exited):
            raise GuestError(self.vm, command, None,
                             "connection lost before the command exited")
        return result

    def status(self, command: str, timeout: float | None = 60) -> tuple[int, str]:
        """Run *command*; return (exit status, stdout+stderr) without raising on failure."""
        result = self._run_to_exit(command, timeout, hide=True)
        return int(result.exited), str(result.stdout) + str(result.stderr)

    def stream(self, command: str, out: IO[str], err: IO[str],
               timeout: float | None = None) -> int:
        """Run *command*, copying its stdout to *out* and its stderr to *err* as
        they arrive; return its exit status.  A lost connection or a timeout
        raises :class:`GuestError` (``exitcode`` None)."""
        self.log.debug("stream: %s", command)
        result = self._run_to_exit(command, timeout, hide=False, out_stream=out,
                                   err_stream=err)
        return int(result.exited)

    def pipe(self, command: str, stdin: BinaryIO, out: BinaryIO, err: BinaryIO,
             timeout: float | None = None) -> int:
        """Run *command* with *stdin* as its standard input, closed at EOF as
        ssh closes it; copy its stdout and stderr to *out* and *err*, byte for
        byte, as they arrive; return its exit status.

        Not through fabric: invoke forwards a non-terminal stream one byte per
        10 ms and decodes it as text, which corrupts binary data.  A lost
        connection or a timeout raises :class:`GuestError` (``exitcode`` None);
        an error writing *out* or *err* (``BrokenPipeError``...) is raised as is.
        """
        if self._conn is None:
            self.open()
        assert self._conn is not None
        self.log.debug("pipe: %s", command)
        try:
            chan = self._conn.create_session()
        except _LOST as exc:
            raise GuestError(self.vm, command, None, f"connection lost: {exc}") from exc
        try:
            try:
                chan.exec_command(command)
            except _LOST as exc:
                raise GuestError(self.vm, command, None, f"connection lost: {exc}") from exc
            # Raises only what writing *out* or *err* raised: a local error.
            status = relay(chan, stdin, out, err, timeout)
        finally:
            chan.close()
        if status is None:
            raise GuestError(self.vm, command, None, f"timed out after {timeout} s")
        if _no_exit_status(status):
            raise GuestError(self.vm, command, None, "connection lost before the command exited")
        return status

    def shell(self) -> int:
        """An interactive shell on the caller's terminal."""
        if self._conn is None:
            self.open()
        assert self._conn is not None
        try:
            result = self._conn.shell()
        except UnexpectedExit as exc:
            # fabric documents shell() as warn=True but raises on a non-zero exit
            result = exc.result
        except _LOST as exc:
            raise GuestError(self.vm, "shell", None, f"connection lost: {exc}") from exc
        if _no_exit_status(result.exited):
            raise GuestError(self.vm, "shell", None, "connection lost before the shell exited")
        return int(result.exited)
