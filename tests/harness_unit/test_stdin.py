"""``harness ssh`` and ``harness exec`` forward local stdin that is not a terminal.

The guest's side is a real SSH server: paramiko's server mode in this
process, over a socket pair, running each command with ``sh -c`` here.  So
the channel semantics (EOF, window, exit status, close) are paramiko's own,
not a fake's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, BinaryIO

import paramiko
import pytest
from invoke.exceptions import UnexpectedExit
from invoke.runners import Result

from harness import cli
from harness.errors import GuestError
from harness.lab import vms
from harness.lab.guest import Guest, ensure_key
from harness.lab.state import State, StateDir


def _copy(read: Callable[[int], bytes], write: Callable[[bytes], Any]) -> None:
    with contextlib.suppress(OSError, EOFError):
        while data := read(65536):
            write(data)


def _run_here(chan: paramiko.Channel, command: str) -> None:
    """What sshd does for an exec request: the command's stdin is the
    channel's data until EOF; its exit status goes back before the close."""
    with subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdin and proc.stdout and proc.stderr

        def feed() -> None:
            assert proc.stdin
            _copy(chan.recv, proc.stdin.write)
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the client's EOF

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        outs = [threading.Thread(target=_copy, args=(partial(os.read, src.fileno()), send))
                for src, send in ((proc.stdout, chan.sendall),
                                  (proc.stderr, chan.sendall_stderr))]
        for t in outs:
            t.start()
        for t in outs:
            t.join()
        code = proc.wait()
        with contextlib.suppress(OSError, EOFError):
            chan.send_exit_status(code)
            chan.close()  # also ends the feeder's recv
        feeder.join(5)


class _Server(paramiko.ServerInterface):  # type: ignore[misc]  # paramiko is untyped
    def __init__(self, commands: list[str]) -> None:
        self.commands = commands

    def get_allowed_auths(self, username: str) -> str:
        return "none"

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_SUCCESSFUL  # type: ignore[no-any-return]

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED  # type: ignore[no-any-return]

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.commands.append(command.decode())
        threading.Thread(target=_run_here, args=(channel, command.decode()),
                         daemon=True).start()
        return True


@dataclass
class Conn:
    """The part of fabric's Connection that :meth:`Guest.pipe` uses, on a real
    paramiko transport; ``run`` and ``shell`` record that fabric was used."""

    transport: paramiko.Transport
    fabric_calls: list[str] = field(default_factory=list)
    shell_exit: int = 0

    def create_session(self) -> paramiko.Channel:
        return self.transport.open_session()

    def run(self, command: str, **kw: Any) -> Any:
        self.fabric_calls.append(command)
        return type("Result", (), {"exited": 0, "stdout": "", "stderr": ""})()

    def shell(self) -> Result:
        self.fabric_calls.append("<shell>")
        result = Result(exited=self.shell_exit, pty=True)
        if self.shell_exit:
            raise UnexpectedExit(result)  # what fabric 3.2 does, warn=True or not
        return result

    def close(self) -> None:
        pass


@dataclass
class Guestside:
    server: paramiko.Transport
    conn: Conn
    commands: list[str]

    def guest(self) -> Guest:
        g = Guest("vm1", "ns", 22, Path("/nonexistent"))
        g._conn = self.conn  # a stand-in, see Conn
        return g


@pytest.fixture(scope="module")
def host_key(tmp_path_factory: pytest.TempPathFactory) -> paramiko.PKey:
    path = tmp_path_factory.mktemp("key") / "host"
    ensure_key(path)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


@pytest.fixture
def guestside(host_key: paramiko.PKey) -> Iterator[Guestside]:
    ours, theirs = socket.socketpair()
    commands: list[str] = []
    server = paramiko.Transport(theirs)
    server.add_server_key(host_key)
    server.start_server(event=threading.Event(), server=_Server(commands))  # returns at once
    client = paramiko.Transport(ours)
    client.start_client(timeout=10)
    client.auth_none("root")
    try:
        yield Guestside(server, Conn(client), commands)
    finally:
        client.close()
        server.close()
        ours.close()
        theirs.close()


def pipe(side: Guestside, command: str, data: bytes | BinaryIO,
         timeout: float | None = 20) -> tuple[int, bytes, bytes]:
    out, err = io.BytesIO(), io.BytesIO()
    stdin = io.BytesIO(data) if isinstance(data, bytes) else data
    code = side.guest().pipe(command, stdin, out, err, timeout=timeout)
    return code, out.getvalue(), err.getvalue()


def test_binary_stdin_reaches_the_command_whole_and_its_end_closes_it(
    guestside: Guestside
) -> None:
    data = os.urandom(1_000_000)
    code, out, _ = pipe(guestside, "sha256sum", data)
    # sha256sum prints only after EOF: the end of our stdin closed the command's
    assert (code, out.split()[0].decode()) == (0, hashlib.sha256(data).hexdigest())


def test_output_comes_back_byte_for_byte_and_stderr_apart(guestside: Guestside) -> None:
    data = bytes(range(256)) * 4096  # every byte value: no text decoding on the way
    code, out, err = pipe(guestside, "cat; echo done >&2; exit 3", data)
    assert code == 3
    assert out == data
    assert err == b"done\n"


def test_stdin_from_a_real_descriptor(guestside: Guestside, tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(os.urandom(300_000))
    with path.open("rb") as f:
        code, out, _ = pipe(guestside, "wc -c", f)
    assert (code, out.strip()) == (0, b"300000")


def test_an_endless_stdin_does_not_keep_a_finished_command_waiting(
    guestside: Guestside
) -> None:
    with open("/dev/zero", "rb") as zero:
        code, out, _ = pipe(guestside, "head -c 100000 | wc -c", zero)
    assert (code, out.strip()) == (0, b"100000")


def test_a_stdin_that_never_ends_nor_speaks_does_not_block_the_return(
    guestside: Guestside
) -> None:
    r, w = os.pipe()
    try:
        with os.fdopen(r, "rb", buffering=0) as quiet:
            t = time.monotonic()
            code, out, _ = pipe(guestside, "echo hi", quiet)
            assert (code, out) == (0, b"hi\n")
            assert time.monotonic() - t < 10
    finally:
        os.close(w)  # the feeder thread's read ends


def test_timeout_is_a_guest_error(guestside: Guestside) -> None:
    with pytest.raises(GuestError, match="timed out") as exc:
        pipe(guestside, "sleep 30", b"", timeout=0.5)
    assert exc.value.exitcode is None


def test_a_connection_lost_mid_command_is_one_clear_error(guestside: Guestside) -> None:
    threading.Timer(0.5, guestside.server.close).start()
    with pytest.raises(GuestError, match="connection lost before the command exited") as exc:
        pipe(guestside, "sleep 30", b"")
    assert exc.value.exitcode is None


class _Closed(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_went_away_stops_the_command(guestside: Guestside) -> None:
    g = guestside.guest()
    with pytest.raises(BrokenPipeError), open("/dev/zero", "rb") as zero:
        g.pipe("cat", zero, _Closed(), io.BytesIO(), timeout=20)  # type: ignore[arg-type]


# --- through the CLI --------------------------------------------------------


@dataclass
class CliGuest:
    side: Guestside
    monkeypatch: pytest.MonkeyPatch
    sd: StateDir

    def main(self, stdin: IO[str], *argv: str) -> int:
        """``harness ARGV...`` with *stdin* as its standard input."""
        self.monkeypatch.setattr("sys.stdin", stdin)
        return cli.main(["--state-dir", str(self.sd.path), *argv])


@pytest.fixture
def cli_guest(monkeypatch: pytest.MonkeyPatch, guestside: Guestside,
              state_dir: StateDir) -> CliGuest:
    def guest(sd: StateDir, state: State, name: str, timeout: float = 30) -> Guest:
        vms.topology_of(state).vm(name)
        return guestside.guest()

    monkeypatch.setattr(vms, "guest", guest)
    return CliGuest(guestside, monkeypatch, state_dir)


@pytest.mark.parametrize("command", ["exec", "ssh"])
def test_cat_file_into_exec_sha256sum(
    capfdbinary: pytest.CaptureFixture[bytes], cli_guest: CliGuest, tmp_path: Path,
    command: str,
) -> None:
    data = os.urandom(1_000_000)
    (tmp_path / "x").write_bytes(data)
    with (tmp_path / "x").open() as f:  # text, like sys.stdin: its .buffer is read
        code = cli_guest.main(f, command, "vm1", "--", "sha256sum")
    assert code == 0
    assert capfdbinary.readouterr().out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert cli_guest.side.conn.fabric_calls == []


def test_piped_stdin_without_a_command_is_a_script_for_the_shell(
    capfdbinary: pytest.CaptureFixture[bytes], cli_guest: CliGuest, tmp_path: Path,
) -> None:
    (tmp_path / "script").write_text("echo $((6 * 7))\nexit 4\n")
    with (tmp_path / "script").open() as f:
        assert cli_guest.main(f, "ssh", "vm1") == 4
    assert capfdbinary.readouterr().out == b"42\n"


@pytest.mark.parametrize(("argv", "used"), [(["--", "true"], "true"), ([], "<shell>")])
def test_a_terminal_is_not_forwarded(cli_guest: CliGuest, argv: list[str], used: str) -> None:
    primary, secondary = os.openpty()
    try:
        with os.fdopen(secondary, "r") as tty:
            assert cli_guest.main(tty, "ssh", "vm1", *argv) == 0
    finally:
        os.close(primary)
    assert cli_guest.side.conn.fabric_calls == [used]  # fabric's run/shell, as before
    assert cli_guest.side.commands == []


def test_the_interactive_shells_exit_status_is_returned_not_raised(
    capsys: pytest.CaptureFixture[str], cli_guest: CliGuest,
) -> None:
    cli_guest.side.conn.shell_exit = 4
    primary, secondary = os.openpty()
    try:
        with os.fdopen(secondary, "r") as tty:
            assert cli_guest.main(tty, "ssh", "vm1") == 4
    finally:
        os.close(primary)
    assert capsys.readouterr().err == ""


def test_closing_our_stdout_ends_quietly_with_sigpipes_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cli_guest: CliGuest,
) -> None:
    r, w = os.pipe()
    os.close(r)  # `harness exec ... | head` after head exited
    with open(w, "w") as broken, open("/dev/zero") as zero:
        monkeypatch.setattr("sys.stdout", broken)
        code = cli_guest.main(zero, "exec", "vm1", "--", "cat")
    assert code == 141
    assert "Traceback" not in capsys.readouterr().err
