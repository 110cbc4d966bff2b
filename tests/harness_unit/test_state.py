"""The state directory: persistence, locking, PID-reuse guards, names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli
from harness.errors import BusyError, StateError
from harness.lab.state import HostState, ProcRecord, State, StateDir, VMState, VMStatus


def test_state_round_trips_through_json(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    with sd:
        state = State(instance=sd.instance, topology={"hosts": {"A": {}}}, topology_source="t")
        state.hosts["A"] = HostState(name="A", netns=sd.netns_name("A"),
                                     server=ProcRecord(pid=1, start_time=5))
        state.vms["vm1"] = VMState(name="vm1", host="A", status=VMStatus.RUNNING, ssh_port=2201)
        sd.save(state)
        again = sd.load()
    assert again == state
    assert again.vms["vm1"].status is VMStatus.RUNNING


def test_vhost_net_is_recorded_and_absent_in_older_states(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    with sd:
        sd.save(State(instance=sd.instance, topology={}, topology_source="t", accel="kvm",
                      vhost_net=True))
        assert sd.load().vhost_net is True
    older = json.loads(State(instance="x", topology={}, topology_source="t").to_json())
    del older["vhost_net"]  # a state written before the harness asked for vhost-net
    assert State.from_json(json.dumps(older)).vhost_net is False


def test_second_holder_of_the_lock_is_refused(tmp_path: Path) -> None:
    with StateDir(tmp_path), pytest.raises(BusyError, match="another harness"):
        StateDir(tmp_path).lock()


def test_loading_nothing_says_to_run_up(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="harness up"):
        StateDir(tmp_path).load()


def test_corrupt_state_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="corrupt"):
        StateDir(tmp_path).load()


def test_names_are_distinct_per_state_directory(tmp_path: Path) -> None:
    a, b = StateDir(tmp_path / "a"), StateDir(tmp_path / "b")
    assert a.netns_name("A") != b.netns_name("A")
    assert a.netns_name("A") == StateDir(tmp_path / "a").netns_name("A")


def test_proc_record_detects_exit_and_pid_reuse() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as proc:
        rec = ProcRecord.of(proc.pid)
        assert rec.alive()
        assert not ProcRecord(pid=proc.pid, start_time=rec.start_time + 1).alive()
        proc.kill()
        proc.wait()
    assert not rec.alive()
    assert not ProcRecord.of(os.getpid() + 10_000_000).alive()


def test_corrupt_state_hint_names_a_command_that_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = StateDir(tmp_path / "s")
    sd.path.mkdir()
    sd.file("state.json").write_text("{not json")
    with pytest.raises(StateError) as exc:
        sd.load()
    hint = str(exc.value)
    assert "--force" not in hint and "'harness down'" in hint
    # ... and the hint is true: down on a corrupt state file cleans up and succeeds.
    assert cli.main(["--state-dir", str(sd.path), "down"]) == 0
    assert not sd.exists()


def test_load_needs_no_lock(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    with sd:
        sd.save(State(instance=sd.instance, topology={}, topology_source="t"))
        assert StateDir(tmp_path).load().topology_source == "t"
