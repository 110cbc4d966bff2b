"""Shared helpers for the harness unit tests: recorded topologies, CLI runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import cli
from harness.lab import topology
from harness.lab.state import HostState, ProcRecord, State, StateDir, VMState, VMStatus

#: A PID that no process has (above the kernel's pid_max limit).
DEAD = ProcRecord(pid=2**22 + 1, start_time=1)


def record_default_topology(path: Path, proc: ProcRecord = DEAD) -> StateDir:
    """A state directory recording the default topology as running under *proc*."""
    sd = StateDir(path)
    topo = topology.load()
    state = State(instance=sd.instance, topology=topo.raw, topology_source=topo.source,
                  accel="tcg")
    for host in topo.hosts:
        state.hosts[host] = HostState(name=host, netns=sd.netns_name(host))
    for vm in topo.vms.values():
        state.vms[vm.name] = VMState(name=vm.name, host=vm.host, status=VMStatus.RUNNING,
                                     proc=proc, qmp=str(path / f"qmp-{vm.name}.sock"))
    with sd:
        sd.save(state)
    return sd


def run(capsys: pytest.CaptureFixture[str], sd: StateDir, *argv: str) -> tuple[int, str]:
    """Run the CLI on *sd*; return its exit status and stderr."""
    code = cli.main(["--state-dir", str(sd.path), *argv])
    return code, capsys.readouterr().err


def snapshot(sd: StateDir) -> dict[str, bytes]:
    """Every file of *sd*, to show that a refused request changed nothing."""
    return {p.name: p.read_bytes() for p in sd.path.iterdir() if p.is_file()}
