"""ivloop-server with real QEMU: guests read their IVPosition and the directory.

The guests run without ivloop.ko here, so the BARs are free for `ivl-dir`
(devmem) to read: this checks the server and QEMU alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness import cluster
from harness.lab import topology
from harness.lab.state import StateDir

from .conftest import boot
from .lab import Lab


@dataclass
class DirView:
    ivposition: int
    generation: int
    present: dict[int, int]  # present slot -> QEMU peer ID of its occupant

    @property
    def ids(self) -> set[int]:
        return set(self.present.values())


def read_dir(lab: Lab, vm: str) -> DirView:
    out = lab.guest(vm).run("ivl-dir")
    pos = int(re.search(r"^ivposition (\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
    gen = int(re.search(r"^generation (\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
    slots = re.findall(r"^slot (\d+) present (\d+) peer_id (\d+)", out, re.M)
    present = {int(i): int(pid) for i, p, pid in slots if p == "1"}
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
    for view in (one, two):
        assert view.ids == {0, 1}, view
    assert one.generation == two.generation

    with sd:
        cluster.set_ivshmem(sd, "vm2", attached=False)
    assert "1af4:1110" not in lab.guest("vm2").run("lspci -n")
    after = read_dir(lab, "vm1")
    assert after.ids == {one.ivposition}, "unplugged VM still present"
    assert after.generation > one.generation

    # Re-plug into the same QEMU: its departed ID back, with the eventfds
    # vm1's QEMU kept for it (it was told of no leave), the freed directory
    # slot, and both guests agree.
    with sd:
        cluster.set_ivshmem(sd, "vm2", attached=True)
    back = read_dir(lab, "vm2")
    seen = read_dir(lab, "vm1")
    assert back.ivposition == two.ivposition
    assert seen.ids == back.ids == {one.ivposition, back.ivposition}
    assert seen.present == back.present
    assert seen.generation > after.generation
    # vm1's QEMU survived vm2 leaving and coming back.
    assert lab.guest("vm1").run("hostname").strip() == "vm1"
