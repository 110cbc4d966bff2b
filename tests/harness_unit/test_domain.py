"""libvirt domain XML from the harness's QEMU command line (harness/domain.py)."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from harness.backends import domain
from harness.lab import qemu, topology
from harness.lab.accel import Choice
from ivloop_libvirt.shmem import PciAddress, ShmemDevice


def spec(tmp_path: Path, accel: str = "tcg", **kw: object) -> qemu.LaunchSpec:
    vm = topology.load().vm("vm2")
    choice = Choice(accel, "test")
    args: dict[str, object] = {
        "vm": vm, "kernel": tmp_path / "vmlinuz", "initrd": tmp_path / "initrd.img",
        "accel_args": choice.qemu_args, "memory": choice.memory_arg(vm.memory),
        "console": tmp_path / "c.log", "qmp": tmp_path / "q.sock", "pidfile": tmp_path / "q.pid",
        "tap": "tap-vm2", "ssh_port": 2202, "ssh_key": "ssh-ed25519 AAAAkey",
        "binary": "/usr/bin/qemu-system-x86_64",
    }
    args.update(kw)
    return qemu.LaunchSpec(**args)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


@pytest.fixture
def test_conn() -> Iterator[Any]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def test_domain_matches_the_vm_and_the_template(tmp_path: Path) -> None:
    s = spec(tmp_path, ivshmem_socket=tmp_path / "s.sock")
    argv = qemu.render(s)
    p = domain.parse(domain.render(s, uuid_=domain.domain_uuid("abc", "vm2")))
    vm = s.vm
    assert (p.name, p.type, p.machine, p.vcpus) == (vm.name, "qemu", "pc", vm.cpus)
    assert (p.kernel, p.initrd) == (str(s.kernel), str(s.initrd))
    assert p.cmdline == opt(argv, "-append")[0]  # word for word the template's
    assert p.data_mac == vm.mac and p.tap == "tap-vm2"
    assert p.console == str(s.console)
    # the template's PCI layout: 00:02 data, 00:03 management, 00:04 rng, 00:05 ivshmem
    assert p.slots == {"interface": 2, "rng": 4, "shmem": 5}
    assert p.shmem_socket == str(tmp_path / "s.sock")
    mgmt_netdev, mgmt_device = opt(argv, "-netdev")[1], opt(argv, "-device")[1]
    assert "hostfwd=tcp:127.0.0.1:2202-:22" in mgmt_netdev
    assert mgmt_device == f"virtio-net-pci,netdev=mgmt,mac={vm.mgmt_mac},bus=pci.0,addr=0x3"
    assert p.qemu_args[:4] == ["-netdev", mgmt_netdev, "-device", mgmt_device]


def test_only_the_management_nic_and_the_ram_size_pass_through(tmp_path: Path) -> None:
    """Pinned: a template change that adds an argument shows up here first."""
    t = domain.from_argv(qemu.render(spec(tmp_path, ivshmem_socket=tmp_path / "s.sock")))
    assert [a.split()[0] for a in t.passthrough] == ["-netdev", "-device", "-object",
                                                     "-machine", "-m"]
    assert sorted(t.dropped) == ["-display", "-no-user-config", "-nodefaults", "-pidfile",
                                 "-qmp"]


def test_padded_tcg_ram_is_given_to_qemu_exactly(tmp_path: Path) -> None:
    """libvirt rounds <memory> to a MiB; the QEMU 7.2 padding must survive."""
    s = spec(tmp_path)
    kib = domain.memory_kib(s.memory)
    assert kib == 256 * 1024 + 8
    p = domain.parse(domain.render(s))
    assert p.memory_kib == kib
    args = p.qemu_args
    assert args[args.index("-object") + 1] == f"memory-backend-ram,id=ivl.ram,size={kib * 1024}"
    assert args[args.index("-machine") + 1] == "memory-backend=ivl.ram"
    assert args[args.index("-m") + 1] == f"{kib}K"


def test_kvm_gets_host_cpu_and_plain_ram(tmp_path: Path) -> None:
    root = ET.fromstring(domain.render(spec(tmp_path, accel="kvm")))
    assert root.get("type") == "kvm"
    cpu = root.find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-passthrough"
    assert domain.parse(ET.tostring(root, encoding="unicode")).memory_kib == 256 * 1024
    assert "-m" not in domain.parse(ET.tostring(root, encoding="unicode")).qemu_args


@pytest.mark.parametrize(("accel", "vhost", "driver"), [
    ("kvm", True, "vhost"), ("kvm", False, "qemu"), ("tcg", False, "qemu")])
def test_the_data_nic_names_its_backend(tmp_path: Path, accel: str, vhost: bool,
                                        driver: str) -> None:
    """Said either way: on KVM libvirt would take vhost-net by itself whenever it can."""
    xml = domain.render(spec(tmp_path, accel=accel, vhost_net=vhost))
    assert domain.parse(xml).data_driver == driver
    assert not [a for a in domain.parse(xml).qemu_args if "vhost" in a]


def test_tcg_cpu_is_max_without_erms(tmp_path: Path) -> None:
    cpu = ET.fromstring(domain.render(spec(tmp_path))).find("cpu")
    assert cpu is not None and cpu.get("mode") == "maximum"
    assert [(f.get("name"), f.get("policy")) for f in cpu.findall("feature")] == \
        [("erms", "disable")]


def test_no_ivshmem_leaves_slot_5_free(tmp_path: Path) -> None:
    p = domain.parse(domain.render(spec(tmp_path)))
    assert "shmem" not in p.slots and p.shmem_socket is None


def test_shmem_element_is_ivloop_libvirts(tmp_path: Path) -> None:
    root = ET.fromstring(domain.render(spec(tmp_path, ivshmem_socket=tmp_path / "s.sock")))
    el = root.find("./devices/shmem")
    assert el is not None
    want = ShmemDevice(str(tmp_path / "s.sock"), address=PciAddress(bus=0, slot=5)).to_xml()
    got = ET.tostring(el, encoding="unicode")
    assert ET.canonicalize(got, strip_text=True) == ET.canonicalize(want, strip_text=True)


def test_vcpus_and_extra_kernel_args(tmp_path: Path) -> None:
    vm = dataclasses.replace(topology.load().vm("vm2"), cpus=2, kernel_args="profile=2")
    p = domain.parse(domain.render(spec(tmp_path, vm=vm)))
    assert p.vcpus == 2 and p.cmdline.endswith(" profile=2")


def test_the_mtu_reaches_the_guest_and_leaves_the_tap_to_the_harness(tmp_path: Path) -> None:
    """libvirt opens a managed='no' tap as it is, so the harness's MTU on the
    tap holds; the guest learns it from its command line, as without libvirt."""
    vm = dataclasses.replace(topology.load().vm("vm2"), mtu=9000)
    xml = domain.render(spec(tmp_path, vm=vm))
    assert "ivl.mtu=9000" in domain.parse(xml).cmdline.split()
    iface = ET.fromstring(xml).find("./devices/interface")
    assert iface is not None and iface.find("mtu") is None
    target = iface.find("target")
    assert target is not None and target.get("managed") == "no"


def test_unknown_arguments_pass_through_in_order(tmp_path: Path) -> None:
    argv = [*qemu.render(spec(tmp_path)), "-drive", "file=/d.img,if=none,id=disk0",
            "-device", "virtio-blk-pci,drive=disk0,bus=pci.0,addr=0x6"]
    t = domain.from_argv(argv)
    args = domain.parse(t.xml).qemu_args
    i = args.index("-drive")
    assert args[i:i + 4] == ["-drive", "file=/d.img,if=none,id=disk0",
                             "-device", "virtio-blk-pci,drive=disk0,bus=pci.0,addr=0x6"]


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("-serial", "stdio", "only file: serials"),
    ("-accel", "tcg,tb-size=512", "are not translated"),
    ("-machine", "pc,usb=on", "are not translated"),
    ("-m", "lots", "cannot read the memory size"),
])  # fmt: skip
def test_untranslatable_arguments_are_refused(tmp_path: Path, flag: str, value: str,
                                              words: str) -> None:
    argv = qemu.render(spec(tmp_path))
    argv[argv.index(flag) + 1] = value
    with pytest.raises(domain.DomainXMLError, match=words):
        domain.from_argv(argv)


def test_ivshmem_without_its_chardev_is_refused(tmp_path: Path) -> None:
    argv = qemu.render(spec(tmp_path, ivshmem_socket=tmp_path / "s.sock"))
    i = argv.index("-chardev")
    del argv[i:i + 2]
    with pytest.raises(domain.DomainXMLError, match="no socket chardev"):
        domain.from_argv(argv)


@pytest.mark.parametrize(("text", "kib"), [("256", 262144), ("256M", 262144),
                                           ("262152K", 262152), ("1G", 1048576)])
def test_memory_sizes(text: str, kib: int) -> None:
    assert domain.memory_kib(text) == kib


def test_uuid_is_stable_per_instance_and_vm() -> None:
    assert domain.domain_uuid("a", "vm1") == domain.domain_uuid("a", "vm1")
    assert len({domain.domain_uuid("a", "vm1"), domain.domain_uuid("a", "vm2"),
                domain.domain_uuid("b", "vm1")}) == 3


def test_libvirt_validates_and_keeps_the_layout(tmp_path: Path, test_conn: Any) -> None:
    """libvirt's own schema check (VIR_DOMAIN_DEFINE_VALIDATE) and parser."""
    xml = domain.render(spec(tmp_path, ivshmem_socket=tmp_path / "s.sock"),
                        uuid_=domain.domain_uuid("t", "vm2"))
    dom = test_conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        back = domain.parse(dom.XMLDesc(0))
        assert back.slots == {"interface": 2, "rng": 4, "shmem": 5}
        assert back.tap == "tap-vm2" and back.memory_kib == 256 * 1024 + 8
        # nothing libvirt added took a PCI slot (no balloon, no USB controller)
        used = [a.get("slot", "") for a in ET.fromstring(dom.XMLDesc(0)).iter("address")
                if a.get("type") == "pci"]
        assert sorted(used) == ["0x02", "0x04", "0x05"]
    finally:
        dom.undefine()


def test_libvirt_schema_rejects_a_broken_domain(tmp_path: Path, test_conn: Any) -> None:
    """The check above can fail: a bad element is refused."""
    xml = domain.render(spec(tmp_path)).replace("<clock", "<bogus /><clock")
    with pytest.raises(libvirt.libvirtError, match="validate"):
        test_conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
