"""Stand-ins at the libvirt boundary, around libvirt's real test driver.

libvirt 9.0's test driver (``test:///``) parses and keeps domain XML, starts,
pauses, resumes, destroys and undefines domains, and raises real
``libvirtError``s (unknown domain, bad XML), but it has no device hot-plug,
no job statistics and no migration.  :class:`FakeDomain` wraps a real
test-driver domain and adds only those: a live XML the attach/detach calls
edit (each new device first checked by libvirt's own parser, by defining a
scratch domain with it), and a migration that re-creates the domain on the
destination's (real) test driver.  Failures are injected per call.
"""

from __future__ import annotations

import itertools
import threading
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt

from ivloop_libvirt import lv

_scratch_names = itertools.count()


def lv_error(code: int, message: str, domain: int = 10) -> libvirt.libvirtError:
    """A libvirtError as libvirt raises it (code, domain, message filled in)."""
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, -1, -1)
    return exc


def _strip(xml: str) -> ET.Element:
    return ET.fromstring(xml)


class FakeHost:
    """A private test-driver instance (its own node file) with a host UUID."""

    def __init__(self, tmp: Path, name: str) -> None:
        node = tmp / f"node-{name}.xml"
        node.write_text("<node/>\n")
        self.name = name
        self.uri = f"test://{node}"
        self.real = libvirt.open(self.uri)
        self.uuid = str(uuidlib.uuid4())
        self.domains: dict[str, FakeDomain] = {}  # by UUID: the same object every lookup
        self.conn = FakeConn(self)
        self.closed = False
        self.attach_error: libvirt.libvirtError | None = None  # for domains seen from now

    def domain_xml(self, name: str, *, machine: str = "pc", acpi: bool = True,
                   devices: str = "") -> str:
        feats = "<features><acpi/></features>" if acpi else ""
        ctl = ("<controller type='pci' index='0' model='pcie-root'/>"
               if machine == "q35" else "<controller type='pci' index='0' model='pci-root'/>")
        return (f"<domain type='test'><name>{name}</name><memory>262144</memory><vcpu>1</vcpu>"
                f"<os><type arch='x86_64' machine='{machine}'>hvm</type></os>{feats}"
                f"<devices>{ctl}{devices}</devices></domain>")

    def start(self, xml: str, *, persistent: bool = True) -> FakeDomain:
        if persistent:
            real = self.real.defineXML(xml)
            real.create()
        else:
            real = self.real.createXML(xml, 0)
        return self.wrap(real)

    def wrap(self, real: Any) -> FakeDomain:
        key = real.UUIDString()
        if key not in self.domains:
            self.domains[key] = FakeDomain(self, real)
            self.domains[key].attach_error = self.attach_error
        return self.domains[key]

    def validate_xml(self, domain_xml: str) -> None:
        """Let libvirt's parser judge a domain XML (raises libvirtError)."""
        root = ET.fromstring(domain_xml)
        name = f"scratch{next(_scratch_names)}"
        root.find("name").text = name  # type: ignore[union-attr]
        uuid_el = root.find("uuid")
        if uuid_el is not None:
            root.remove(uuid_el)
        self.real.defineXML(ET.tostring(root, encoding="unicode")).undefine()


class FakeConn:
    def __init__(self, host: FakeHost) -> None:
        self.host = host

    def getURI(self) -> str:
        return self.host.uri

    def getHostname(self) -> str:
        return self.host.name

    def getCapabilities(self) -> str:
        caps = ET.fromstring(self.host.real.getCapabilities())
        host = caps.find("host")
        assert host is not None
        ET.SubElement(host, "uuid").text = self.host.uuid
        return ET.tostring(caps, encoding="unicode")

    def lookupByName(self, name: str) -> FakeDomain:
        return self.host.wrap(self.host.real.lookupByName(name))

    def defineXML(self, xml: str) -> FakeDomain:
        return self.host.wrap(self.host.real.defineXML(xml))

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        return self.host.wrap(self.host.real.lookupByUUIDString(uuid))

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        return [self.host.wrap(d) for d in self.host.real.listAllDomains(flags)]

    def close(self) -> int:
        self.host.closed = True
        return 0


class FakeDomain:
    """A real test-driver domain plus hot-plug, job statistics and migration."""

    def __init__(self, host: FakeHost, real: Any) -> None:
        self.host = host
        self.real = real
        self.live = self._with_aliases(real.XMLDesc(0))
        self.calls: list[tuple[str, str, int]] = []  # (method, xml, flags)
        # failure injection
        self.attach_error: libvirt.libvirtError | None = None
        self.detach_error: libvirt.libvirtError | None = None
        self.detach_polls = 0  # live-XML reads before a detached device is gone
        self.detach_never = False  # the guest never lets go
        self.migrate_error: libvirt.libvirtError | None = None
        self.migrate_pauses = False  # leave the source paused when failing
        self.migrate_blocks = False  # run until abortJob()
        self.migrate_kills_source = False  # the source is gone after the failure
        self.stats: dict[str, Any] = {}
        self.aborted = threading.Event()
        self._pending: str | None = None
        self._polls_left = 0

    @staticmethod
    def _with_aliases(xml: str) -> str:
        root = ET.fromstring(xml)
        for i, el in enumerate(root.findall("./devices/shmem")):
            if el.find("alias") is None:
                ET.SubElement(el, "alias", {"name": f"shmem{i}"})
        return ET.tostring(root, encoding="unicode")

    # -- delegated to the test driver
    def name(self) -> str:
        return str(self.real.name())

    def UUIDString(self) -> str:
        return str(self.real.UUIDString())

    def isActive(self) -> int:
        return int(self.real.isActive())

    def isPersistent(self) -> int:
        return int(self.real.isPersistent())

    def state(self, flags: int = 0) -> list[int]:
        return list(self.real.state(flags))

    def resume(self) -> int:
        self.calls.append(("resume", "", 0))
        return int(self.real.resume())

    def connect(self) -> FakeConn:
        return self.host.conn

    # -- what the test driver lacks
    def XMLDesc(self, flags: int = 0) -> str:
        if flags & libvirt.VIR_DOMAIN_XML_INACTIVE:
            return str(self.real.XMLDesc(flags & ~libvirt.VIR_DOMAIN_XML_SECURE))
        if not self.real.isActive():
            return str(self.real.XMLDesc(0))
        if self._pending is not None:
            if self._polls_left <= 0 and not self.detach_never:
                self._remove(self._pending)
                self._pending = None
            self._polls_left -= 1
        return self.live

    def _remove(self, name: str) -> None:
        root = ET.fromstring(self.live)
        devices = root.find("devices")
        assert devices is not None
        for el in devices.findall("shmem"):
            if el.get("name") == name:
                devices.remove(el)
        self.live = ET.tostring(root, encoding="unicode")

    def attachDeviceFlags(self, xml: str, flags: int = 0) -> int:
        self.calls.append(("attach", xml, flags))
        if not self.real.isActive():
            raise lv_error(libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running")
        if self.attach_error is not None:
            raise self.attach_error
        dev = _strip(xml)
        assert dev.find("alias") is None, "attach XML must not carry libvirt's alias"
        root = ET.fromstring(self.live)
        devices = root.find("devices")
        assert devices is not None
        for other in devices.findall("shmem"):
            if other.get("name") == dev.get("name"):
                raise lv_error(libvirt.VIR_ERR_OPERATION_FAILED,
                               f"shmem {dev.get('name')} already exists")
        devices.append(dev)
        candidate = ET.tostring(root, encoding="unicode")
        self.host.validate_xml(candidate)  # libvirt's parser has the last word
        ET.SubElement(dev, "alias", {"name": "shmem0"})
        self.live = ET.tostring(root, encoding="unicode")
        if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG:
            conf = ET.fromstring(self.real.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            conf_devs = conf.find("devices")
            assert conf_devs is not None
            conf_devs.append(_strip(xml))
            self.host.real.defineXML(ET.tostring(conf, encoding="unicode"))
        return 0

    def detachDeviceFlags(self, xml: str, flags: int = 0) -> int:
        self.calls.append(("detach", xml, flags))
        if not self.real.isActive():
            raise lv_error(libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running")
        if self.detach_error is not None:
            raise self.detach_error
        name = _strip(xml).get("name", "")
        if f"name=\"{name}\"" not in self.live and f"name='{name}'" not in self.live:
            raise lv_error(libvirt.VIR_ERR_DEVICE_MISSING, f"matching shmem '{name}' not found")
        self._pending = name
        self._polls_left = self.detach_polls
        if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG:
            conf = ET.fromstring(self.real.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            conf_devs = conf.find("devices")
            assert conf_devs is not None
            for el in conf_devs.findall("shmem"):
                if el.get("name") == name:
                    conf_devs.remove(el)
            self.host.real.defineXML(ET.tostring(conf, encoding="unicode"))
        return 0

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        if flags & libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED:
            return dict(self.stats)
        return {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "data_processed": 64 * 2**20,
                "data_remaining": 0}

    def abortJob(self, flags: int = 0) -> int:
        self.calls.append(("abortJob", "", flags))
        self.aborted.set()
        return 0

    def migrate3(self, dconn: lv.Connection, params: dict[str, Any], flags: int) -> FakeDomain:
        assert isinstance(dconn, FakeConn)
        self.calls.append(("migrate3", repr(sorted(params.items())), flags))
        self.params = params
        if "ivshmem-doorbell" in self.live and "role=\"peer\"" in self.live:
            raise lv_error(libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
                           "unsupported configuration: Migration is disabled when using "
                           "feature 'peer mode'")
        if self.migrate_blocks:
            self.aborted.wait(30)
            raise lv_error(libvirt.VIR_ERR_OPERATION_ABORTED,
                           "operation aborted: migration out job: canceled by client")
        if self.migrate_error is not None:
            if self.migrate_pauses:
                self.real.suspend()
            if self.migrate_kills_source:
                self.real.destroy()
            raise self.migrate_error
        dest = dconn.host
        live = ET.fromstring(self.live)
        for el in live.findall("./devices/shmem/alias"):
            raise AssertionError(f"live XML still has a shmem device: {el}")
        xml = ET.tostring(live, encoding="unicode")
        if flags & libvirt.VIR_MIGRATE_PERSIST_DEST:
            persist = params.get(libvirt.VIR_MIGRATE_PARAM_PERSIST_XML) \
                or self.real.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            dest.real.defineXML(persist)
        persistent = self.real.isPersistent()
        self.real.destroy()
        if persistent and flags & libvirt.VIR_MIGRATE_UNDEFINE_SOURCE:
            self.real.undefine()
        if flags & libvirt.VIR_MIGRATE_PERSIST_DEST:
            ddom = dest.real.lookupByName(self.name())
            ddom.create()
            moved = dest.wrap(ddom)
            # what runs is the migrated live state, not the definition
            moved.live = xml
        else:
            moved = dest.wrap(dest.real.createXML(xml, 0))
        moved.stats = {"type": libvirt.VIR_DOMAIN_JOB_COMPLETED, "downtime": 42,
                       "time_elapsed": 2400, "setup_time": 7, "data_processed": 256 * 2**20}
        return moved
