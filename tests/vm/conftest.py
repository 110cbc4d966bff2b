"""Fixtures that own real QEMU guests.  Every test here is marked `vm`.

VM tests run one topology at a time (the Makefile holds a lock): two TCG
guests fill both cores of the build machine.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import cluster
from harness.lab import hostnet, topology
from harness.lab.state import StateDir

from .lab import Lab


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vm)


def leftovers(sd: StateDir, pids: list[int]) -> list[str]:
    """Anything of *sd*'s still alive or present after `harness down`."""
    found = [f"pid {pid}" for pid in pids if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
    found += [f"netns {p.name}" for p in hostnet.NETNS_DIR.glob(f"ivl-{sd.instance}-*")]
    found += [f"socket {p.name}" for p in sd.path.glob("*.sock")]
    return found


def recorded_pids(sd: StateDir) -> list[int]:
    if not sd.exists():
        return []
    state = sd.load()
    procs = [vm.proc for vm in state.vms.values()] + \
        [p for h in state.hosts.values() for p in (h.server, h.supervisor)]  # fmt: skip
    return [p.pid for p in procs if p is not None]


def boot(sd: StateDir, topo: topology.Topology, **kw: bool) -> Lab:
    with sd:
        cluster.up(sd, topo, **kw)
    return Lab(sd, topo)


def teardown(lab: Lab) -> None:
    lab.close()
    pids = recorded_pids(lab.sd)
    with lab.sd:
        cluster.down(lab.sd)
    left = leftovers(lab.sd, pids)
    assert not left, f"harness down left {left}"


@contextlib.contextmanager
def booted(factory: pytest.TempPathFactory, name: str, topo: topology.Topology,
           report: dict[str, Any]) -> Iterator[Lab]:
    """*topo* up for a module's tests; boot and module wall times go into *report*,
    which is printed as "NAME numbers: {...}" at the end."""
    t0 = time.monotonic()
    sd = StateDir(factory.mktemp(name) / "state")
    running = boot(sd, topo)
    report["boot_s"] = round(time.monotonic() - t0, 1)
    try:
        yield running
    finally:
        teardown(running)
        report["module_wall_s"] = round(time.monotonic() - t0, 1)
        print(f"\n{name} numbers: {json.dumps(report)}")


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The default topology (vm1, vm2 on host A; vm3 on host B) with ivloop."""
    sd = StateDir(tmp_path_factory.mktemp("lab") / "state")
    running = boot(sd, topology.load())
    try:
        yield running
    finally:
        teardown(running)


@pytest.fixture
def make_topology(tmp_path: Path) -> Iterator[tuple[StateDir, list[Lab]]]:
    """A private state directory for tests that boot their own topology."""
    sd = StateDir(tmp_path / "state")
    labs: list[Lab] = []
    try:
        yield sd, labs
    finally:
        for running in labs:
            teardown(running)
        with sd:
            cluster.down(sd)
