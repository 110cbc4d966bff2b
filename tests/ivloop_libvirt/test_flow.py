"""The migration flow's failure rules, on a mover that records its calls."""

from __future__ import annotations

from typing import Any

import pytest

from ivloop_libvirt import flow
from ivloop_libvirt.errors import IncompleteMigrationError, MigrationError
from ivloop_libvirt.flow import Completed, Progress
from ivloop_libvirt.reports import PHASES, MigrationReport


class Recorder:
    """A mover whose steps fail on request; it records what ran."""

    def __init__(self, fail: str = "", *, error: BaseException | None = None,
                 landed: bool = False, restore: bool = True, device: bool = True) -> None:
        self.fail = fail
        self.error = error or RuntimeError(f"{fail} broke")
        self.is_landed = landed
        self.restore = restore
        self.device = device
        self.calls: list[str] = []
        self.report = MigrationReport(vm="vm2", source="A", destination="B", backend="test",
                                      dest_socket="/run/b.sock")

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            raise self.error

    def check(self) -> None:
        self._step("check")

    def has_device(self) -> bool:
        return self.device

    def unplug(self) -> None:
        self._step("unplug")

    def prepare(self) -> None:
        self._step("prepare")

    def migrate(self, timeout: float, say: Progress, t0: float) -> Completed:
        self._step("migrate")
        return Completed(downtime_ms=12.0, transferred_mib=64.0, job_ms=900.0)

    def landed(self) -> bool:
        self.calls.append("landed?")
        return self.is_landed

    def plug(self) -> None:
        self._step("plug")

    def finish(self) -> None:
        self._step("finish")

    def roll_back(self) -> str:
        self.calls.append("roll_back")
        return "" if self.restore else "plug it back by hand"

    def plug_command(self) -> str:
        return "plug vm2 on B"


def run(mover: Recorder, **kwargs: Any) -> MigrationReport:
    return flow.run(mover, timeout=10, **kwargs)


def test_a_move_runs_the_five_phases_in_order_and_reports_each() -> None:
    m = Recorder()
    report = run(m, switch_source=lambda t: 0.1, switch_dest=lambda t: 0.2)
    assert m.calls == ["check", *PHASES]
    assert report.ok and report.completed and report.failed_phase == ""
    assert (report.downtime_ms, report.transferred_mib, report.job_ms) == (12.0, 64.0, 900.0)
    assert (report.switch_source_s, report.switch_dest_s) == (0.1, 0.2)
    assert report.total_s >= sum(getattr(report, f"{p}_s") for p in PHASES)
    assert [e for _, e in report.events][-1] == "source stopped"


def test_a_bad_request_changes_nothing() -> None:
    m = Recorder("check", error=ValueError("no such VM"))
    with pytest.raises(ValueError, match="no such VM"):
        run(m)
    assert m.calls == ["check"]


@pytest.mark.parametrize("phase", ["unplug", "prepare", "migrate"])
def test_a_failure_before_completion_keeps_the_source(phase: str) -> None:
    m = Recorder(phase)
    with pytest.raises(MigrationError, match=f"vm2 stays on A: {phase} failed") as info:
        run(m)
    assert not isinstance(info.value, IncompleteMigrationError)
    assert m.calls[-1] == "roll_back" and "finish" not in m.calls and "plug" not in m.calls
    r = info.value.report
    assert r.failed_phase == phase and r.source_restored and not r.completed


def test_a_source_that_cannot_be_restored_is_incomplete_with_the_hint() -> None:
    m = Recorder("migrate", restore=False)
    with pytest.raises(IncompleteMigrationError, match="plug it back by hand") as info:
        run(m)
    assert info.value.report.source_restored is False and not info.value.report.completed


def test_a_refused_plug_after_completion_leaves_the_vm_on_the_destination() -> None:
    m = Recorder("plug")
    with pytest.raises(IncompleteMigrationError,
                       match=r"vm2 moved to B but runs there without shared memory") as info:
        run(m)
    # the source is stopped, never resumed: no roll back after completion
    assert m.calls == ["check", "unplug", "prepare", "migrate", "plug", "finish"]
    r = info.value.report
    assert r.completed and not r.ok and r.failed_phase == "plug"
    assert r.hint == "plug vm2 on B" and r.source_restored is None


def test_a_migration_that_completed_before_its_step_failed_is_not_rolled_back() -> None:
    m = Recorder("migrate", landed=True)
    with pytest.raises(IncompleteMigrationError) as info:
        run(m)
    assert m.calls == ["check", "unplug", "prepare", "migrate", "landed?", "finish"]
    assert info.value.report.completed and info.value.report.failed_phase == "migrate"


def test_ctrl_c_during_the_plug_still_stops_the_source_then_propagates() -> None:
    m = Recorder("plug", error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run(m)
    assert m.calls[-2:] == ["plug", "finish"] and "roll_back" not in m.calls


def test_ctrl_c_before_completion_rolls_back_then_propagates() -> None:
    m = Recorder("prepare", error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run(m)
    assert m.calls[-1] == "roll_back" and m.report.error == "interrupted"


def test_a_vm_without_a_device_migrates_without_plugging() -> None:
    m = Recorder(device=False)
    report = run(m)
    assert m.calls == ["check", "prepare", "migrate", "finish"] and report.ok
