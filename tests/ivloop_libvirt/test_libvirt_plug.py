"""plug/unplug against libvirt's test driver (hot-plug itself stood in by lvfakes)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt
import pytest

from ivloop_libvirt import lv, plug, shmem
from ivloop_libvirt.errors import (
    ConnectError,
    DeviceError,
    DeviceStateError,
    DomainNotFoundError,
    HotplugError,
)
from ivloop_libvirt.shmem import PciAddress

from .conftest import SOCK_A, shmem_xml
from .lvfakes import FakeHost, lv_error

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG


def test_plug_pc_slot5_live_only(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1"))
    done = plug.plug(dom, SOCK_A)
    assert done.device.address == PciAddress(bus=0, slot=5)
    [(what, xml, flags)] = dom.calls
    assert (what, flags) == ("attach", LIVE)
    assert ET.fromstring(xml).find("server").get("path") == SOCK_A  # type: ignore[union-attr]
    found = shmem.find_shmem(dom.XMLDesc(0))
    assert found is not None and found.device.socket == SOCK_A
    # live only: the definition did not change
    assert shmem.find_shmem(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) is None


def test_plug_config_changes_the_definition(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1"))
    plug.plug(dom, SOCK_A, config=True)
    assert dom.calls[0][2] == LIVE | CONFIG
    # the real test driver now holds it in the persistent definition
    conf = host_a.real.lookupByName("vm1").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert shmem.find_shmem(conf) is not None


def test_plug_config_on_transient_domain_is_live_only(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1"), persistent=False)
    plug.plug(dom, SOCK_A, config=True)
    assert dom.calls[0][2] == LIVE


def test_plug_q35_uses_the_spare_root_port(host_a: FakeHost) -> None:
    xml, index = shmem.with_hotplug_port(host_a.domain_xml("q", machine="q35"))
    dom = host_a.start(xml)
    done = plug.plug(dom, SOCK_A)
    assert done.device.address == PciAddress(bus=index, slot=0)


def test_plug_refuses_a_second_device(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1", devices=shmem_xml()))
    with pytest.raises(DeviceStateError, match=r"already has the ivloop device.*unplug"):
        plug.plug(dom, SOCK_A)
    assert dom.calls == []


def test_plug_refuses_pc_without_acpi_before_trying(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1", acpi=False))
    with pytest.raises(HotplugError, match="acpi"):
        plug.plug(dom, SOCK_A)
    assert dom.calls == []


def test_plug_refuses_stopped_domain(host_a: FakeHost) -> None:
    dom = host_a.wrap(host_a.real.defineXML(host_a.domain_xml("off")))
    with pytest.raises(DeviceStateError, match=r"not running.*virsh start"):
        plug.plug(dom, SOCK_A)


def test_plug_refused_by_the_server(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1"))
    dom.attach_error = lv_error(libvirt.VIR_ERR_INTERNAL_ERROR,
                                "internal error: unable to execute QEMU command 'device_add': "
                                "server sent version -1")
    with pytest.raises(DeviceError, match=r"refused this QEMU.*server-restart"):
        plug.plug(dom, SOCK_A)
    assert shmem.find_shmem(dom.XMLDesc(0)) is None


def test_plug_server_unreachable_names_socket_permissions(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1"))
    dom.attach_error = lv_error(libvirt.VIR_ERR_INTERNAL_ERROR,
                                f"internal error: Failed to connect to '{SOCK_A}': "
                                "Permission denied")
    with pytest.raises(DeviceError, match=r"could not join ivloop-server.*--socket-group"):
        plug.plug(dom, SOCK_A)


def test_unplug_waits_for_the_guest(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1", devices=shmem_xml()))
    dom.detach_polls = 5  # libvirt returned before the guest let go
    before = shmem.find_shmem(dom.XMLDesc(0))
    assert before is not None and before.alias == "shmem0"
    gone = plug.unplug(dom)
    [(what, xml, flags)] = dom.calls
    assert (what, flags) == ("detach", LIVE)
    assert xml == before.xml  # the device exactly as libvirt shows it
    assert shmem.find_shmem(dom.XMLDesc(0)) is None
    assert gone.device.device.socket == SOCK_A
    # the definition keeps it, so a restarted domain joins again
    assert shmem.find_shmem(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) is not None


def test_unplug_config_removes_from_definition(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1", devices=shmem_xml()))
    plug.unplug(dom, config=True)
    conf = host_a.real.lookupByName("vm1").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert shmem.find_shmem(conf) is None


def test_unplug_without_device(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1"))
    with pytest.raises(DeviceStateError, match="has no ivloop device ivloop0"):
        plug.unplug(dom)


def test_unplug_guest_never_releases(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1", devices=shmem_xml()))
    dom.detach_never = True
    with pytest.raises(DeviceError, match="did not release the ivloop device within"):
        plug.unplug(dom, timeout=0.2)


def test_unplug_then_plug_restores_the_same_device(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1", devices=shmem_xml(slot=7)))
    gone = plug.unplug(dom)
    plug.attach(dom, gone.device.attach_xml(), SOCK_A)
    back = shmem.find_shmem(dom.XMLDesc(0))
    assert back is not None and back.device == gone.device.device
    assert back.device.address == PciAddress(slot=7)


def test_lookup_unknown_domain_is_a_real_libvirt_error(host_a: FakeHost) -> None:
    with pytest.raises(DomainNotFoundError, match=r"no domain named nosuch.*list --all"):
        lv.lookup(host_a.conn, "nosuch")


def test_connect_unreachable_uri() -> None:
    with pytest.raises(ConnectError, match=r"cannot connect to libvirt at .*/nonexistent/"
                       ".*is libvirtd running"):
        lv.connect("qemu+unix:///system?socket=/nonexistent/libvirt-sock")


def test_translate_keeps_libvirts_words() -> None:
    exc = lv.translate(lv_error(libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running"),
                       "plugging vm1")
    assert isinstance(exc, DeviceStateError) and str(exc) == "plugging vm1: domain is not running"
