"""The ivloop-server command: options, exit codes, signals, socket handling.

These run ``python -m ivloop_server`` as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ivloop_server import abi

from .conftest import ServerProcess, qemu_process, server_command, wait_until
from .fakeclient import FakeQemu


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        server_command(*args), capture_output=True, text=True, timeout=timeout, check=False
    )


def test_sigterm_stops_cleanly(
    spawn: Callable[..., ServerProcess], tmp_path: Path, clients: list[FakeQemu]
) -> None:
    pidfile = tmp_path / "server.pid"
    sp = spawn("--pidfile", str(pidfile))
    assert stat.S_IMODE(os.stat(sp.socket_path).st_mode) == 0o600
    assert pidfile.read_text().strip() == str(sp.proc.pid)
    a = FakeQemu.join(sp.socket_path)
    b = FakeQemu.join(sp.socket_path)
    clients += [a, b]
    a.expect_join(1)
    sp.proc.send_signal(signal.SIGTERM)
    assert sp.wait() == 0, sp.stderr()
    assert not sp.socket_path.exists()
    assert not pidfile.exists()
    assert a.at_eof()
    b.expect_leave(0)
    assert b.at_eof()
    assert sp.proc.stdout is not None and sp.proc.stdout.read() == b""


def test_sigint_stops_cleanly(spawn: Callable[..., ServerProcess]) -> None:
    sp = spawn()
    sp.proc.send_signal(signal.SIGINT)
    assert sp.wait() == 0, sp.stderr()
    assert not sp.socket_path.exists()
    assert "Traceback" not in sp.stderr()


def test_stale_socket_is_replaced(
    spawn: Callable[..., ServerProcess], tmp_path: Path, clients: list[FakeQemu]
) -> None:
    path = tmp_path / "ivl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: like a crashed server's leftover
    sp = spawn(socket_path=path)
    assert "removing stale socket" in sp.stderr()
    client = FakeQemu.join(path)
    clients.append(client)
    assert client.own_id == 0
    assert sp.terminate() == 0


def test_live_socket_is_left_alone(spawn: Callable[..., ServerProcess], tmp_path: Path) -> None:
    path = tmp_path / "ivl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        ino = path.stat().st_ino
        sp = spawn(socket_path=path, ready=False)
        assert sp.wait() == 1
        assert path.stat().st_ino == ino
        err = sp.stderr()
        assert "another server is accepting connections" in err
        # The probe connection reached the live socket; nothing else did.
        conn, _ = live.accept()
        conn.close()


def test_live_ivloop_server_is_refused(spawn: Callable[..., ServerProcess], tmp_path: Path) -> None:
    first = spawn()
    second = spawn(ready=False)
    assert second.wait() == 1
    assert "another server" in second.stderr()
    assert first.proc.poll() is None
    assert first.socket_path.is_socket()
    assert first.terminate() == 0


def test_path_that_is_not_a_socket_is_refused(
    spawn: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    path = tmp_path / "ivl.sock"
    path.write_text("precious\n")
    sp = spawn(socket_path=path, ready=False)
    assert sp.wait() == 1
    assert path.read_text() == "precious\n"
    assert "is not a socket" in sp.stderr()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "3M"], "not a power of two"),
        (["--size", "1M"], "use --size 32M or more"),
        (["--size", "lots"], "is not a size"),
        (["--max-peers", "0"], "outside 2..64"),
        (["--max-peers", "65"], "outside 2..64"),
        (["--max-peers", "1"], "outside 2..64"),
        (["--vectors", "1"], "too few for ivloop, which needs 2"),
        (["--ring-size", "1M", "--size", "32M"], "does not fit in 32M"),
        (["--ring-size", "128K", "--size", "64M"], "power of two between"),
        (["--ready-fd", "999"], "not an open file descriptor"),
        (["--log-format", "xml"], "invalid choice"),
        (["--socket-mode", "0666"], "must be within 0770"),
        (["--socket-mode", "rw"], "not an octal mode"),
        (["--socket-group", "no-such-group-ivl"], "no group named"),
    ],
)
def test_bad_values_give_one_line_and_status_2(
    args: list[str], message: str, tmp_path: Path
) -> None:
    path = tmp_path / "ivl.sock"
    result = run_cli("--socket", str(path), *args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ivloop-server: error: ")
    assert message in lines[0]
    assert result.stdout == ""
    assert not path.exists()


def test_bad_nic_map_gives_one_line_and_status_2(tmp_path: Path) -> None:
    path = tmp_path / "ivl.sock"
    nics = tmp_path / "nics"
    nics.write_text("vm1 52:54:00:00:00:01\nvm2\nvm3 52:54:00:00:00:01\nvm4 ff:ff:ff:ff:ff:ff\n")
    result = run_cli("--socket", str(path), "--nic-macs", str(nics))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ivloop-server: error: bad --nic-macs file {nics}: line 2: ")
    assert "line 3: 52:54:00:00:00:01 is already vm1's" in lines[0]
    assert "line 4: ff:ff:ff:ff:ff:ff is a multicast address" in lines[0]
    assert not path.exists()
    result = run_cli("--socket", str(path), "--nic-macs", str(tmp_path / "absent"))
    assert result.returncode == 2
    assert "cannot read --nic-macs file" in result.stderr and "No such file" in result.stderr


def test_nic_map_is_used_and_reread_on_sighup(
    spawn: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    nics = tmp_path / "nics"
    nics.write_text("# two-NIC guests\nvm5 52:54:00:00:00:0b\n")
    sp = spawn("--log-format", "json", "--nic-macs", str(nics))
    qemu = ["-name", "guest=vm5", "-netdev", "tap,id=a", "-netdev", "tap,id=b",
            "-device", "e1000,netdev=a,mac=52:54:00:00:00:0a",
            "-device", "e1000,netdev=b,mac=52:54:00:00:00:0b"]  # fmt: skip

    def records(event: str) -> list[dict[str, object]]:
        out = [json.loads(line) for line in sp.stderr().splitlines()]
        return [r for r in out if r.get("event") == event]

    with qemu_process(sp.socket_path, *qemu):
        wait_until(lambda: len(records("nic")) == 1, what="the first peer's NIC")
    assert records("nic")[0]["nic_mac"] == "52:54:00:00:00:0b"
    assert records("nic")[0]["source"] == "--nic-macs map"
    data = json.loads(run_cli("--dump", str(sp.proc.pid)).stdout)
    assert data["directory"][0]["nic_mac"] == "52:54:00:00:00:0b"
    assert data["directory"][0]["mac_known"] is True

    nics.write_text("vm5 not-a-mac\n")
    sp.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(records("reload")) == 1, what="a rejected reload")
    bad = records("reload")[0]
    assert bad["level"] == "error" and "keeping the previous map" in str(bad["msg"])
    nics.write_text("vm5 52:54:00:00:00:0a\n")
    sp.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(records("reload")) == 2, what="a reload")
    assert records("reload")[1]["entries"] == 1
    with qemu_process(sp.socket_path, *qemu):
        wait_until(lambda: len(records("nic")) == 2, what="the second peer's NIC")
    assert records("nic")[1]["nic_mac"] == "52:54:00:00:00:0a"
    assert sp.terminate() == 0, sp.stderr()
    assert "Traceback" not in sp.stderr()


def test_socket_is_required() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert result.stderr == "ivloop-server: error: --socket PATH (or -S PATH) is required\n"


def test_json_logs(
    spawn: Callable[..., ServerProcess], clients: list[FakeQemu], tmp_path: Path
) -> None:
    sp = spawn("--log-format", "json", "--max-peers", "2")
    a = FakeQemu.join(sp.socket_path)
    b = FakeQemu.join(sp.socket_path)
    clients += [a, b]
    refused = FakeQemu.connect(sp.socket_path)
    clients.append(refused)
    assert refused.refused()
    b.sock.send(b"x")
    a.expect_join(1)
    a.expect_leave(1)
    assert sp.terminate() == 0
    records = [json.loads(line) for line in sp.stderr().splitlines()]
    events = [(r.get("event"), r.get("peer")) for r in records if r.get("event")]
    assert events == [
        ("start", None),
        ("join", 0),
        ("nic", 0),  # the test process has no NIC: unknown, claims unchecked
        ("join", 1),
        ("nic", 1),
        ("refuse", None),
        ("leave", 1),
        ("leave", 0),
        ("stop", None),
    ]
    by_event = {r["event"]: r for r in records if r.get("event")}
    assert by_event["refuse"]["level"] == "warning"
    reasons = [r["reason"] for r in records if r.get("event") == "leave"]
    assert reasons[0].startswith("misbehaving") and reasons[1] == "received SIGTERM"
    assert by_event["stop"]["reason"] == "received SIGTERM"
    assert by_event["join"]["logger"] == "ivloop_server.server.peer1"
    slots = [(r["event"], r["peer"], r["slot"]) for r in records if "slot" in r]
    assert slots == [("join", 0, 0), ("nic", 0, 0), ("join", 1, 1), ("nic", 1, 1),
                     ("leave", 1, 1), ("leave", 0, 0)]  # fmt: skip
    nic = next(r for r in records if r.get("event") == "nic")
    assert (nic["level"], nic["nic_mac"]) == ("info", None)
    assert "cannot be checked" in nic["msg"] and "no NIC on its command line" in nic["source"]
    # 2 peers in 32M: 4 rings of just under 8M each, so 4M rings.
    assert by_event["start"]["ring_size"] == 4 << 20
    assert by_event["join"]["pid"] == os.getpid()


def test_dump_reads_a_running_servers_directory(
    spawn: Callable[..., ServerProcess], clients: list[FakeQemu]
) -> None:
    sp = spawn("--size", "64M")
    a = FakeQemu.join(sp.socket_path)
    clients.append(a)
    result = run_cli("--dump", str(sp.proc.pid))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["header"]["magic"] == abi.IVL_MAGIC
    assert data["header"]["region_size"] == 64 << 20
    assert data["header"]["nr_present"] == 1
    assert [s["present"] for s in data["directory"]] == [True] + [False] * 7
    assert data["directory"][0]["state"] == "IVL_STATE_DOWN"
    assert data["directory"][0]["peer_id"] == 0
    # Re-join: slot 1 is given out again, with a new peer ID, and --dump shows it.
    b = FakeQemu.join(sp.socket_path)
    clients.append(b)
    b.close()
    a.expect_join(1)
    a.expect_leave(1)
    c = FakeQemu.join(sp.socket_path)
    clients.append(c)
    a.expect_join(2)
    data = json.loads(run_cli("--dump", str(sp.proc.pid)).stdout)
    assert [(s["index"], s["present"], s["peer_id"]) for s in data["directory"][:3]] == [
        (0, True, 0),
        (1, True, 2),
        (2, False, 0),
    ]
    assert sp.terminate() == 0


def test_dump_of_a_non_region_fails(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(8192))
    result = run_cli("--dump", str(junk))
    assert result.returncode == 1
    assert "bad magic" in result.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "ivloop-server"
    if not script.exists():
        pytest.skip("ivloop-server console script not installed in this environment")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.startswith("ivloop-server ")


def test_wait_until_helper_fails() -> None:
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(lambda: False, timeout=0.05, what="nothing")


def test_no_fd_leak_across_joins_and_leaves(
    spawn: Callable[..., ServerProcess], clients: list[FakeQemu]
) -> None:
    sp = spawn("--vectors", "4")
    fd_dir = Path(f"/proc/{sp.proc.pid}/fd")
    anchor = FakeQemu.join(sp.socket_path, vectors=4)
    clients.append(anchor)
    baseline = len(list(fd_dir.iterdir()))
    for peer_id in range(1, 6):
        with FakeQemu.join(sp.socket_path, vectors=4) as guest:
            assert guest.own_id == peer_id  # slot 1 each time, never the same ID
            assert len(guest.peers[0]) == 4
            anchor.expect_join(peer_id)
        anchor.expect_leave(peer_id)
    # The leave is announced before the server closes the peer's fds.
    wait_until(lambda: len(list(fd_dir.iterdir())) == baseline, what="server fds back to baseline")
    assert sp.terminate() == 0


def test_socket_mode_and_group_are_applied(spawn: Callable[..., ServerProcess]) -> None:
    gid = os.getgid() if os.getgid() != 0 else 1  # "daemon" exists everywhere
    sp = spawn("--socket-mode", "0660", "--socket-group", str(gid))
    st = os.stat(sp.socket_path)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == gid
    sp.proc.send_signal(signal.SIGTERM)
    assert sp.wait() == 0, sp.stderr()
