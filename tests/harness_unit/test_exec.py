"""``harness ssh`` and ``harness exec``: command lines, streaming, exit status,
lost connections, and working while another harness holds the lock."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import IO, Any

import paramiko
import pytest

from harness import cli
from harness.errors import GuestError
from harness.lab import vms
from harness.lab.guest import Guest
from harness.lab.state import State, StateDir

DD = ["sh", "-c", "dd if=/dev/zero of=/tmp/f count=1"]


class FakeResult:
    def __init__(self, exited: int | None, stdout: str = "", stderr: str = "") -> None:
        self.exited = exited
        self.stdout = stdout
        self.stderr = stderr


class FakeConnection:
    """Stands in for fabric's Connection: records commands, writes the given
    output to the streams it is handed (as fabric does while a command runs)."""

    def __init__(self, exited: int | None = 0, stdout: str = "", stderr: str = "",
                 fail: BaseException | None = None) -> None:
        self.exited, self.stdout, self.stderr, self.fail = exited, stdout, stderr, fail
        self.commands: list[str] = []
        self.kwargs: list[dict[str, Any]] = []

    def run(self, command: str, **kw: Any) -> FakeResult:
        self.commands.append(command)
        self.kwargs.append(kw)
        if not kw.get("hide"):
            out: IO[str] = kw["out_stream"]
            err: IO[str] = kw["err_stream"]
            out.write(self.stdout)
            err.write(self.stderr)
        if self.fail is not None:
            raise self.fail
        return FakeResult(self.exited, self.stdout, self.stderr)

    def close(self) -> None:
        pass


def fake_guest(monkeypatch: pytest.MonkeyPatch, conn: FakeConnection) -> None:
    def guest(sd: StateDir, state: State, name: str, timeout: float = 30) -> Guest:
        vms.topology_of(state).vm(name)
        g = Guest(name, "ns", 22, Path("/nonexistent"))
        g._conn = conn
        return g

    monkeypatch.setattr(vms, "guest", guest)
    # these fakes take the TTY path, whatever stdin the test runner has
    monkeypatch.setattr(cli, "_stdin_to_forward", lambda: None)


def test_exec_keeps_argument_boundaries(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state_dir: StateDir
) -> None:
    conn = FakeConnection()
    fake_guest(monkeypatch, conn)
    assert cli.main(["--state-dir", str(state_dir.path), "exec", "vm1", "--", *DD]) == 0
    assert conn.commands == ["sh -c 'dd if=/dev/zero of=/tmp/f count=1'"]
    assert shlex.split(conn.commands[0]) == DD


def test_ssh_joins_words_with_spaces_as_ssh_does(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state_dir: StateDir
) -> None:
    conn = FakeConnection()
    fake_guest(monkeypatch, conn)
    assert cli.main(["--state-dir", str(state_dir.path), "ssh", "vm1", "--", *DD]) == 0
    assert conn.commands == ["sh -c dd if=/dev/zero of=/tmp/f count=1"]


def test_ssh_help_says_words_are_joined(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["ssh", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "joined with spaces" in text and "exec" in text


@pytest.mark.parametrize("command", ["ssh", "exec"])
def test_output_streams_separately_and_exit_status_is_the_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state_dir: StateDir,
    command: str,
) -> None:
    conn = FakeConnection(exited=3, stdout="to stdout\n", stderr="to stderr\n")
    fake_guest(monkeypatch, conn)
    assert cli.main(["--state-dir", str(state_dir.path), command, "vm1", "--", "x"]) == 3
    captured = capsys.readouterr()
    assert captured.out == "to stdout\n"
    assert captured.err == "to stderr\n"
    kw = conn.kwargs[0]
    assert kw["hide"] is False and kw["timeout"] is None and kw["pty"] is False


@pytest.mark.parametrize("command", ["ssh", "exec"])
@pytest.mark.parametrize(
    "fail", [OSError(104, "Connection reset by peer"), paramiko.SSHException("Socket is closed"),
             EOFError()],
)
def test_lost_connection_is_one_line_and_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state_dir: StateDir,
    command: str, fail: BaseException,
) -> None:
    fake_guest(monkeypatch, FakeConnection(stdout="partial\n", fail=fail))
    code = cli.main(["--state-dir", str(state_dir.path), command, "vm1", "--", "long", "job"])
    captured = capsys.readouterr()
    assert code == 255
    assert captured.out == "partial\n"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "vm1" in lines[0] and "connection lost" in lines[0]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("command", ["ssh", "exec"])
def test_a_channel_closed_without_exit_status_is_a_lost_connection(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state_dir: StateDir,
    command: str,
) -> None:
    # When the guest dies mid-command, fabric returns paramiko's "no exit
    # status" (-1) instead of raising: seen with QEMU killed under `harness exec`.
    fake_guest(monkeypatch, FakeConnection(exited=-1, stdout="started\n"))
    assert cli.main(["--state-dir", str(state_dir.path), command, "vm1", "--", "x"]) == 255
    captured = capsys.readouterr()
    assert captured.out == "started\n"
    assert captured.err.strip() == (
        "harness: vm1: connection lost before the command exited")


def test_guest_status_treats_no_exit_status_as_a_lost_connection() -> None:
    g = Guest("vm1", "ns", 22, Path("/nonexistent"))
    g._conn = FakeConnection(exited=-1)
    with pytest.raises(GuestError, match="connection lost"):
        g.status("true")


@pytest.mark.parametrize(
    "fail", [OSError("Socket is closed"), paramiko.SSHException("Socket is closed"), EOFError()]
)
def test_guest_status_translates_a_lost_connection(fail: BaseException) -> None:
    g = Guest("vm1", "ns", 22, Path("/nonexistent"))
    g._conn = FakeConnection(fail=fail)
    with pytest.raises(GuestError, match="connection lost") as exc:
        g.status("true")
    assert exc.value.exitcode is None


def test_exec_without_a_program_is_an_error(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir
) -> None:
    assert cli.main(["--state-dir", str(state_dir.path), "exec", "vm1"]) == 1
    assert "needs a program" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ssh", "exec"])
def test_ssh_and_exec_work_while_the_lock_is_held(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state_dir: StateDir,
    command: str,
) -> None:
    conn = FakeConnection(stdout="hi\n")
    fake_guest(monkeypatch, conn)
    with StateDir(state_dir.path):  # e.g. a migration in another harness
        code = cli.main(["--state-dir", str(state_dir.path), command, "vm1", "--", "echo", "hi"])
    assert code == 0 and capsys.readouterr().out == "hi\n"
