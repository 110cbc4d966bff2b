"""Bad requests get one clear line on stderr, exit status 1, and change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import cli
from harness.state import StateDir

from .support import run, snapshot


def test_ssh_to_unknown_vm(capsys: pytest.CaptureFixture[str], state_dir: StateDir) -> None:
    code, err = run(capsys, state_dir, "ssh", "vm9", "--", "true")
    assert code == 1
    assert err.strip() == "harness: error: unknown VM 'vm9' (VMs: vm1, vm2, vm3)"


def test_ssh_to_a_vm_that_is_down(capsys: pytest.CaptureFixture[str], state_dir: StateDir) -> None:
    code, err = run(capsys, state_dir, "ssh", "vm2", "--", "true")
    assert code == 1
    assert "VM vm2 is down" in err and len(err.strip().splitlines()) == 1


def test_up_twice_is_refused_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir
) -> None:
    before = snapshot(state_dir)
    code, err = run(capsys, state_dir, "up")
    assert code == 1
    assert "already up" in err and "harness down" in err
    assert snapshot(state_dir) == before


def test_up_with_a_bad_topology_creates_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[hosts.A]\n[vms.v1]\nhost = "A"\nmac = "nope"\n')
    sd = StateDir(tmp_path / "fresh")
    code, err = run(capsys, sd, "up", "--topology", str(bad))
    assert code == 1
    assert "invalid MAC address 'nope'" in err
    assert not sd.path.exists()


def test_plug_on_unknown_vm(capsys: pytest.CaptureFixture[str], state_dir: StateDir) -> None:
    code, err = run(capsys, state_dir, "unplug", "nosuch")
    assert code == 1 and "unknown VM 'nosuch'" in err


def test_status_without_probing_lists_dead_vms_as_down(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir
) -> None:
    assert cli.main(["--state-dir", str(state_dir.path), "status", "--json", "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert out.count('"status": "down"') == 3


def test_down_on_an_empty_state_dir_is_a_no_op(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["--state-dir", str(tmp_path / "empty"), "down"]) == 0
    assert "nothing was up" in capsys.readouterr().out


def test_bad_accel_value_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["up", "--accel", "hvf"])
    assert exc.value.code == 2
    assert "invalid choice: 'hvf'" in capsys.readouterr().err
