"""Bad migration requests are refused before anything changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness import cli, topology
from harness.migrate import source_memory
from harness.state import ProcRecord, State, StateDir, VMState, VMStatus

from .support import record_default_topology, snapshot


@pytest.fixture
def running(tmp_path: Path) -> StateDir:
    """Default topology recorded as running (this test process stands in for QEMU)."""
    return record_default_topology(tmp_path / "state", ProcRecord.of(os.getpid()))




@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["vm3", "--from", "A", "--to", "B"], "vm3 runs on host B, not A"),
        (["vm2", "--from", "A", "--to", "A"], "nothing to migrate"),
        (["vm2", "--from", "A", "--to", "Z"], "unknown host 'Z'"),
        (["vm2", "--from", "Q", "--to", "B"], "unknown host 'Q'"),
        (["vm7", "--from", "A", "--to", "B"], "unknown VM 'vm7'"),
        (["--from", "B", "--to", "A"], "host B has 0 VMs marked mobile"),
    ],
)
def test_bad_request_is_refused_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], running: StateDir, argv: list[str], message: str
) -> None:
    before = snapshot(running)
    assert cli.main(["--state-dir", str(running.path), "migrate", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert snapshot(running) == before


def test_migrating_a_vm_that_is_down_is_refused(
    capsys: pytest.CaptureFixture[str], running: StateDir
) -> None:
    with running:
        state = running.load()
        state.vms["vm2"].proc = ProcRecord(pid=2**22 + 3, start_time=1)
        running.save(state)
    before = snapshot(running)
    assert cli.main(["--state-dir", str(running.path), "migrate", "--from", "A", "--to", "B"]) == 1
    assert "VM vm2 is down" in capsys.readouterr().err
    assert snapshot(running) == before


@pytest.mark.parametrize("value", ["0", "-3", "abc"])
def test_bad_timeout_is_an_argparse_error(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["migrate", "--from", "A", "--to", "B", "--timeout", value])
    assert exc.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_destination_repeats_the_sources_recorded_memory() -> None:
    spec = topology.load().vm("vm2")
    vs = VMState(name="vm2", host="A", status=VMStatus.RUNNING, memory="262152K")
    assert source_memory(vs, spec) == "262152K"


def test_vm_from_an_older_harness_migrates_with_the_plain_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A state file written before -m was recorded has no "memory" key; its
    # QEMU got "<mib>M", and a padded destination would be refused by QEMU.
    sd = record_default_topology(tmp_path / "state", ProcRecord.of(os.getpid()))
    raw = json.loads(sd.file("state.json").read_text())
    for vm in raw["vms"].values():
        del vm["memory"]
    sd.file("state.json").write_text(json.dumps(raw))
    state: State = sd.load()
    spec = topology.load().vm("vm2")
    assert source_memory(state.vms["vm2"], spec) == f"{spec.memory}M"
    assert "harness down && harness up" in caplog.text
