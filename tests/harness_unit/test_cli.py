"""Bad requests get one clear line on stderr, exit status 1, and change nothing."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from harness import cli
from harness import migrate as migrate_mod
from harness.errors import IncompleteMigrationError
from harness.experiments import soak as soak_mod
from harness.lab.state import StateDir

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


def test_status_works_while_another_harness_holds_the_lock(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir
) -> None:
    with StateDir(state_dir.path):  # e.g. a migration in progress
        code = cli.main(["--state-dir", str(state_dir.path), "status", "--json", "--no-probe"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)  # stdout is JSON and nothing else
    assert sorted(r["vm"] for r in rows) == ["vm1", "vm2", "vm3"]


def test_mutating_commands_still_take_the_lock(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir
) -> None:
    with StateDir(state_dir.path):
        code, err = run(capsys, state_dir, "unplug", "vm2")
    assert code == 1 and "another harness" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert re.fullmatch(r"harness \d+\.\d+\S*\n", capsys.readouterr().out)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in cli._parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_documented() -> None:
    subs = _subparsers()
    assert set(subs) == set(cli.COMMANDS)
    for name, sp in subs.items():
        assert sp.description, name
        assert sp.epilog and f"harness {name}" in sp.epilog, name


def test_every_option_has_help() -> None:
    parsers = [cli._parser(), *_subparsers().values()]
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, (parser.prog, action.dest)


@pytest.fixture
def fake_migrate(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str | None, str, str]]:
    """Replace the migration itself; record (vm, source, dest) and return a report."""
    calls: list[tuple[str | None, str, str]] = []

    def migrate(sd: StateDir, vm: str | None, source: str, dest: str,
                **kw: object) -> migrate_mod.Report:
        calls.append((vm, source, dest))
        return migrate_mod.Report(vm=vm or "?", source=source, destination=dest, ok=True,
                                  total_s=1.5)

    monkeypatch.setattr(migrate_mod, "migrate", migrate)
    return calls


@pytest.mark.parametrize("argv", [["vm2", "--to", "B"], ["--to", "B"]])
def test_migrate_from_defaults_to_where_the_state_says(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir,
    fake_migrate: list[tuple[str | None, str, str]], argv: list[str],
) -> None:
    code, err = run(capsys, state_dir, "migrate", *argv)
    assert code == 0, err
    assert fake_migrate == [("vm2", "A", "B")]


def test_migrate_from_that_disagrees_with_the_state_is_refused(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir,
    fake_migrate: list[tuple[str | None, str, str]],
) -> None:
    code, err = run(capsys, state_dir, "migrate", "vm2", "--from", "B", "--to", "A")
    assert code == 1
    assert "VM vm2 runs on host A, not B" in err and len(err.strip().splitlines()) == 1
    assert fake_migrate == []


def test_migrate_json_goes_to_stdout_and_json_out_to_a_file(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir, tmp_path: Path,
    fake_migrate: list[tuple[str | None, str, str]],
) -> None:
    path = tmp_path / "m.json"
    argv = ["--state-dir", str(state_dir.path), "migrate", "vm2", "--to", "B"]
    assert cli.main([*argv, "--json", "--json-out", str(path)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # nothing but JSON on stdout
    assert report["vm"] == "vm2" and report["destination"] == "B"
    assert json.loads(path.read_text()) == report
    assert "finish (source stopped)" in captured.err  # the table still reaches the user
    assert cli.main(argv) == 0
    assert "finish (source stopped)" in capsys.readouterr().out


def test_an_incomplete_migration_is_status_3_with_the_command_and_the_report(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir, monkeypatch: pytest.MonkeyPatch,
) -> None:
    report = migrate_mod.Report(vm="vm2", source="A", destination="B", backend="qemu",
                                completed=True, failed_phase="plug",
                                hint="once host B's server takes it: harness plug vm2")

    def migrate(sd: StateDir, vm: str | None, source: str, dest: str,
                **kw: object) -> migrate_mod.Report:
        raise IncompleteMigrationError(
            "vm2 moved to B but runs there without shared memory (over its lower NIC): "
            f"plug failed: server sent version -1\n{report.hint}", report)

    monkeypatch.setattr(migrate_mod, "migrate", migrate)
    argv = ["--state-dir", str(state_dir.path), "migrate", "vm2", "--to", "B", "--json"]
    assert cli.main(argv) == cli.EXIT_INCOMPLETE == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out) == report.as_dict()  # the report, even on failure
    lines = captured.err.strip().splitlines()
    assert lines[-2].startswith("harness: error: vm2 moved to B but runs there without")
    assert lines[-1] == "  once host B's server takes it: harness plug vm2"


def test_soak_json_goes_to_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state_dir: StateDir,
    tmp_path: Path,
) -> None:
    def soak(sd: StateDir, vm: str, source: str, dest: str, count: int,
             **kw: object) -> soak_mod.SoakReport:
        return soak_mod.SoakReport(vm=vm, peer="vm1")

    monkeypatch.setattr(soak_mod, "run", soak)
    path = tmp_path / "s.json"
    code = cli.main(["--state-dir", str(state_dir.path), "soak", "vm2", "--from", "A",
                     "--to", "B", "--json", "--json-out", str(path)])
    assert code == 1  # memory not checked: the soak did not pass
    report = json.loads(capsys.readouterr().out)
    assert report["vm"] == "vm2" and report["ok"] is False
    assert json.loads(path.read_text()) == report
