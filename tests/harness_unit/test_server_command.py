"""Which ivloop-server the harness runs: its own, or the one a package installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ivloop_server
from harness.errors import ServerBinaryError
from harness.lab import servers

SCRIPT = """#!/usr/bin/python3
import sys
from ivloop_server.cli import main
sys.exit(main())
"""


def packaged_root(tmp_path: Path) -> Path:
    """A root laid out as ivloop-host installs the server (what dpkg-deb -x gives)."""
    site = tmp_path / servers.PACKAGED_PYTHONPATH
    shutil.copytree(Path(ivloop_server.__file__).parent, site / "ivloop_server",
                    ignore=shutil.ignore_patterns("__pycache__"))
    meta = site / f"ivloop_server-{ivloop_server.__version__}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: ivloop-server\nVersion: {ivloop_server.__version__}\n")
    binary = tmp_path / servers.PACKAGED_BINARY
    binary.parent.mkdir(parents=True)
    binary.write_text(SCRIPT)
    binary.chmod(0o755)
    return tmp_path


def test_without_a_root_the_harness_runs_its_own_server() -> None:
    assert servers.server_command({}) == [sys.executable, "-m", "ivloop_server"]


def test_a_root_runs_the_packaged_script_with_the_packaged_modules(tmp_path: Path) -> None:
    root = packaged_root(tmp_path)
    argv = servers.server_command({servers.SERVER_ROOT_ENV: str(root)})
    assert argv == ["env", f"PYTHONPATH={root / servers.PACKAGED_PYTHONPATH}",
                    str(root / servers.PACKAGED_BINARY)]
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no system python3 to run the packaged script with")
    out = subprocess.run([*argv, "--version"], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert out.stdout.split()[-1] == ivloop_server.__version__


def test_the_machines_own_installation_needs_no_pythonpath(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed = Path("/", servers.PACKAGED_BINARY)
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda p: p == installed or real_is_file(p))
    assert servers.server_command({servers.SERVER_ROOT_ENV: "/"}) == ["/usr/bin/ivloop-server"]


def test_a_root_without_the_server_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ServerBinaryError, match=r"dpkg-deb -x ivloop-host_\*\.deb DIR"):
        servers.server_command({servers.SERVER_ROOT_ENV: str(tmp_path)})
