"""Domain XML for ivloop's shared-memory device.

A guest joins its host's ivloop-server through QEMU's ``ivshmem-doorbell``
device; libvirt spells it as a ``<shmem>`` device in peer mode::

    <shmem name='ivloop0' role='peer'>
      <model type='ivshmem-doorbell'/>
      <server path='/run/ivloop-server/ivloop.sock'/>
      <msi vectors='2' ioeventfd='on'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </shmem>

- ``name`` identifies the device in the domain (this package finds it by
  name); ``role='peer'`` is what QEMU's doorbell mode is to libvirt.
- ``server path`` is the host's ivloop-server socket; QEMU (user
  ``libvirt-qemu`` on Debian) must be able to open it, so run the server
  with ``--socket-mode 0660 --socket-group libvirt-qemu`` or as that user.
  The region's size comes from the server: no ``<size>``.
- two MSI-X vectors: 0 = membership changed, 1 = data.
- the address: on ``pc`` a fixed slot on ``pci.0`` (0x05, as the harness
  uses), and the domain needs ``<features><acpi/></features>`` or QEMU says
  "Bus 'pci.0' does not support hotplugging".  On ``q35`` the device sits at
  slot 0 of a spare ``pcie-root-port`` kept empty for it
  (:func:`root_port_xml`), because libvirt adds no bridge at hot-plug time.

libvirt refuses to migrate a domain with a peer-mode device ("Migration is
disabled when using feature 'peer mode'"), so :mod:`ivloop_libvirt.migrate`
detaches it live first and attaches a new one on the destination.
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from .errors import HotplugError, RequestError

DEFAULT_NAME = "ivloop0"
DEFAULT_SOCKET = "/run/ivloop-server/ivloop.sock"
DEFAULT_VECTORS = 2  # 0 = membership, 1 = data
PC_SLOT = 0x05  # harness/templates/qemu.j2 reserves 00:05 for the device

Machine = Literal["pc", "q35"]


@dataclass(frozen=True)
class PciAddress:
    """A guest PCI address; ``bus`` is the index of the controller it sits on."""

    domain: int = 0
    bus: int = 0
    slot: int = PC_SLOT
    function: int = 0

    def element(self) -> ET.Element:
        return ET.Element("address", {
            "type": "pci", "domain": f"0x{self.domain:04x}", "bus": f"0x{self.bus:02x}",
            "slot": f"0x{self.slot:02x}", "function": f"0x{self.function:x}"})  # fmt: skip

    @classmethod
    def from_element(cls, el: ET.Element) -> PciAddress:
        def num(key: str) -> int:
            return int(el.get(key, "0"), 0)
        return cls(num("domain"), num("bus"), num("slot"), num("function"))


@dataclass(frozen=True)
class ShmemDevice:
    """The ``<shmem>`` element ivloop needs; :meth:`to_xml` renders it."""

    socket: str
    name: str = DEFAULT_NAME
    vectors: int = DEFAULT_VECTORS
    ioeventfd: bool = True
    address: PciAddress | None = None  # None: libvirt picks one

    def __post_init__(self) -> None:
        if not self.socket.startswith("/"):
            raise RequestError(f"the ivloop-server socket must be an absolute path, "
                               f"not {self.socket!r}")
        if not self.name or any(c in self.name for c in "/<>&'\""):
            raise RequestError(f"bad shmem device name {self.name!r}: use letters, digits, "
                               "'-', '_' or '.'")
        if self.vectors < 2:
            raise RequestError(f"ivloop needs 2 MSI-X vectors, not {self.vectors}")

    def element(self) -> ET.Element:
        el = ET.Element("shmem", {"name": self.name, "role": "peer"})
        ET.SubElement(el, "model", {"type": "ivshmem-doorbell"})
        ET.SubElement(el, "server", {"path": self.socket})
        ET.SubElement(el, "msi", {"vectors": str(self.vectors),
                                  "ioeventfd": "on" if self.ioeventfd else "off"})
        if self.address is not None:
            el.append(self.address.element())
        return el

    def to_xml(self) -> str:
        return _tostring(self.element())


def shmem_xml(socket: str, *, name: str = DEFAULT_NAME, address: PciAddress | None = None,
              vectors: int = DEFAULT_VECTORS, ioeventfd: bool = True) -> str:
    """The ``<shmem>`` element for *socket* (see the module docstring)."""
    return ShmemDevice(socket, name, vectors, ioeventfd, address).to_xml()


def root_port_xml(index: int, *, chassis: int | None = None, port: int | None = None) -> str:
    """A ``pcie-root-port`` controller (q35) with bus number *index*, kept for hot-plug."""
    el = ET.Element("controller", {"type": "pci", "index": str(index),
                                   "model": "pcie-root-port"})
    ET.SubElement(el, "target", {"chassis": str(chassis if chassis is not None else index),
                                 "port": f"0x{port if port is not None else 0x10 + index:x}"})
    return _tostring(el)


@dataclass(frozen=True)
class FoundShmem:
    """An ivloop device as a domain's XML shows it."""

    device: ShmemDevice
    alias: str | None  # libvirt's id for it in a live domain (e.g. "shmem0")
    xml: str  # the element exactly as libvirt wrote it

    def attach_xml(self, socket: str | None = None) -> str:
        """The element to attach again: same address and options, the alias dropped.

        *socket* replaces the server path (another host's server).
        """
        el = ET.fromstring(self.xml)
        for alias in el.findall("alias"):
            el.remove(alias)
        if socket is not None:
            server = el.find("server")
            if server is None:
                server = ET.SubElement(el, "server")
            server.set("path", socket)
        return _tostring(el)


def _parse(domain_xml: str) -> ET.Element:
    try:
        return ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise RequestError(f"libvirt returned domain XML that does not parse: {exc}") from exc


def _tostring(el: ET.Element) -> str:
    return ET.tostring(el, encoding="unicode")


def _device_from(el: ET.Element) -> ShmemDevice:
    server = el.find("server")
    msi = el.find("msi")
    addr = el.find("address")
    return ShmemDevice(
        socket=server.get("path", "") if server is not None else "",
        name=el.get("name", ""),
        vectors=int(msi.get("vectors", str(DEFAULT_VECTORS))) if msi is not None else 0,
        ioeventfd=msi is not None and msi.get("ioeventfd") == "on",
        address=PciAddress.from_element(addr)
        if addr is not None and addr.get("type") == "pci" else None,
    )


def find_shmem(domain_xml: str, name: str = DEFAULT_NAME) -> FoundShmem | None:
    """The ``<shmem name=NAME>`` device of a domain's XML, or None.

    Only a peer-mode ivshmem-doorbell with a server counts; a plain shmem
    device of that name is an error, not a match.
    """
    root = _parse(domain_xml)
    for el in root.findall("./devices/shmem"):
        if el.get("name") != name:
            continue
        model = el.find("model")
        server = el.find("server")
        if (el.get("role", "") != "peer" or model is None
                or model.get("type") != "ivshmem-doorbell" or server is None
                or not server.get("path")):
            raise RequestError(f"shmem device {name!r} is not a peer-mode ivshmem-doorbell "
                               "with a server; ivloop cannot manage it")
        alias = el.find("alias")
        try:
            device = _device_from(el)
        except RequestError as exc:
            raise RequestError(f"shmem device {name!r}: {exc}") from exc
        return FoundShmem(device, alias.get("name") if alias is not None else None,
                          _tostring(el))
    return None


def shmem_devices(domain_xml: str) -> list[FoundShmem]:
    """Every peer-mode ivshmem-doorbell device in the domain XML."""
    root = _parse(domain_xml)
    found = []
    for el in root.findall("./devices/shmem"):
        model = el.find("model")
        if el.get("role") == "peer" and model is not None \
                and model.get("type") == "ivshmem-doorbell":
            hit = find_shmem(domain_xml, el.get("name", ""))
            if hit is not None:
                found.append(hit)
    return found


def machine_kind(domain_xml: str) -> Machine:
    """``q35`` for any q35 machine type (``pc-q35-7.2``, ``q35``), else ``pc``."""
    el = _parse(domain_xml).find("./os/type")
    machine = el.get("machine", "pc") if el is not None else "pc"
    return "q35" if "q35" in machine else "pc"


def _used_addresses(root: ET.Element) -> set[tuple[int, int, int]]:
    """(domain, bus, slot) of every device's guest PCI address (not hostdev sources)."""
    used = set()
    devices = root.find("devices")
    for dev in devices if devices is not None else []:
        for addr in dev.findall("address"):
            if addr.get("type") == "pci":
                a = PciAddress.from_element(addr)
                used.add((a.domain, a.bus, a.slot))
    return used


def spare_root_ports(domain_xml: str) -> list[int]:
    """Indexes of the q35 ``pcie-root-port`` controllers with nothing plugged into them."""
    root = _parse(domain_xml)
    buses = {bus for _, bus, _ in _used_addresses(root)}
    ports = []
    for ctl in root.findall("./devices/controller"):
        if ctl.get("type") == "pci" and ctl.get("model") == "pcie-root-port":
            index = int(ctl.get("index", "-1"))
            if index not in buses:
                ports.append(index)
    return ports


def check_hotplug(domain_xml: str) -> None:
    """Raise :class:`HotplugError` if QEMU would refuse a hot-plug into this domain."""
    root = _parse(domain_xml)
    name = root.findtext("name", "?")
    if machine_kind(domain_xml) == "pc" and root.find("./features/acpi") is None:
        raise HotplugError(
            f"domain {name} has no <features><acpi/></features>, so its pc machine cannot "
            "hot-plug PCI devices; add it (virsh edit) and restart the domain")


def hotplug_address(domain_xml: str) -> PciAddress | None:
    """Where a hot-plugged device should go in this (live) domain.

    pc: slot 0x05 of pci.0 if free, else None (libvirt picks a free slot).
    q35: slot 0 of the first empty ``pcie-root-port``; :class:`HotplugError`
    if there is none (one must be in the definition when the domain starts).
    """
    root = _parse(domain_xml)
    if machine_kind(domain_xml) == "pc":
        taken = (0, 0, PC_SLOT) in _used_addresses(root)
        return None if taken else PciAddress(bus=0, slot=PC_SLOT)
    ports = spare_root_ports(domain_xml)
    if not ports:
        name = root.findtext("name", "?")
        raise HotplugError(
            f"q35 domain {name} has no empty pcie-root-port to hot-plug the device into; "
            f"add one to its definition ({root_port_xml(_next_controller_index(root))}) "
            "and restart the domain")
    return PciAddress(bus=ports[0], slot=0)


def _next_controller_index(root: ET.Element) -> int:
    indexes = [int(c.get("index", "0")) for c in root.findall("./devices/controller")
               if c.get("type") == "pci"]
    return max(indexes, default=0) + 1


def with_shmem(domain_xml: str, device: ShmemDevice) -> str:
    """*domain_xml* with *device* added (replacing a shmem device of the same name)."""
    root = _parse(domain_xml)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    for el in devices.findall("shmem"):
        if el.get("name") == device.name:
            devices.remove(el)
    devices.append(device.element())
    return _tostring(root)


def with_hotplug_port(domain_xml: str) -> tuple[str, int]:
    """For q35: *domain_xml* with a spare pcie-root-port added, and its bus index.

    A domain that already has an empty root port is returned unchanged with
    that port's index.  For pc (no ports needed): unchanged, index 0.
    Apply it to the XML libvirt returns once every device has an address
    (:func:`ivloop_libvirt.plug.define_with_hotplug_port` does): libvirt
    puts auto-addressed devices on any empty port it finds at define time
    (seen on libvirt 9.0: a q35 domain's qemu-xhci took the added port).
    """
    if machine_kind(domain_xml) == "pc":
        return domain_xml, 0
    spare = spare_root_ports(domain_xml)
    if spare:
        return domain_xml, spare[0]
    root = copy.deepcopy(_parse(domain_xml))
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    index = _next_controller_index(root)
    devices.append(ET.fromstring(root_port_xml(index)))
    return _tostring(root), index
