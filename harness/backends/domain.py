"""libvirt domain XML for a harness VM, translated from its QEMU command line.

The direct backend runs the argv that ``templates/qemu.j2`` renders; the
libvirt backend defines a domain from *that same argv* (:func:`from_argv`),
so both backends give a guest the same machine, PCI layout, MACs, kernel,
initrd and command line, serial log and management SSH forward, and a
change to the template reaches both::

    00:02 data virtio-net      <interface type='ethernet'> on the pre-created tap, with
                               <driver name='vhost'/> where the tap has vhost=on
                               (KVM and /dev/vhost-net), else <driver name='qemu'/>:
                               libvirt would pick vhost-net itself on KVM
    00:03 management NIC       <qemu:commandline>: libvirt 9.0's <interface
                               type='user'> has no hostfwd, QEMU's own does
    00:04 virtio-rng           <rng model='virtio'>
    00:05 ivshmem-doorbell     <shmem> from ivloop_libvirt.shmem (the same
                               element `ivloop-libvirt plug` attaches)
    00:06 (Debian guests) root disk, passed through as QEMU arguments

Arguments libvirt owns (``-qmp``, ``-pidfile``, ``-incoming``, ``-display``,
``-nodefaults``, ``-no-user-config``) are dropped; any argument this module
does not know is passed through unchanged in ``<qemu:commandline>`` (the
unit tests pin which ones that is today, so a template change is noticed).

Two things libvirt 9.0 would otherwise do differently:

- it rounds guest RAM up to a whole MiB and backs it with a
  ``memory-backend-ram`` object, which would undo the TCG RAM padding of
  :meth:`harness.lab.accel.Choice.memory_arg` (QEMU < 9.0 loses guest writes
  migrating RAM of a multiple of 64 pages).  A padded size is therefore
  given to QEMU directly: a backend object of the exact size,
  ``-machine memory-backend=`` naming it and ``-m`` repeating the size;
  QEMU merges repeated ``-machine``/``-m`` options, the last one wins.
  libvirt's own (unused) 1-MiB-rounded backend is never touched, so it
  costs address space only.
- it adds a memory balloon and a USB controller unless told not to; both
  are switched off, and every device has an explicit address, so nothing
  libvirt adds can take the slots above.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import HarnessError
from harness.lab import qemu
from ivloop_libvirt.shmem import PciAddress, ShmemDevice

log = logging.getLogger(__name__)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)

#: QEMU options that take no value.
FLAGS = {"-nodefaults", "-no-user-config", "-S", "-no-shutdown", "-no-reboot",
         "-enable-kvm"}
#: Options libvirt sets itself (or that have no meaning under libvirt).
OWNED_BY_LIBVIRT = {"-qmp", "-pidfile", "-incoming", "-display", "-nodefaults",
                    "-no-user-config"}
#: The name of ivloop's shmem device in the domain (ivloop_libvirt's default).
SHMEM_NAME = "ivloop0"
_UUID_NS = uuid.UUID("0c7a52d4-7f45-4d1a-8f7e-5e0d1c2b3a49")  # ivloop's, for uuid5


class DomainXMLError(HarnessError):
    """A QEMU command line has something the libvirt translation cannot express."""


def domain_uuid(instance: str, vm: str) -> str:
    """Stable per state directory and VM; a migrated domain keeps its UUID."""
    return str(uuid.uuid5(_UUID_NS, f"{instance}/{vm}"))


def memory_kib(value: str) -> int:
    """A QEMU ``-m`` value (``256``, ``256M``, ``262152K``, ``1G``) in KiB."""
    m = re.fullmatch(r"(?:size=)?(\d+)([KMGT]?)[Bb]?", value.strip(), re.IGNORECASE)
    if m is None:
        raise DomainXMLError(f"cannot read the memory size -m {value!r}")
    scale = {"K": 1, "": 1024, "M": 1024, "G": 1024**2, "T": 1024**3}[m[2].upper()]
    return int(m[1]) * scale


def options(value: str) -> tuple[str, dict[str, str]]:
    """``driver,key=value,...`` -> (driver, {key: value}); a leading key=value has no driver."""
    parts = value.split(",")
    head = "" if "=" in parts[0] else parts.pop(0)
    opts: dict[str, str] = {}
    for p in parts:
        if p:
            key, _, value = p.partition("=")
            opts[key] = value if "=" in p else "on"
    return head, opts


def pci_slot(opts: dict[str, str], what: str) -> int:
    if opts.get("bus", "pci.0") != "pci.0" or "addr" not in opts:
        raise DomainXMLError(f"{what}: only explicit addresses on pci.0 are translated "
                             f"(got bus={opts.get('bus')!r}, addr={opts.get('addr')!r})")
    return int(opts["addr"].split(".")[0], 16)


def pairs(argv: list[str]) -> list[tuple[str, str | None]]:
    """The options of a QEMU argv (without argv[0]) as (option, value or None)."""
    out: list[tuple[str, str | None]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        if not opt.startswith("-"):
            raise DomainXMLError(f"unexpected QEMU argument {opt!r} (not an option)")
        if opt in FLAGS:
            out.append((opt, None))
            i += 1
            continue
        if i + 1 >= len(argv):
            raise DomainXMLError(f"QEMU option {opt} has no value")
        out.append((opt, argv[i + 1]))
        i += 2
    return out


@dataclass
class Translation:
    """What :func:`from_argv` made of an argv (the XML, and what went where)."""

    xml: str
    passthrough: list[str] = field(default_factory=list)  # into <qemu:commandline>
    dropped: list[str] = field(default_factory=list)  # owned by libvirt


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _address(slot: int) -> ET.Element:
    return PciAddress(bus=0, slot=slot).element()


def _emulator(path: str) -> str:
    if "/" in path:
        return path
    found = shutil.which(path)
    if found is None:
        raise DomainXMLError(f"QEMU binary {path!r} is not on PATH")
    return found


def _cpu(domain: ET.Element, model: str, feats: dict[str, str]) -> None:
    if model == "host":
        cpu = _sub(domain, "cpu", mode="host-passthrough", check="none", migratable="on")
    elif model == "max":
        cpu = _sub(domain, "cpu", mode="maximum", check="none", migratable="on")
    else:
        cpu = _sub(domain, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", model, fallback="forbid")
    for name, value in feats.items():
        if value not in ("on", "off"):
            raise DomainXMLError(f"-cpu {model}: feature {name}={value} is not on/off")
        _sub(cpu, "feature", policy="require" if value == "on" else "disable", name=name)


def from_argv(argv: list[str], *, uuid_: str | None = None, title: str = "") -> Translation:
    """The domain XML equivalent to QEMU *argv* as ``templates/qemu.j2`` renders it."""
    opts = pairs(argv)
    values: dict[str, list[str]] = {}
    for opt, value in opts:
        values.setdefault(opt, []).append(value or "")

    def one(opt: str) -> str:
        got = values.get(opt, [])
        if len(got) != 1:
            raise DomainXMLError(f"the QEMU command line has {len(got)} {opt} options, "
                                 "the translation needs exactly one")
        return got[0]

    name = options(one("-name"))[0]
    machine, machine_opts = options(one("-machine"))
    if machine_opts:
        raise DomainXMLError(f"-machine {machine} options {machine_opts} are not translated")
    accel = "tcg"
    if "-accel" in values:
        accel, accel_opts = options(one("-accel"))
        # QEMU runs x86 guests on x86 hosts multi-threaded by default, which
        # is what thread=multi asks; libvirt 9.0 cannot spell it.
        if accel_opts not in ({}, {"thread": "multi"}):
            raise DomainXMLError(f"-accel {accel} options {accel_opts} are not translated")
    if accel not in ("tcg", "kvm"):
        raise DomainXMLError(f"accelerator {accel!r} is not translated")
    kib = memory_kib(one("-m"))
    cpus = options(one("-smp"))[0]

    domain = ET.Element("domain", {"type": "kvm" if accel == "kvm" else "qemu"})
    _sub(domain, "name", name)
    _sub(domain, "uuid", uuid_ or str(uuid.uuid4()))
    if title:
        _sub(domain, "title", title)
    _sub(domain, "memory", str(kib), unit="KiB")
    _sub(domain, "vcpu", cpus, placement="static")
    os_ = _sub(domain, "os")
    arch = Path(argv[0]).name.removeprefix("qemu-system-") or "x86_64"
    _sub(os_, "type", "hvm", arch=arch, machine=machine)
    _sub(os_, "kernel", one("-kernel"))
    _sub(os_, "initrd", one("-initrd"))
    _sub(os_, "cmdline", one("-append"))
    features = _sub(domain, "features")
    _sub(features, "acpi")  # PCI hot-plug on pc needs ACPI
    if "-cpu" in values:
        model, feats = options(one("-cpu"))
        _cpu(domain, model, feats)
    _sub(domain, "clock", offset="utc")
    devices = _sub(domain, "devices")
    _sub(devices, "emulator", _emulator(argv[0]))
    _sub(devices, "controller", type="usb", model="none")

    # Pair each -device with its -netdev / -chardev by id.
    netdevs = {options(v)[1].get("id", ""): options(v) for o, v in opts if o == "-netdev" and v}
    chardevs = {options(v)[1].get("id", ""): options(v) for o, v in opts if o == "-chardev" and v}
    native_backends: set[str] = set()
    passthrough: list[str] = []
    dropped: list[str] = []
    qemu_args: list[str] = []

    def keep(opt: str, value: str | None) -> None:
        qemu_args.append(opt)
        if value is not None:
            qemu_args.append(value)
        passthrough.append(opt if value is None else f"{opt} {value}")

    device_native: list[tuple[str, str]] = []
    for opt, value in opts:
        if opt != "-device" or value is None:
            continue
        driver, dev = options(value)
        backend = netdevs.get(dev.get("netdev", ""))
        if driver == "virtio-net-pci" and backend is not None and backend[0] == "tap":
            iface = _sub(devices, "interface", type="ethernet")
            _sub(iface, "mac", address=dev["mac"])
            _sub(iface, "target", dev=backend[1]["ifname"], managed="no")
            _sub(iface, "model", type="virtio")
            # Said either way: on KVM libvirt takes vhost-net whenever it can
            # open /dev/vhost-net, and the harness records which it asked for.
            _sub(iface, "driver", name="vhost" if backend[1].get("vhost") == "on" else "qemu")
            iface.append(_address(pci_slot(dev, "data NIC")))
            native_backends.add("netdev:" + dev["netdev"])
            device_native.append((opt, value))
        elif driver == "virtio-rng-pci" and "rng" not in dev:
            rng = _sub(devices, "rng", model="virtio")
            _sub(rng, "backend", "/dev/urandom", model="random")
            rng.append(_address(pci_slot(dev, "virtio-rng")))
            device_native.append((opt, value))
        elif driver == "ivshmem-doorbell":
            char = chardevs.get(dev.get("chardev", ""))
            if char is None or char[0] != "socket" or "path" not in char[1]:
                raise DomainXMLError(f"ivshmem-doorbell {value}: no socket chardev to a server")
            shm = ShmemDevice(socket=char[1]["path"], name=SHMEM_NAME,
                              vectors=int(dev.get("vectors", "2")),
                              ioeventfd=dev.get("ioeventfd", "on") == "on",
                              address=PciAddress(bus=0, slot=pci_slot(dev, "ivshmem")))
            devices.append(shm.element())
            native_backends.add("chardev:" + dev["chardev"])
            device_native.append((opt, value))

    serials = values.get("-serial", [])
    for value in serials:
        if not value.startswith("file:"):
            raise DomainXMLError(f"-serial {value}: only file: serials are translated")
        serial = _sub(devices, "serial", type="file")
        # append: a migrated domain's destination keeps writing the same log
        _sub(serial, "source", path=value.removeprefix("file:"), append="on")
        _sub(serial, "target", port=str(len(devices.findall("serial")) - 1))
    _sub(devices, "memballoon", model="none")

    handled = {"-name", "-machine", "-accel", "-m", "-smp", "-kernel", "-initrd", "-append",
               "-cpu", "-serial"}
    def native(opt: str, value: str | None) -> bool:
        if (opt, value) in device_native:
            return True
        return (opt in ("-netdev", "-chardev") and value is not None
                and f"{opt[1:]}:{options(value)[1].get('id', '')}" in native_backends)

    for opt, value in opts:
        if opt in handled or native(opt, value):
            continue
        if opt in OWNED_BY_LIBVIRT:
            dropped.append(opt)
        else:
            keep(opt, value)

    if kib % 1024:
        # libvirt would round the RAM up to a MiB (see the module docstring)
        for opt, value in (
            ("-object", f"memory-backend-ram,id=ivl.ram,size={kib * 1024}"),
            ("-machine", "memory-backend=ivl.ram"),
            ("-m", f"{kib}K"),
        ):  # fmt: skip
            keep(opt, value)
    if qemu_args:
        # ElementTree declares xmlns:qemu on the root (register_namespace above)
        cmd = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
        for arg in qemu_args:
            ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})
    ET.indent(domain)
    return Translation(xml=ET.tostring(domain, encoding="unicode"),
                       passthrough=passthrough, dropped=dropped)


def render(spec: qemu.LaunchSpec, *, uuid_: str | None = None, title: str = "") -> str:
    """The domain XML for *spec*: :func:`qemu.render`'s argv through :func:`from_argv`."""
    t = from_argv(qemu.render(spec), uuid_=uuid_, title=title)
    if t.passthrough:
        log.debug("%s: passed to QEMU unchanged: %s", spec.vm.name, "; ".join(t.passthrough))
    return t.xml


@dataclass(frozen=True)
class Parsed:
    """The fields of a domain XML the harness cares about (for tests and status)."""

    name: str
    type: str
    memory_kib: int
    vcpus: int
    machine: str
    kernel: str
    initrd: str
    cmdline: str
    data_mac: str
    tap: str
    data_driver: str  # the data NIC's <driver name>: "vhost" or "qemu"
    console: str
    slots: dict[str, int]  # device kind -> PCI slot on pci.0
    shmem_socket: str | None
    qemu_args: list[str]


def parse(xml: str) -> Parsed:
    root = ET.fromstring(xml)

    def text(path: str) -> str:
        return root.findtext(path, "")

    slots: dict[str, int] = {}
    for kind in ("interface", "rng", "shmem"):
        addr = root.find(f"./devices/{kind}/address")
        if addr is not None:
            slots[kind] = int(addr.get("slot", "0"), 16)
    iface = root.find("./devices/interface")
    server = root.find("./devices/shmem/server")
    mac = iface.find("mac") if iface is not None else None
    target = iface.find("target") if iface is not None else None
    driver = iface.find("driver") if iface is not None else None
    source = root.find("./devices/serial/source")
    os_type = root.find("./os/type")
    return Parsed(
        name=text("name"), type=root.get("type", ""),
        memory_kib=int(text("memory") or 0), vcpus=int(text("vcpu") or 0),
        machine=os_type.get("machine", "") if os_type is not None else "",
        kernel=text("./os/kernel"), initrd=text("./os/initrd"), cmdline=text("./os/cmdline"),
        data_mac=mac.get("address", "") if mac is not None else "",
        tap=target.get("dev", "") if target is not None else "",
        data_driver=driver.get("name", "") if driver is not None else "",
        console=source.get("path", "") if source is not None else "",
        slots=slots, shmem_socket=server.get("path") if server is not None else None,
        qemu_args=[a.get("value", "") for a in root.iterfind(f"{{{QEMU_NS}}}commandline/"
                                                             f"{{{QEMU_NS}}}arg")],
    )  # fmt: skip
