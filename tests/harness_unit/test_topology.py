"""Topology files: parsing, derived fields, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import TopologyError
from harness.lab import topology


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
    topo = topology.load(Path(topology.__file__).parents[1] / "topologies" / "debian.toml")
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


# ---------------------------------------------------------------------------
# [network] mtu (issue 26: jumbo frames)


def test_no_mtu_leaves_every_link_at_the_kernels_default() -> None:
    topo = topology.load()
    assert topo.mtu is None
    assert all(vm.mtu is None for vm in topo.vms.values())


def test_the_network_mtu_reaches_every_vm(tmp_path: Path) -> None:
    topo = topology.load(write(tmp_path, '''
[network]
mtu = 9000
[hosts.A]
[hosts.B]
[vms.v1]
host = "A"
[vms.v2]
host = "B"
'''))
    assert topo.mtu == 9000
    assert [vm.mtu for vm in topo.vms.values()] == [9000, 9000]


def test_shipped_jumbo_topology_is_the_default_one_at_9000() -> None:
    topo = topology.load(Path(topology.__file__).parents[1] / "topologies" / "jumbo.toml")
    default = topology.load()
    assert topo.mtu == 9000
    assert {h: (s.region_size, s.max_peers) for h, s in topo.hosts.items()} == {
        "A": ("128M", 8), "B": ("128M", 8)}
    assert [(vm.name, vm.host, vm.mobile, vm.mtu) for vm in topo.vms.values()] == [
        ("vm1", "A", False, 9000), ("vm2", "A", True, 9000), ("vm3", "B", False, 9000)]
    # the same guests as the default topology, only the MTU differs
    assert [(vm.mac, vm.ip, vm.ip6) for vm in topo.vms.values()] == [
        (vm.mac, vm.ip, vm.ip6) for vm in default.vms.values()]


@pytest.mark.parametrize("mtu", ["1280", "1500", "9000", "65535"])
def test_mtu_bounds_are_accepted(tmp_path: Path, mtu: str) -> None:
    topo = topology.load(write(tmp_path, f"[network]\nmtu = {mtu}\n[hosts.A]\n"))
    assert topo.mtu == int(mtu)


@pytest.mark.parametrize("mtu", ["1279", "68", "0", "-1", "65536", "9000.0", '"9000"', "true"])
def test_bad_mtu_is_refused_with_the_bounds(tmp_path: Path, mtu: str) -> None:
    with pytest.raises(TopologyError,
                       match=r"\[network\]: mtu must be an integer in 1280\.\.65535 .*IPv6"):
        topology.load(write(tmp_path, f"[network]\nmtu = {mtu}\n[hosts.A]\n"))


def test_unknown_network_key_names_mtu_among_the_allowed(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match=r"unknown key\(s\) mtus \(allowed: mtu, subnet, "
                                            r"subnet6\)"):
        topology.load(write(tmp_path, "[network]\nmtus = 9000\n[hosts.A]\n"))


def test_debian_guests_refuse_a_jumbo_mtu_but_take_1500(tmp_path: Path) -> None:
    vm = '[hosts.A]\n[vms.d1]\nhost = "A"\nimage = "debian"\n'
    with pytest.raises(TopologyError,
                       match=r"\[vms\.d1\]: a debian guest keeps its NIC at 1500 bytes .*"
                             r"mtu = 9000 needs image = \"initramfs\""):
        topology.load(write(tmp_path, "[network]\nmtu = 9000\n" + vm))
    assert topology.load(write(tmp_path, "[network]\nmtu = 1500\n" + vm)).vm("d1").mtu == 1500
