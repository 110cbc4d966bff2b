"""Hot-plug and hot-unplug of the ivloop device in a running libvirt domain.

Unplug is live only by default: the persistent definition keeps its device,
so a restarted domain joins its server again.  libvirt's detach returns
once QEMU reports DEVICE_DELETED or after its own few-second wait, while the
guest may still be draining its rings (ivloop.ko's remove() marks itself
LEAVING first); :func:`unplug` therefore waits until the device is gone
from the live XML.  The live XML is the state itself, so reading it cannot
miss an event the way a late listener would.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import libvirt

from . import fdpark, lv, shmem
from .errors import DeviceError, DeviceStateError, HotplugError
from .shmem import DEFAULT_NAME, FoundShmem, PciAddress, ShmemDevice

log = logging.getLogger(__name__)

UNPLUG_TIMEOUT = 30.0
POLL = 0.05

# QEMU's words when ivloop-server answers with version -1 (a refusal)
REFUSED = "server sent version -1"
# how QEMU's chardev says it could not reach the server's socket
_SOCKET_WORDS = ("Failed to connect", "Connection refused", "No such file or directory",
                 "Permission denied")


def _flags(dom: lv.Domain, config: bool) -> int:
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
    if config and dom.isPersistent():
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    return int(flags)


def _attach_error(exc: BaseException, name: str, socket: str) -> Exception:
    text = lv.error_text(exc)
    if REFUSED in text:
        return DeviceError(f"{name}: ivloop-server at {socket} refused this QEMU ({text}); "
                           "the server's log says why (full, a hold-off after an eviction, or "
                           "no peer ID left: `ivloop-libvirt server-restart` replaces that server)")
    if "hotplug" in text.lower():
        return HotplugError(f"{name}: {text}; a pc domain needs <features><acpi/></features>, "
                            "a q35 one an empty pcie-root-port (restart after adding it)")
    if socket in text or any(w in text for w in _SOCKET_WORDS):
        return DeviceError(f"{name}: QEMU could not join ivloop-server at {socket} ({text}); "
                           "is the server running on that host, and may QEMU's user open the "
                           "socket (ivloop-server --socket-mode 0660 --socket-group "
                           "libvirt-qemu)?")
    return lv.translate(exc, f"attaching the ivloop device to {name}")


@dataclass(frozen=True)
class Plugged:
    domain: str
    device: ShmemDevice
    seconds: float


def attach(dom: lv.Domain, device_xml: str, socket: str, *, name: str = DEFAULT_NAME,
           config: bool = False) -> float:
    """Attach *device_xml* live, check it appeared; the seconds it took."""
    dname = lv.safe_name(dom)
    t = time.monotonic()
    try:
        dom.attachDeviceFlags(device_xml, _flags(dom, config))
    except libvirt.libvirtError as exc:
        raise _attach_error(exc, dname, socket) from exc
    if shmem.find_shmem(lv.live_xml(dom), name) is None:
        raise DeviceError(f"{dname}: libvirt accepted the ivloop device but its live XML "
                          "does not show it")
    took = time.monotonic() - t
    log.info("%s: ivloop device %s attached (server %s) in %.3f s", dname, name, socket, took)
    return took


def plug(dom: lv.Domain, socket: str = shmem.DEFAULT_SOCKET, *, name: str = DEFAULT_NAME,
         address: PciAddress | None = None, config: bool = False) -> Plugged:
    """Hot-plug an ivloop device on *socket* into the running domain *dom*.

    *address* None: :func:`shmem.hotplug_address` (slot 0x05 on pc, the
    spare pcie-root-port on q35).  *config*: also add it to a persistent
    domain's definition.
    """
    dname = lv.safe_name(dom)
    lv.require_running(dom, f"plugging {dname}")
    xml = lv.live_xml(dom)
    if shmem.find_shmem(xml, name) is not None:
        raise DeviceStateError(f"{dname} already has the ivloop device {name}; "
                               f"`ivloop-libvirt unplug {dname}` first")
    shmem.check_hotplug(xml)
    if address is None:
        address = shmem.hotplug_address(xml)
    device = ShmemDevice(socket, name, address=address)
    took = attach(dom, device.to_xml(), socket, name=name, config=config)
    return Plugged(dname, device, took)


@dataclass(frozen=True)
class Unplugged:
    domain: str
    device: FoundShmem  # as it was: attach_xml() puts it back
    seconds: float


def unplug(dom: lv.Domain, *, name: str = DEFAULT_NAME, config: bool = False,
           timeout: float = UNPLUG_TIMEOUT, park_fds: bool | None = None) -> Unplugged:
    """Hot-unplug the ivloop device *name*; wait until the guest let it go.

    *park_fds* (None: for TCG domains whose QEMU runs here) occupies the fd
    numbers the unplug freed, see :mod:`ivloop_libvirt.fdpark`.
    """
    dname = lv.safe_name(dom)
    lv.require_running(dom, f"unplugging {dname}")
    xml = lv.live_xml(dom)
    found = shmem.find_shmem(xml, name)
    if found is None:
        raise DeviceStateError(f"{dname} has no ivloop device {name} to unplug")
    parker = fdpark.Parker(dom, xml, park_fds)
    t = time.monotonic()
    try:
        dom.detachDeviceFlags(found.xml, _flags(dom, config))
    except libvirt.libvirtError as exc:
        raise lv.translate(exc, f"detaching the ivloop device from {dname}") from exc
    deadline = t + timeout
    while shmem.find_shmem(lv.live_xml(dom), name) is not None:
        if time.monotonic() >= deadline:
            raise DeviceError(
                f"{dname}: the guest did not release the ivloop device within {timeout:g} s "
                "(is ivloop.ko stuck, or ACPI hot-plug off in the guest?); the unplug request "
                "stays pending in QEMU")
        time.sleep(POLL)
    took = time.monotonic() - t
    parker.after_unplug()
    log.info("%s: ivloop device %s detached in %.3f s", dname, name, took)
    return Unplugged(dname, found, took)


def define_with_hotplug_port(conn: lv.Connection, domain_xml: str) -> tuple[lv.Domain, int]:
    """Define a domain with a pcie-root-port that stays empty (q35); the port's bus.

    libvirt places the devices it adds or auto-addresses (a q35 domain's
    USB controller, say) on whatever empty root port the definition has,
    so a port added before the first define is no longer spare when the
    domain starts.  This defines the domain, lets libvirt assign every
    address, then adds the spare port and defines again.  pc: defined as
    given, bus 0.
    """
    try:
        dom = conn.defineXML(domain_xml)
        if shmem.machine_kind(domain_xml) == "pc":
            return dom, 0
        addressed = str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        with_port, bus = shmem.with_hotplug_port(addressed)
        if with_port != addressed:
            dom = conn.defineXML(with_port)
    except libvirt.libvirtError as exc:
        raise lv.translate(exc, "defining the domain", lv.uri_of(conn)) from exc
    return dom, bus
