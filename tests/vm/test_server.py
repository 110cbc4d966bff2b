"""ivloop-server with real QEMU: guests read their IVPosition and the directory.

The guests run without ivloop.ko here, so the BARs are free for `ivl-dir`
(devmem) to read: this checks the server and QEMU alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness import cluster, topology
from harness.state import StateDir

from .conftest import boot
from .lab import Lab


@dataclass
class DirView:
    ivposition: int
    generation: int
    present: dict[int, bool]


def read_dir(lab: Lab, vm: str) -> DirView:
    out = lab.guest(vm).run("ivl-dir")
    pos = int(re.search(r"^ivposition (\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
    gen = int(re.search(r"^generation (\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
    present = {int(i): p == "1" for i, p in re.findall(r"^slot (\d+) present (\d+)", out, re.M)}
    return DirView(pos, gen, present)


def test_directory_tracks_join_unplug_and_replug(
    make_topology: tuple[StateDir, list[Lab]],
) -> None:
    sd, labs = make_topology
    topo = topology.parse({"hosts": {"A": {"max_peers": 4}},
                           "vms": {"vm1": {"host": "A"}, "vm2": {"host": "A"}}}, "two VMs")
    lab = boot(sd, topo, driver=False)
    labs.append(lab)

    one, two = read_dir(lab, "vm1"), read_dir(lab, "vm2")
    assert {one.ivposition, two.ivposition} == {0, 1}
    assert len(one.present) == 4
    for view in (one, two):
        assert view.present[one.ivposition] and view.present[two.ivposition]
        assert sum(view.present.values()) == 2

    with sd:
        cluster.set_ivshmem(sd, "vm2", attached=False)
    assert "1af4:1110" not in lab.guest("vm2").run("lspci -n")
    after = read_dir(lab, "vm1")
    assert not after.present[two.ivposition], "unplugged VM still present"
    assert after.present[one.ivposition]
    assert after.generation > one.generation

    with sd:
        cluster.set_ivshmem(sd, "vm2", attached=True)
    back = read_dir(lab, "vm2")
    seen = read_dir(lab, "vm1")
    assert seen.present[back.ivposition] and back.present[one.ivposition]
    assert seen.generation > after.generation
