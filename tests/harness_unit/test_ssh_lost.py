"""A lost ``harness ssh``/``exec`` session says what the state knows of why.

Reproduced on a 2-vCPU vm2 moving A -> B -> A under a 300 MiB nc stream from
vm1: vm1's sessions kept their exit status, and every session to vm2 ended
when its source QEMU stopped (the management NIC is that QEMU's user-mode
network, whose connections do not migrate), its command still running.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from harness import cli
from harness.lab import vms
from harness.lab.guest import Guest
from harness.lab.state import ProcRecord, State, StateDir

from .support import record_default_topology

LOST = "harness: vm2: connection lost before the command exited"


class _LostMidCommand:
    """fabric's Connection when the channel closes without an exit status;
    *meanwhile* changes the state as the event that closed it would."""

    def __init__(self, sd: StateDir, meanwhile: Any) -> None:
        self.sd, self.meanwhile = sd, meanwhile

    def run(self, command: str, **kw: Any) -> Any:
        with self.sd:
            state = self.sd.load()
            self.meanwhile(state)
            self.sd.save(state)
        return type("Result", (), {"exited": -1, "stdout": "", "stderr": ""})()

    def close(self) -> None:
        pass


@pytest.fixture
def alive(tmp_path: Path) -> StateDir:
    """Default topology recorded as running (this process stands in for QEMU)."""
    return record_default_topology(tmp_path / "state", ProcRecord.of(os.getpid()))


def lose(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], sd: StateDir,
         meanwhile: Any) -> str:
    def guest(sd_: StateDir, state: State, name: str, timeout: float = 30) -> Guest:
        g = Guest(name, "ns", 22, Path("/nonexistent"))
        g._conn = _LostMidCommand(sd, meanwhile)
        return g

    monkeypatch.setattr(vms, "guest", guest)
    assert cli.main(["--state-dir", str(sd.path), "ssh", "vm2", "--", "sleep", "45"]) == 255
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_a_session_ended_by_the_vms_migration_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], alive: StateDir
) -> None:
    def migrated(state: State) -> None:
        vs = state.vms["vm2"]
        vs.host, vs.generation = "B", vs.generation + 1

    assert lose(monkeypatch, capsys, alive, migrated) == (
        f"{LOST}; vm2 migrated to host B meanwhile, which ends SSH sessions to it "
        "(the command may still be running there)")


def test_a_session_ended_by_a_dead_qemu_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], alive: StateDir
) -> None:
    def died(state: State) -> None:
        # alive when the command started (this process), dead when it ended
        monkeypatch.setattr(ProcRecord, "alive", lambda self: False)

    assert lose(monkeypatch, capsys, alive, died) == (
        f"{LOST}; vm2's QEMU is gone ('harness status' shows the VM)")


def test_a_session_lost_for_no_recorded_reason_adds_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], alive: StateDir
) -> None:
    assert lose(monkeypatch, capsys, alive, lambda state: None) == LOST
