"""The systemd units shipped with ivloop-server, and what packagers get.

``systemd-analyze verify`` works without systemd as PID 1 (these machines
have none); the units are rendered by ``ivloop-server --print-unit`` so that
ExecStart names this installation's ivloop-server, which verify requires to
exist.  The unit's own command line, with the shipped defaults file, is
then run for real against a fake service manager.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from ivloop_server.unitfiles import UNIT_BINARY, UNIT_FILES, unit_text

from .conftest import server_command
from .fakeclient import FakeQemu

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("ivloop-server.service", "ivloop-server@.service")


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return tool


def directives(text: str) -> dict[str, list[str]]:
    """KEY -> values of a unit file (keys may repeat), comments dropped."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def installed_binary() -> Path:
    binary = Path(sys.executable).with_name("ivloop-server")
    if not binary.exists():
        pytest.skip("the ivloop-server console script is not installed in this environment")
    return binary


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    """The units as ``ivloop-server --print-unit`` prints them, in a directory of their own."""
    binary = installed_binary()
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        result = subprocess.run([str(binary), "--print-unit", name], capture_output=True,
                                text=True, check=True, timeout=30)  # fmt: skip
        (units / name).write_text(result.stdout)
    return units


@pytest.mark.parametrize("unit", ["ivloop-server.service", "ivloop-server@tenant1.service"])
def test_systemd_analyze_verify_passes(rendered: Path, unit: str) -> None:
    result = subprocess.run([analyze(), "verify", unit], cwd=rendered, capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    # verify exits 0 even for unknown keys and bad values: it only warns, so
    # any output is a failure too.
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == "", result.stderr + result.stdout


def test_verify_would_catch_a_broken_unit(rendered: Path) -> None:
    """The check above can fail: a typo and a missing binary are reported."""
    text = (rendered / "ivloop-server.service").read_text()
    (rendered / "broken.service").write_text(
        text.replace("Type=notify", "Type=notifyy").replace(str(installed_binary()),
                                                             "/nonexistent/ivloop-server")
    )  # fmt: skip
    result = subprocess.run([analyze(), "verify", "broken.service"], cwd=rendered,
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode != 0
    assert "notifyy" in result.stderr and "/nonexistent/ivloop-server" in result.stderr


def test_hardening_exposure_is_low(rendered: Path) -> None:
    result = subprocess.run([analyze(), "security", "--offline=yes", "--no-pager",
                             "ivloop-server.service"], cwd=rendered, capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    match = re.search(r"Overall exposure level for ivloop-server.service: ([\d.]+)", result.stdout)
    if match is None and "offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no offline security check: {result.stderr}")
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout  # 10 is unprotected, 1.7 when written


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_a_notify_service_that_can_make_its_memfd_and_socket(name: str) -> None:
    d = directives(unit_text(name, UNIT_BINARY))
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify"
    assert one["Restart"] == "on-failure" and one["RestartPreventExitStatus"] == "2"
    assert d["EnvironmentFile"][0] == "-/etc/default/ivloop-server"
    exec_start = shlex.split(one["ExecStart"])
    assert exec_start[:3] == [UNIT_BINARY, "--foreground", "--socket"]
    assert exec_start[-1] == "$IVLOOP_SERVER_OPTS"
    runtime = one["RuntimeDirectory"]
    assert exec_start[3] == f"/run/{runtime}/ivloop.sock"
    # The hardening leaves what the server needs: UNIX sockets, memfd_create
    # (in @system-service's @ipc), chown for --socket-group, other users' /proc.
    assert one["RestrictAddressFamilies"] == "AF_UNIX"
    assert one["SystemCallFilter"] == "@system-service"
    assert one["CapabilityBoundingSet"] == "CAP_CHOWN"
    assert one["ProtectProc"] == "default"
    assert one["ProtectSystem"] == "strict" and one["MemoryDenyWriteExecute"] == "yes"
    assert one["NoNewPrivileges"] == "yes" and one["PrivateTmp"] == "yes"
    assert one["ProtectHome"] == "yes" and one["PrivateDevices"] == "yes"


def test_template_instances_do_not_share_files() -> None:
    d = directives(unit_text("ivloop-server@.service", UNIT_BINARY))
    assert d["RuntimeDirectory"] == ["ivloop-server-%i"]
    assert d["EnvironmentFile"] == ["-/etc/default/ivloop-server",
                                    "-/etc/default/ivloop-server-%i"]  # fmt: skip


def test_print_unit_names_this_installation() -> None:
    binary = installed_binary()
    out = subprocess.run([str(binary), "--print-unit"], capture_output=True, text=True,
                         check=True, timeout=30).stdout  # fmt: skip
    assert out == unit_text("ivloop-server.service", str(binary.absolute()))
    assert f"ExecStart={binary.absolute()} --foreground" in out
    defaults = subprocess.run(server_command("--print-unit", "ivloop-server.default"),
                              capture_output=True, text=True, check=True, timeout=30).stdout
    assert "IVLOOP_SERVER_OPTS=" in defaults


def test_unit_files_are_package_data() -> None:
    """pip install carries them: they sit in a package of their own (a data
    directory that is not one makes setuptools warn it will stop installing
    it), and package-data names them."""
    for name in UNIT_FILES:
        assert (resources.files("ivloop_server") / "systemd" / name).is_file()
    setup = tomllib.loads((ROOT / "qemu-dev/pyproject.toml").read_text())["tool"]["setuptools"]
    assert "ivloop_server.systemd" in setup["packages"]
    assert "*" in setup["package-data"]["ivloop_server.systemd"]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(15)
    yield sock
    sock.close()


@pytest.mark.parametrize("unit", UNITS)
def test_unit_command_line_with_the_defaults_file_serves(
    tmp_path: Path, notify_socket: socket.socket, clients: list[FakeQemu], unit: str
) -> None:
    """ExecStart as systemd would run it: defaults file read, socket in the runtime dir."""
    binary = installed_binary()
    d = directives(unit_text(unit, str(binary)))
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {}
    for line in unit_text("ivloop-server.default").splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = " ".join(shlex.split(value))
    argv = []
    for word in shlex.split(d["ExecStart"][-1].replace("%i", "tenant1")):
        if word == "$IVLOOP_SERVER_OPTS":  # systemd splits $VAR at whitespace
            argv += env["IVLOOP_SERVER_OPTS"].split()
        else:
            argv.append(re.sub(r"^/run/[^/]+", str(runtime), word))
    assert argv[0] == str(binary)
    proc = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        ready = notify_socket.recv(4096).decode()
        assert ready.startswith("READY=1\n"), ready
        assert "of 8 peers" in ready  # --max-peers 8 from the defaults file
        client = FakeQemu.join(runtime / "ivloop.sock")
        clients.append(client)
        assert os.fstat(client.shm_fd or -1).st_size == 128 << 20  # --size 128M
        assert (runtime / "ivloop.sock").stat().st_mode & 0o777 == 0o600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
