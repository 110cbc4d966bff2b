"""Topology files: parsing, derived fields, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import topology
from harness.errors import TopologyError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topo.toml"
    path.write_text(text)
    return path


def test_default_topology_has_two_hosts_and_three_vms() -> None:
    topo = topology.load()
    assert sorted(topo.hosts) == ["A", "B"]
    assert [vm.host for vm in topo.vms.values()] == ["A", "A", "B"]
    assert topo.vm("vm2").mobile and not topo.vm("vm1").mobile


def test_derived_addresses_are_unique_and_private() -> None:
    topo = topology.load()
    macs = {vm.mac for vm in topo.vms.values()}
    ips = {vm.ip for vm in topo.vms.values()}
    assert len(macs) == len(ips) == 3
    assert topo.vm("vm1").ip == "10.77.0.1"
    assert topo.vm("vm3").mac == "52:54:00:77:00:03"
    assert topo.vm("vm1").mgmt_mac == "52:54:00:ff:00:01"
    assert topo.vm("vm2").ip6 == "fd77::2"


def test_explicit_fields_are_kept(tmp_path: Path) -> None:
    topo = topology.load(write(tmp_path, """
[hosts.X]
max_peers = 4
[vms.a]
host = "X"
mac = "02:00:00:00:00:0A"
ip = "10.77.0.40"
memory = 512
"""))
    vm = topo.vm("a")
    assert (vm.mac, vm.ip, vm.memory) == ("02:00:00:00:00:0a", "10.77.0.40", 512)
    assert topo.host("X").max_peers == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[hosts.A]\n[vms.v1]\nhost = "A"\n[vms.v1]\nhost = "A"\n', "not valid TOML"),
        ('[hosts.A]\n[vms.v1]\nhost = "A"\nmac = "52:54:00:zz:00:01"\n', "invalid MAC"),
        ('[hosts.A]\n[vms.v1]\nhost = "A"\nmac = "01:00:00:00:00:01"\n', "multicast"),
        ('[hosts.A]\n[vms.v1]\nhost = "A"\nmac = "02:00:00:00:00:01"\n'
         '[vms.v2]\nhost = "A"\nmac = "02:00:00:00:00:01"\n', "already used by v1"),
        ('[hosts.A]\n[vms.v1]\nhost = "C"\n', "host 'C' is not defined"),
        ('[hosts.A]\n[vms.A]\nhost = "A"\n', "already used by a host"),
        ('[hosts.A]\n[vms.v1]\nhost = "A"\nip = "8.8.8.8"\n', "not a host address"),
        ('[network]\nsubnet = "8.8.8.0/24"\n[hosts.A]\n', "private"),
        ('[hosts.A]\n[vms.v1]\nhost = "A"\ncolour = "red"\n', "unknown key"),
        ('[hosts.A]\nmax_peers = 1\n', "max_peers"),
        ('[hosts.A]\n[vms.v1]\nhost = "A"\nkernel_args = "ivl.ip=10.0.0.1"\n', "kernel_args"),
        ('[hosts.A]\n[vms.v1]\nhost = "A"\nkernel_args = "a \\"b\\""\n', "kernel_args"),
        ('[hosts.A]\n[vms.v1]\nhost = "A"\nkernel_args = 3\n', "kernel_args"),
        ('[hosts."bad name"]\n', "letters or digits"),
        ("", "at least one"),
        ('[hosts.A]\nmax_peers = 2\n[vms.v1]\nhost="A"\n[vms.v2]\nhost="A"\n[vms.v3]\nhost="A"\n',
         "max_peers = 2"),
    ],
)
def test_bad_topology_is_refused_with_a_clear_message(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(TopologyError, match=message):
        topology.load(write(tmp_path, text))


def test_kernel_args_are_normalised_words(tmp_path: Path) -> None:
    topo = topology.load(write(tmp_path, '''
[hosts.A]
[vms.v1]
host = "A"
kernel_args = "  profile=2   nokaslr "
'''))
    assert topo.vm("v1").kernel_args == "profile=2 nokaslr"


def test_overlong_kernel_args_are_refused_quickly(tmp_path: Path) -> None:
    # a backtracking pattern would take minutes on this
    words = "a b " * 60 + '\\"'
    with pytest.raises(TopologyError, match="kernel_args"):
        topology.load(write(
            tmp_path, f'[hosts.A]\n[vms.v1]\nhost = "A"\nkernel_args = "{words}"\n'))


def test_missing_file_is_a_topology_error(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        topology.load(tmp_path / "absent.toml")


def test_unknown_vm_and_host_lookups_name_the_alternatives() -> None:
    topo = topology.load()
    with pytest.raises(TopologyError, match=r"unknown VM 'vm9' \(VMs: vm1, vm2, vm3\)"):
        topo.vm("vm9")
    with pytest.raises(TopologyError, match=r"unknown host 'Z' \(hosts: A, B\)"):
        topo.host("Z")


def test_image_defaults_to_the_initramfs_and_debian_is_per_vm(tmp_path: Path) -> None:
    topo = topology.load(write(tmp_path, '''
[hosts.A]
[vms.v1]
host = "A"
[vms.v2]
host = "A"
image = "debian"
'''))
    assert topo.vm("v1").image == "initramfs"
    assert topo.vm("v2").image == "debian"
    assert all(vm.image == "initramfs" for vm in topology.load().vms.values())


def test_shipped_debian_topology_boots_two_debian_guests_on_one_host() -> None:
    topo = topology.load(Path(topology.__file__).parent / "topologies" / "debian.toml")
    assert [(vm.host, vm.image) for vm in topo.vms.values()] == [("A", "debian")] * 2
    assert topo.vms_on("B") == [] and topo.vm("deb2").mobile


@pytest.mark.parametrize(
    ("value", "message"),
    [('"ubuntu"', "image must be one of 'initramfs', 'debian', not 'ubuntu'"),
     ("1", "image must be one of"),
     ('"debian"\ndriver = false', "driver = false needs image")],
)
def test_bad_image_is_refused_with_the_choices(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        topology.load(write(tmp_path, f'[hosts.A]\n[vms.v1]\nhost = "A"\nimage = {value}\n'))
