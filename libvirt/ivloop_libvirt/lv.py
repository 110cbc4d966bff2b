"""The libvirt boundary: typed views of the objects used, connecting, error translation.

libvirt-python ships no type information, so this module states the few
methods ivloop_libvirt calls as Protocols (real ``virConnect``/``virDomain``
objects satisfy them, and so do the tests' stand-ins), and converts every
``libvirt.libvirtError`` into the package's own hierarchy.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any, Protocol

import libvirt

from .errors import (
    ConnectError,
    DeviceError,
    DeviceStateError,
    DomainNotFoundError,
    IvloopLibvirtError,
    RequestError,
)

log = logging.getLogger(__name__)


class Connection(Protocol):
    def getURI(self) -> str: ...
    def getHostname(self) -> str: ...
    def getCapabilities(self) -> str: ...
    def lookupByName(self, name: str) -> Domain: ...
    def defineXML(self, xml: str) -> Domain: ...
    def lookupByUUIDString(self, uuid: str) -> Domain: ...
    def listAllDomains(self, flags: int = 0) -> Sequence[Domain]: ...
    def close(self) -> int: ...


class Domain(Protocol):
    def name(self) -> str: ...
    def UUIDString(self) -> str: ...
    def XMLDesc(self, flags: int = 0) -> str: ...
    def isActive(self) -> int: ...
    def isPersistent(self) -> int: ...
    def state(self, flags: int = 0) -> list[int]: ...
    def resume(self) -> int: ...
    def attachDeviceFlags(self, xml: str, flags: int = 0) -> int: ...
    def detachDeviceFlags(self, xml: str, flags: int = 0) -> int: ...
    def migrate3(self, dconn: Connection, params: dict[str, Any], flags: int) -> Domain: ...
    def jobStats(self, flags: int = 0) -> dict[str, Any]: ...
    def abortJob(self, flags: int = 0) -> int: ...
    def connect(self) -> Connection: ...


_quiet = False


def _quiet_libvirt() -> None:
    """libvirt prints every error on stderr by default; this package reports them itself."""
    global _quiet  # noqa: PLW0603 (once per process)
    if not _quiet:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _quiet = True


def error_code(exc: BaseException) -> int | None:
    if isinstance(exc, libvirt.libvirtError):
        code = exc.get_error_code()
        return int(code) if code is not None else None
    return None


def error_text(exc: BaseException) -> str:
    if isinstance(exc, libvirt.libvirtError):
        msg = exc.get_error_message()
        return str(msg) if msg else str(exc)
    return str(exc) or exc.__class__.__name__


_CONNECT_CODES = {
    libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED, libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
}


def connect(uri: str | None = None) -> Connection:
    """Open a read-write connection (None: libvirt's default, $LIBVIRT_DEFAULT_URI)."""
    _quiet_libvirt()
    shown = uri or "the default URI"
    try:
        conn: Connection = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        if error_code(exc) == libvirt.VIR_ERR_AUTH_FAILED:
            hint = "this user may not manage it: run as root or as a member of group libvirt"
        else:
            hint = "is libvirtd running there and its socket reachable from here?"
        raise ConnectError(f"cannot connect to libvirt at {shown}: {error_text(exc)}; "
                           f"{hint}") from exc
    if conn is None:  # very old bindings returned None
        raise ConnectError(f"cannot connect to libvirt at {shown}")
    return conn


def translate(exc: BaseException, what: str, uri: str = "") -> IvloopLibvirtError:
    """A libvirtError raised while doing *what*, as this package's exception."""
    if isinstance(exc, IvloopLibvirtError):
        return exc
    code = error_code(exc)
    text = error_text(exc)
    where = f" on {uri}" if uri else ""
    if "Unable to read from monitor" in text or "closed the monitor" in text:
        return DeviceError(f"{what}: QEMU ended ({text}); the domain's log "
                           "(/var/log/libvirt/qemu/DOMAIN.log) says why")
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFoundError(f"{what}: no such domain{where} ({text}); "
                                   f"`virsh -c {uri or 'URI'} list --all` lists them")
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return DeviceStateError(f"{what}: {text}")
    if code in _CONNECT_CODES - {libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_CONFIG_UNSUPPORTED}:
        return ConnectError(f"{what}: lost libvirt{where}: {text}")
    return DeviceError(f"{what}: {text}")


def lookup(conn: Connection, name: str) -> Domain:
    """The domain *name* (or UUID) on *conn*."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
            raise translate(exc, f"looking up domain {name}", uri_of(conn)) from exc
    try:
        return conn.lookupByUUIDString(name)
    except libvirt.libvirtError as exc:
        raise DomainNotFoundError(
            f"no domain named {name} on {uri_of(conn)}; "
            f"`virsh -c {uri_of(conn)} list --all` lists them") from exc


def uri_of(conn: Connection) -> str:
    try:
        return str(conn.getURI())
    except libvirt.libvirtError:
        return "?"


def host_uuid(conn: Connection) -> str:
    """The host UUID libvirt reports (``<capabilities><host><uuid>``)."""
    try:
        caps = ET.fromstring(conn.getCapabilities())
    except (libvirt.libvirtError, ET.ParseError) as exc:
        raise translate(exc, "reading the host capabilities", uri_of(conn)) from exc
    return caps.findtext("./host/uuid", "")


def live_xml(dom: Domain) -> str:
    try:
        return str(dom.XMLDesc(0))
    except libvirt.libvirtError as exc:
        raise translate(exc, f"reading domain {safe_name(dom)}'s XML") from exc


def safe_name(dom: Domain) -> str:
    try:
        return str(dom.name())
    except libvirt.libvirtError:
        return "?"


def is_running(dom: Domain) -> bool:
    """Active and not shut off; a paused domain counts (it can still take devices)."""
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def require_running(dom: Domain, what: str) -> None:
    if not is_running(dom):
        raise DeviceStateError(f"{what}: domain {safe_name(dom)} is not running; "
                               "start it first (`virsh start`)")


def flag(name: str) -> int:
    """A libvirt constant by name (tests use it to read flags back)."""
    return int(getattr(libvirt, name))


__all__ = ["Connection", "Domain", "RequestError", "connect", "flag", "host_uuid",
           "is_running", "live_xml", "lookup", "require_running", "translate", "uri_of"]
