"""The <shmem> device XML on pc and q35, checked field by field and by libvirt's parser."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from ivloop_libvirt import shmem
from ivloop_libvirt.errors import HotplugError, RequestError
from ivloop_libvirt.shmem import PciAddress, ShmemDevice

from .conftest import SOCK_A, shmem_xml
from .lvfakes import FakeHost


def _fields(el: ET.Element) -> dict[str, str | None]:
    model, server, msi, addr = (el.find(t) for t in ("model", "server", "msi", "address"))
    assert model is not None and server is not None and msi is not None
    return {"name": el.get("name"), "role": el.get("role"), "model": model.get("type"),
            "path": server.get("path"), "vectors": msi.get("vectors"),
            "ioeventfd": msi.get("ioeventfd"),
            "addr": None if addr is None else
            f"{addr.get('type')} {addr.get('bus')}:{addr.get('slot')}.{addr.get('function')}"}


def test_pc_device_fields() -> None:
    el = ET.fromstring(shmem.shmem_xml(SOCK_A, address=PciAddress()))
    assert el.tag == "shmem"
    assert _fields(el) == {"name": "ivloop0", "role": "peer", "model": "ivshmem-doorbell",
                           "path": SOCK_A, "vectors": "2", "ioeventfd": "on",
                           "addr": "pci 0x00:0x05.0x0"}
    assert el.find("size") is None  # the server decides the region's size


def test_q35_port_and_device(host_a: FakeHost) -> None:
    base = host_a.domain_xml("q1", machine="q35")
    xml, index = shmem.with_hotplug_port(base)
    assert index == 1
    port = [c for c in ET.fromstring(xml).iter("controller")
            if c.get("model") == "pcie-root-port"]
    assert len(port) == 1 and port[0].get("index") == "1" and port[0].get("type") == "pci"
    target = port[0].find("target")
    assert target is not None and target.get("chassis") == "1"
    assert shmem.spare_root_ports(xml) == [1]
    # the address hot-plug picks is slot 0 of that port's bus
    assert shmem.hotplug_address(xml) == PciAddress(bus=1, slot=0)
    full = shmem.with_shmem(xml, ShmemDevice(SOCK_A, address=PciAddress(bus=index, slot=0)))
    # libvirt's parser takes it, and gives the device back as written
    dom = host_a.real.defineXML(full)
    found = shmem.find_shmem(dom.XMLDesc(0))
    assert found is not None
    assert found.device == ShmemDevice(SOCK_A, address=PciAddress(bus=1, slot=0))
    assert _fields(ET.fromstring(found.xml))["addr"] == "pci 0x01:0x00.0x0"
    # the port now holds the device: no longer spare, and adding a port adds a new one
    assert shmem.spare_root_ports(full) == []
    again, index2 = shmem.with_hotplug_port(full)
    assert index2 == 2 and shmem.spare_root_ports(again) == [2]
    # an existing spare port is reused, not duplicated
    assert shmem.with_hotplug_port(xml) == (xml, 1)


def test_pc_domain_accepted_by_libvirt_and_tampering_refused(host_a: FakeHost) -> None:
    xml = host_a.domain_xml("p1", devices=shmem.shmem_xml(SOCK_A, address=PciAddress()))
    dom = host_a.real.defineXML(xml)
    found = shmem.find_shmem(dom.XMLDesc(0))
    assert found is not None and found.device.address == PciAddress(slot=5)
    with pytest.raises(Exception, match="model"):
        host_a.real.defineXML(host_a.domain_xml(
            "p2", devices=shmem.shmem_xml(SOCK_A).replace("ivshmem-doorbell", "doorbell")))


def test_find_by_name_alias_and_attach_xml() -> None:
    dev = shmem_xml(SOCK_A).replace("</shmem>", "<alias name='shmem3'/></shmem>")
    other = "<shmem name='scratch'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>"
    xml = f"<domain><name>d</name><devices>{other}{dev}</devices></domain>"
    found = shmem.find_shmem(xml)
    assert found is not None and found.alias == "shmem3"
    assert shmem.find_shmem(xml, "ivloop1") is None
    back = ET.fromstring(found.attach_xml())
    assert back.find("alias") is None
    assert _fields(back)["path"] == SOCK_A and _fields(back)["addr"] == "pci 0x00:0x05.0x0"
    moved = ET.fromstring(found.attach_xml("/other/host.sock"))
    assert _fields(moved)["path"] == "/other/host.sock"
    assert [f.device.name for f in shmem.shmem_devices(xml)] == ["ivloop0"]


def test_plain_shmem_of_that_name_is_refused() -> None:
    xml = ("<domain><name>d</name><devices><shmem name='ivloop0'><model type='ivshmem-plain'/>"
           "</shmem></devices></domain>")
    with pytest.raises(RequestError, match="not a peer-mode ivshmem-doorbell"):
        shmem.find_shmem(xml)


@pytest.mark.parametrize(("machine", "kind"), [
    ("pc", "pc"), ("pc-i440fx-7.2", "pc"), ("q35", "q35"), ("pc-q35-7.2", "q35")])
def test_machine_kind(machine: str, kind: str) -> None:
    xml = f"<domain><os><type arch='x86_64' machine='{machine}'>hvm</type></os></domain>"
    assert shmem.machine_kind(xml) == kind


def test_hotplug_address_pc(host_a: FakeHost) -> None:
    assert shmem.hotplug_address(host_a.domain_xml("x")) == PciAddress(bus=0, slot=5)
    taken = host_a.domain_xml("x", devices="<interface type='user'><address type='pci' "
                              "domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>"
                              "</interface>")
    assert shmem.hotplug_address(taken) is None  # libvirt picks another slot


def test_hostdev_source_address_is_not_a_guest_slot(host_a: FakeHost) -> None:
    hostdev = ("<hostdev mode='subsystem' type='pci'><source><address domain='0x0000' "
               "bus='0x00' slot='0x05' function='0x0'/></source></hostdev>")
    xml = host_a.domain_xml("x", devices=hostdev)
    assert shmem.hotplug_address(xml) == PciAddress(slot=5)


def test_q35_without_spare_port_says_what_to_add(host_a: FakeHost) -> None:
    with pytest.raises(HotplugError, match=r"pcie-root-port.*restart"):
        shmem.hotplug_address(host_a.domain_xml("q", machine="q35"))


def test_pc_without_acpi_cannot_hotplug(host_a: FakeHost) -> None:
    with pytest.raises(HotplugError, match=r"<features><acpi/></features>"):
        shmem.check_hotplug(host_a.domain_xml("x", acpi=False))
    shmem.check_hotplug(host_a.domain_xml("x"))
    shmem.check_hotplug(host_a.domain_xml("q", machine="q35", acpi=False))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"socket": "relative.sock"}, "absolute path"),
    ({"socket": SOCK_A, "name": "a'b"}, "bad shmem device name"),
    ({"socket": SOCK_A, "vectors": 1}, "2 MSI-X vectors"),
])
def test_bad_device_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(RequestError, match=match):
        ShmemDevice(**kwargs)  # type: ignore[arg-type]


def test_root_port_xml() -> None:
    el = ET.fromstring(shmem.root_port_xml(10))
    assert el.attrib == {"type": "pci", "index": "10", "model": "pcie-root-port"}
    target = el.find("target")
    assert target is not None and target.attrib == {"chassis": "10", "port": "0x1a"}
