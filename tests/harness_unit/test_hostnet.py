"""Simulated hosts' links and the topology's MTU (harness/hostnet.py).

A bridge forwards no frame larger than the port it leaves by, so every link
must carry the MTU or jumbo frames vanish without a word.  The links are
real namespaces, bridges, taps and veths (root only, well under a second),
named from this process's PID so parallel workers never meet; that each
VM start asks for its tap with the MTU is checked with a stand-in tap maker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS

from harness.backends import direct
from harness.lab import hostnet, qemu, topology
from harness.lab.state import HostState, State, StateDir

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    names = (f"ivlt{os.getpid()}-a", f"ivlt{os.getpid()}-b")
    yield names
    for name in names:
        hostnet.remove_host(name)


def links(ns_name: str) -> dict[str, tuple[int, str | None]]:
    """Each link of *ns_name*: (MTU, name of its master or None)."""
    with NetNS(ns_name) as ns:
        got = ns.get_links()
        names = {link["index"]: link.get("ifname") for link in got}
        return {link.get("ifname"): (link.get("mtu"), names.get(link.get("master")))
                for link in got}


def build(a: str, b: str, mtu: int | None) -> None:
    """What `harness up` makes: two hosts, the wire between them, a tap on A."""
    hostnet.create_host(a, mtu=mtu)
    hostnet.create_host(b, mtu=mtu)
    hostnet.add_wire(a, "wire-b", b, "wire-a", mtu=mtu)
    hostnet.add_tap(a, "tap-vm1", mtu=mtu)


@needs_root
def test_every_link_carries_the_topologys_mtu(two_hosts: tuple[str, str]) -> None:
    a, b = two_hosts
    build(a, b, 9000)
    assert {k: v for k, v in links(a).items() if k != "lo"} == {
        "br0": (9000, None), "wire-b": (9000, "br0"), "tap-vm1": (9000, "br0")}
    assert {k: v for k, v in links(b).items() if k != "lo"} == {
        "br0": (9000, None), "wire-a": (9000, "br0")}


@needs_root
def test_without_an_mtu_every_link_keeps_the_kernels_default(
        two_hosts: tuple[str, str]) -> None:
    a, b = two_hosts
    build(a, b, None)
    assert {k: v for k, v in links(a).items() if k != "lo"} == {
        "br0": (1500, None), "wire-b": (1500, "br0"), "tap-vm1": (1500, "br0")}
    assert links(b)["wire-a"] == (1500, "br0")


@needs_root
def test_a_tap_made_again_gets_the_mtu_again(two_hosts: tuple[str, str]) -> None:
    """What a restart or a migration destination does: remove the tap, add it again."""
    a, _ = two_hosts
    hostnet.create_host(a, mtu=9000)
    hostnet.add_tap(a, "tap-vm2", mtu=9000)
    hostnet.remove_link(a, "tap-vm2")
    hostnet.add_tap(a, "tap-vm2", mtu=9000)
    assert links(a)["tap-vm2"] == (9000, "br0")


# ---------------------------------------------------------------------------
# the harness gives every tap it makes the topology's MTU


class _Stop(Exception):
    """Raised by the stand-in tap maker: nothing after the tap is of interest here."""


@pytest.mark.parametrize(("toml", "mtu"), [("jumbo.toml", 9000), ("default.toml", None)])
def test_a_vms_tap_gets_the_topologys_mtu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          toml: str, mtu: int | None) -> None:
    """Every VM start goes through direct.start_qemu: `up`, `restart` and a
    migration destination (which makes its tap on the destination host)."""
    topo = topology.load(Path(topology.__file__).parents[1] / "topologies" / toml)
    sd = StateDir(tmp_path / "state")
    state = State(instance=sd.instance, topology=topo.raw, topology_source=topo.source,
                  accel="tcg")
    for host in topo.hosts:
        state.hosts[host] = HostState(name=host, netns=sd.netns_name(host))
    for name in ("vmlinuz", "initrd.img"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("IVLOOP_IMAGE_DIR", str(tmp_path))
    made: list[tuple[str, str, int | None]] = []

    def add_tap(ns_name: str, tap: str, mtu: int | None = None) -> None:
        made.append((ns_name, tap, mtu))
        raise _Stop

    monkeypatch.setattr(hostnet, "add_tap", add_tap)
    binary = qemu.Binary(path="/usr/bin/qemu-system-x86_64", version=qemu.Version(7, 2),
                         banner="QEMU emulator version 7.2.0")
    sd.path.mkdir()
    with sd:
        for host in ("A", "B"):  # B: vm2 arriving there as a migration destination
            with pytest.raises(_Stop):
                direct.start_qemu(sd, state, topo.vm("vm2"), host=host, incoming=host == "B",
                                 binary=binary)
    assert made == [(sd.netns_name("A"), "tap-vm2", mtu), (sd.netns_name("B"), "tap-vm2", mtu)]
