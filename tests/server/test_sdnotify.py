"""sd_notify: the server tells a service manager READY=1, STATUS=, STOPPING=1.

The manager is played by a real AF_UNIX datagram socket, bound to a path in
tmp_path or to an abstract name, that the real server process finds in
$NOTIFY_SOCKET, as under systemd's Type=notify.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivloop_server.sdnotify import Notifier, parse_address

from .conftest import server_command
from .fakeclient import FakeQemu

TIMEOUT = 10.0


class FakeManager:
    """The service manager's end: a datagram socket collecting notifications."""

    def __init__(self, address: str | bytes, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.env_value = env_value
        self.received: list[dict[str, str]] = []

    def next(self, timeout: float = TIMEOUT) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        assert data.endswith(b"\n"), data
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append(fields)
        return fields

    def wait_for(self, key: str, timeout: float = TIMEOUT) -> dict[str, str]:
        """The next notification carrying ``key`` (others are kept in ``received``)."""
        while True:
            fields = self.next(timeout)
            if key in fields:
                return fields

    def quiet(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeManager]:
    if request.param == "path":
        path = tmp_path / "notify"
        mgr = FakeManager(str(path), str(path))
    else:
        name = f"ivloop-test-notify-{os.getpid()}-{secrets.token_hex(4)}"
        mgr = FakeManager(b"\0" + name.encode(), "@" + name)
    yield mgr
    mgr.close()


def start(tmp_path: Path, manager: FakeManager, *args: str,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    environ = {**os.environ, "NOTIFY_SOCKET": manager.env_value, **(env or {})}
    with (tmp_path / "server.stderr").open("wb") as err:
        return subprocess.Popen(
            server_command("--socket", str(tmp_path / "ivl.sock"), "--max-peers", "4", *args),
            env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []
    yield made
    for proc in made:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_ready_status_and_stopping(
    tmp_path: Path, manager: FakeManager, procs: list[subprocess.Popen[bytes]],
    clients: list[FakeQemu],
) -> None:  # fmt: skip
    proc = start(tmp_path, manager)
    procs.append(proc)
    ready = manager.next()
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("0 of 4 peers on ")
    assert "65536 peer IDs left" in ready["STATUS"]
    # READY=1 means connections are accepted: join at once, no retry.
    a = FakeQemu.join(tmp_path / "ivl.sock")
    clients.append(a)
    assert a.own_id == 0
    assert manager.wait_for("STATUS")["STATUS"].startswith("1 of 4 peers")
    b = FakeQemu.join(tmp_path / "ivl.sock")
    clients.append(b)
    assert manager.wait_for("STATUS")["STATUS"].startswith("2 of 4 peers")
    assert "65534 peer IDs left" in manager.received[-1]["STATUS"]
    b.close()
    assert manager.wait_for("STATUS")["STATUS"].startswith("1 of 4 peers")
    proc.send_signal(signal.SIGTERM)
    stopping = manager.wait_for("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert "received SIGTERM" in stopping["STATUS"]
    assert proc.wait(10) == 0
    assert all("READY" not in n for n in manager.received[1:])


def test_reload_says_reloading_then_ready(
    tmp_path: Path, manager: FakeManager, procs: list[subprocess.Popen[bytes]]
) -> None:
    nics = tmp_path / "nics"
    nics.write_text("vm1 52:54:00:00:00:01\n")
    proc = start(tmp_path, manager, "--nic-macs", str(nics))
    procs.append(proc)
    assert manager.next()["READY"] == "1"
    proc.send_signal(signal.SIGHUP)
    reloading = manager.next()
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert manager.next()["READY"] == "1"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_watchdog_pings(
    tmp_path: Path, manager: FakeManager, procs: list[subprocess.Popen[bytes]]
) -> None:
    proc = start(tmp_path, manager, env={"WATCHDOG_USEC": "100000"})  # 0.1 s: ping every 0.05
    procs.append(proc)
    assert manager.next()["READY"] == "1"
    pings = [manager.wait_for("WATCHDOG", timeout=2) for _ in range(5)]
    assert all(p == {"WATCHDOG": "1"} for p in pings)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_watchdog_meant_for_another_process_is_ignored(
    tmp_path: Path, manager: FakeManager, procs: list[subprocess.Popen[bytes]]
) -> None:
    proc = start(tmp_path, manager, env={"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
    procs.append(proc)
    assert manager.next()["READY"] == "1"
    assert manager.quiet(0.5), "pinged a watchdog meant for PID 1"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_start_failure_is_a_status_and_no_ready(
    tmp_path: Path, manager: FakeManager, procs: list[subprocess.Popen[bytes]]
) -> None:
    (tmp_path / "ivl.sock").write_text("not a socket\n")
    proc = start(tmp_path, manager)
    procs.append(proc)
    assert proc.wait(10) == 1
    failed = manager.next()
    assert "READY" not in failed
    assert failed["STATUS"].startswith("failed: ") and "is not a socket" in failed["STATUS"]


def test_without_notify_socket_nothing_is_sent(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    notifier = Notifier.from_environ(env)
    assert not notifier.enabled
    assert not notifier.ready("x") and not notifier.stopping() and not notifier.watchdog()
    assert notifier.watchdog_interval is None


def test_environment_is_consumed(manager: FakeManager) -> None:
    env = {"NOTIFY_SOCKET": manager.env_value, "WATCHDOG_USEC": "2000000",
           "WATCHDOG_PID": str(os.getpid()), "OTHER": "kept"}  # fmt: skip
    notifier = Notifier.from_environ(env)
    assert env == {"OTHER": "kept"}, "children must not talk to the manager in our name"
    assert notifier.watchdog_interval == 1.0
    assert notifier.ready("all good", mainpid=1234)
    assert manager.next() == {"READY": "1", "MAINPID": "1234", "STATUS": "all good"}
    assert notifier.status("all good") is False, "an unchanged status is not resent"
    assert notifier.status("line one\nline two")
    assert manager.next() == {"STATUS": "line one line two"}
    notifier.close()


def test_unsupported_or_dead_manager_never_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ivloop_server"):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
        assert not notifier.enabled and not notifier.ready()
        assert "not a UNIX socket path or @name" in caplog.text
        gone = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
        assert gone.enabled
        assert not gone.ready()  # ENOENT: logged once, then silent
        assert not gone.stopping()
    warnings = [r for r in caplog.records if "cannot notify" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    ("value", "address"),
    [("/run/systemd/notify", "/run/systemd/notify"), ("@sd-notify", b"\0sd-notify"),
     ("@", None), ("relative/path", None), ("vsock:2:9", None)],
)  # fmt: skip
def test_parse_address(value: str, address: str | bytes | None) -> None:
    assert parse_address(value) == address
