"""Bad input not covered elsewhere: per-VM driver option, sizes, new commands."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness import cli
from harness.errors import TopologyError
from harness.experiments import soak as soak_mod
from harness.lab import qemu, topology, vms
from harness.lab.accel import Choice
from harness.lab.state import State, StateDir

from .support import run, snapshot


def parse(text: str) -> topology.Topology:
    return topology.parse(tomllib.loads(text), "test")


BASE = '[hosts.A]\n[vms.v1]\nhost = "A"\n'


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('driver = "no"\n', "driver must be true or false"),
        ("driver = 0\n", "driver must be true or false"),
        ("cpus = true\n", "cpus must be an integer"),
        ("memory = true\n", "memory must be an integer"),
        ("memory = 256.0\n", "memory must be an integer"),
        ('mobile = "yes"\n', "mobile must be true or false"),
        ('ip6 = "fd99::1"\n', "is not in fd77::/64"),
        ('ip = "10.77.0.0"\n', "not a host address"),
        ('ip = "banana"\n', "bad address"),
        ('mac = "52:54:00:ff:00:01"\n', "reserved for management"),
    ],
)
def test_bad_vm_fields_are_refused(extra: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        parse(BASE + extra)


@pytest.mark.parametrize("size", ["lots", "3M", "0", "-32M", "32X", "1.5G", ""])
def test_bad_region_size_is_refused_before_anything_starts(size: str) -> None:
    with pytest.raises(TopologyError, match="region_size"):
        parse(f'[hosts.A]\nregion_size = "{size}"\n')


@pytest.mark.parametrize("size", ["32M", "64m", "1G", "33554432", "32MiB"])
def test_good_region_sizes_pass(size: str) -> None:
    assert parse(f'[hosts.A]\nregion_size = "{size}"\n').host("A").region_size == size


def test_max_peers_true_is_not_a_number() -> None:
    with pytest.raises(TopologyError, match="max_peers"):
        parse("[hosts.A]\nmax_peers = true\n")


def test_vms_must_be_tables() -> None:
    with pytest.raises(TopologyError, match="must be a table"):
        parse('[hosts.A]\n[vms]\nv1 = "A"\n')
    with pytest.raises(TopologyError, match="must be a table"):
        parse('hosts = "A"\n')


def state_for(topo: topology.Topology, driver: bool) -> State:
    return State(instance="x", topology=topo.raw, topology_source=topo.source, driver=driver)


def test_per_vm_driver_wins_over_the_global_flag() -> None:
    topo = parse('[hosts.A]\n[vms.v1]\nhost = "A"\ndriver = false\n'
                 '[vms.v2]\nhost = "A"\n[vms.v3]\nhost = "A"\ndriver = true\n')
    assert topo.vm("v2").driver is None
    on, off = state_for(topo, True), state_for(topo, False)
    assert [vms.driver_for(on, topo.vm(v)) for v in ("v1", "v2", "v3")] == [
        False, True, True]
    assert [vms.driver_for(off, topo.vm(v)) for v in ("v1", "v2", "v3")] == [
        False, False, True]


def test_driverless_vm_gets_ivl_lower_on_its_command_line(tmp_path: Path) -> None:
    topo = parse(BASE + "driver = false\n")

    def append(lower_only: bool) -> str:
        argv = qemu.render(qemu.LaunchSpec(
            vm=topo.vm("v1"), kernel=tmp_path / "k", initrd=tmp_path / "i",
            accel_args=Choice("tcg", "test").qemu_args, memory="256M", console=tmp_path / "c",
            qmp=tmp_path / "q", pidfile=tmp_path / "p", tap="tap-v1", ssh_port=2201,
            ssh_key="ssh-ed25519 AAAA", lower_only=lower_only))  # fmt: skip
        return argv[argv.index("-append") + 1]

    state = state_for(topo, True)
    assert "ivl.lower=1" in append(not vms.driver_for(state, topo.vm("v1")))
    assert "ivl.lower=1" not in append(False)


# --- the new commands -------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["soak", "--from", "A", "--to", "B", "--count", "0"], "must be positive"),
        (["soak", "--from", "A", "--to", "B", "--count", "2.5"], "whole number"),
        (["soak", "--from", "A", "--to", "B", "--window", "-1"], "must be positive"),
        (["server-restart"], "host"),
        (["restart"], "vm"),
    ],
)
def test_bad_arguments_of_new_commands_are_argparse_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_server_restart_of_unknown_host(capsys: pytest.CaptureFixture[str],
                                        state_dir: StateDir) -> None:
    before = state_dir.file("state.json").read_text()
    code, err = run(capsys, state_dir, "server-restart", "Z")
    assert code == 1 and "unknown host 'Z'" in err and len(err.strip().splitlines()) == 1
    assert state_dir.file("state.json").read_text() == before


def test_restart_of_unknown_vm(capsys: pytest.CaptureFixture[str], state_dir: StateDir) -> None:
    code, err = run(capsys, state_dir, "restart", "vm9")
    assert code == 1 and "unknown VM 'vm9'" in err


def test_soak_of_a_vm_that_is_down(capsys: pytest.CaptureFixture[str],
                                   state_dir: StateDir) -> None:
    code, err = run(capsys, state_dir, "soak", "vm2", "--from", "A", "--to", "B",
                    "--count", "1")
    assert code == 1 and "error" in err


@pytest.fixture
def fake_soak(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """soak_mod.run replaced by a recorder: what the CLI asked it to do."""
    calls: list[tuple[str, str, str]] = []

    def soak(sd: StateDir, vm: str, source: str, dest: str, count: int,
             **kw: object) -> soak_mod.SoakReport:
        calls.append((vm, source, dest))
        return soak_mod.SoakReport(vm=vm, peer="vm1")

    monkeypatch.setattr(soak_mod, "run", soak)
    return calls


@pytest.mark.parametrize("argv", [["vm2", "--to", "B"], ["--to", "B"],
                                  ["vm2", "--from", "A", "--to", "B"],
                                  ["--from", "A", "--to", "B"]])
def test_soak_from_defaults_to_where_the_state_says(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir,
    fake_soak: list[tuple[str, str, str]], argv: list[str],
) -> None:
    run(capsys, state_dir, "soak", *argv)
    assert fake_soak == [("vm2", "A", "B")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["vm2", "--from", "B", "--to", "A"],
         "VM vm2 runs on host A, not B; drop --from or give --from A"),
        (["vm3", "--from", "A", "--to", "B"],
         "VM vm3 runs on host B, not A; drop --from or give --from B"),
        (["vm2", "--from", "Q", "--to", "B"], "unknown host 'Q'"),
        (["--from", "Q", "--to", "B"], "unknown host 'Q'"),
        (["--from", "B", "--to", "A"], "host B has 0 VMs marked mobile"),
        (["vm9", "--to", "B"], "unknown VM 'vm9'"),
    ],
)
def test_soak_from_that_disagrees_with_the_state_is_refused(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir,
    fake_soak: list[tuple[str, str, str]], argv: list[str], message: str,
) -> None:
    before = snapshot(state_dir)
    code, err = run(capsys, state_dir, "soak", *argv)
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert fake_soak == []
    assert snapshot(state_dir) == before


def test_soak_to_its_own_host_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], state_dir: StateDir
) -> None:
    # Before, each of the --count moves failed in turn, one traffic window each.
    before = snapshot(state_dir)
    code, err = run(capsys, state_dir, "soak", "vm2", "--to", "A", "--count", "3")
    assert code == 1
    assert "--from and --to are both A; nothing to migrate" in err, err
    assert snapshot(state_dir) == before


def test_soak_needs_a_traffic_peer(capsys: pytest.CaptureFixture[str],
                                   state_dir: StateDir) -> None:
    code, err = run(capsys, state_dir, "soak", "vm3", "--from", "B", "--to", "A",
                    "--count", "1")
    assert code == 1 and "second VM on host B" in err


# --- server options not covered in tests/server -----------------------------


def server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ivloop_server", *args], capture_output=True,
                          text=True, timeout=30, check=False)


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--max-peers", "abc"], 2, "is not an integer"),
        (["--size", "0"], 2, "ivloop-server: error:"),
        (["--vectors", "65"], 2, "outside 2..64"),
        (["--ring-size", "3K"], 2, "not a power of two"),
        (["--dump", "999999999"], 1, "ivloop-server: error:"),
        (["--dump", "/nonexistent/region"], 1, "ivloop-server: error:"),
    ],
)
def test_more_bad_server_options(tmp_path: Path, args: list[str], status: int,
                                 message: str) -> None:
    sock = tmp_path / "s.sock"
    result = server("--socket", str(sock), *args)
    assert result.returncode == status, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not sock.exists()
