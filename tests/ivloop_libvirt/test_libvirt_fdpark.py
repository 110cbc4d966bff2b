"""fd parking after a TCG hot-unplug, and the q35 spare port that survives define."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from ivloop_libvirt import fdpark, plug, shmem

from .conftest import SOCK_A, shmem_xml
from .lvfakes import FakeHost


def test_only_tcg_domains_need_it() -> None:
    assert fdpark.wanted("<domain type='qemu'><name>x</name></domain>")
    assert not fdpark.wanted("<domain type='kvm'><name>x</name></domain>")
    assert not fdpark.wanted("not xml")


def test_qemu_pid_by_uuid() -> None:
    u = str(uuid.uuid4())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                              "-uuid", u.upper()])
    try:
        # until the child has exec'd (before, its cmdline is still pytest's)
        deadline = time.monotonic() + 10
        while b"-uuid" not in Path(f"/proc/{child.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.01)
        assert fdpark.qemu_pid(u) == child.pid
        assert fdpark.qemu_pid(str(uuid.uuid4())) is None
        assert fdpark.open_fds(child.pid) >= {0, 1, 2}
    finally:
        child.kill()
        child.wait()


def test_park_fills_the_freed_numbers_and_the_holes_below() -> None:
    # a "QEMU" whose fds 3..9 are open, and 5, 7, 8 were freed by the unplug
    qemu_fds = {0, 1, 2, 3, 4, 6, 9}
    sent: list[str] = []

    def send(fd: int, name: str) -> None:
        os.fstat(fd)  # a real, open eventfd
        sent.append(name)
        qemu_fds.add(min(n for n in range(64) if n not in qemu_fds))  # QEMU: lowest free

    n = fdpark.park(1234, {5, 7, 8}, send, fds_of=lambda pid: set(qemu_fds))
    assert n == 3 and {5, 7, 8} <= qemu_fds
    assert len(set(sent)) == 3 and all(s.startswith("ivl-park-") for s in sent)
    assert fdpark.park(1234, {5, 7, 8}, send, fds_of=lambda pid: set(qemu_fds)) == 0


def test_no_parking_for_a_domain_not_running_here(host_a: FakeHost) -> None:
    dom = host_a.start(host_a.domain_xml("vm1", devices=shmem_xml()))
    parker = fdpark.Parker(dom, "<domain type='qemu'/>", enabled=None)
    assert parker.pid is None and parker.after_unplug() == 0
    plug.unplug(dom, park_fds=True)  # asked for, not possible: the unplug still works
    assert shmem.find_shmem(dom.XMLDesc(0)) is None


def test_define_with_hotplug_port_q35(host_a: FakeHost) -> None:
    dom, bus = plug.define_with_hotplug_port(host_a.conn, host_a.domain_xml("q", machine="q35"))
    assert bus == 1
    assert shmem.spare_root_ports(dom.XMLDesc(0)) == [1]


def test_define_with_hotplug_port_when_libvirt_took_the_port(host_a: FakeHost) -> None:
    # what libvirt 9.0 wrote back: the port added beforehand now holds the USB controller
    taken = host_a.domain_xml("q", machine="q35", devices=(
        "<controller type='pci' index='1' model='pcie-root-port'/>"
        "<controller type='usb' index='0' model='qemu-xhci'><address type='pci' "
        "domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></controller>"))
    dom, bus = plug.define_with_hotplug_port(host_a.conn, taken)
    assert bus == 2
    defined = dom.XMLDesc(0)
    assert shmem.spare_root_ports(defined) == [2]
    ports = [c.get("index") for c in ET.fromstring(defined).iter("controller")
             if c.get("model") == "pcie-root-port"]
    assert ports == ["1", "2"]


def test_define_with_hotplug_port_pc(host_a: FakeHost) -> None:
    xml = shmem.with_shmem(host_a.domain_xml("p"), shmem.ShmemDevice(SOCK_A))
    dom, bus = plug.define_with_hotplug_port(host_a.conn, xml)
    assert bus == 0 and shmem.find_shmem(dom.XMLDesc(0)) is not None
    assert shmem.spare_root_ports(dom.XMLDesc(0)) == []
