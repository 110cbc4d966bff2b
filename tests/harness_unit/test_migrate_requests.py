"""Bad migration requests are refused before anything changes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from harness import cli
from harness.backends.direct import source_memory
from harness.lab.state import ProcRecord, StateDir, VMState, VMStatus

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


class _SizeMonitor:
    """Answers query-memory-size-summary as a source QEMU of *ram* bytes would."""

    def __init__(self, ram: int) -> None:
        self.ram = ram

    async def cmd(self, name: str, args: object = None) -> dict[str, int]:
        assert name == "query-memory-size-summary"
        return {"base-memory": self.ram}


def _source_memory(ram: int, accel: str) -> str:
    vs = VMState(name="vm2", host="A", status=VMStatus.RUNNING, accel=accel)
    return asyncio.run(source_memory(_SizeMonitor(ram), vs))  # type: ignore[arg-type]


def test_destination_repeats_the_sources_ram_size(caplog: pytest.LogCaptureFixture) -> None:
    assert _source_memory(256 * 2**20 + 8192, "tcg") == "262152K"
    assert _source_memory(256 * 2**20, "kvm") == "262144K"
    assert not caplog.records


def test_unpadded_tcg_source_still_moves_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Booted before the TCG padding: a destination of another size would be
    # refused by QEMU, so it gets the same size and the user a way out.
    assert _source_memory(256 * 2**20, "tcg") == "262144K"
    assert "harness down && harness up" in caplog.text
