"""Exceptions raised by ivloop_libvirt.

Every error the package raises on purpose derives from one root, and its
message says what went wrong and what to do about it.  ``libvirt.libvirtError``
never escapes: :func:`ivloop_libvirt.lv.translate` converts it::

    IvloopLibvirtError
     ├── RequestError            the request cannot apply; nothing was changed
     │    ├── ConnectError       a libvirt URI cannot be opened
     │    ├── DomainNotFoundError  no such domain on that connection
     │    ├── DeviceStateError   no ivloop device to unplug / one already plugged /
     │    │                      the domain is not running
     │    └── HotplugError       the domain cannot hot-plug the device (no ACPI on
     │                           pc, no spare pcie-root-port on q35)
     ├── DeviceError             libvirt or QEMU refused an attach or detach
     ├── MigrationError          a migration failed; the source kept running and
     │    │                      got its device back (``report`` says which phase)
     │    └── IncompleteMigrationError  the VM runs, but not on shared memory:
     │                           moved without a device on the destination, or
     │                           the source could not get its device back
     └── ServerRestartError      the restart command failed or a domain was not
                                 re-plugged (``report`` has each domain)
"""

from __future__ import annotations

from .reports import MigrationReport, RestartReport


class IvloopLibvirtError(Exception):
    """Root of every error ivloop_libvirt reports to its user."""


class RequestError(IvloopLibvirtError):
    """The request does not fit what libvirt reports; nothing was changed."""


class ConnectError(RequestError):
    """A libvirt connection URI cannot be opened."""


class DomainNotFoundError(RequestError):
    """No domain of that name (or UUID) on the connection."""


class DeviceStateError(RequestError):
    """The domain's ivloop device (or the domain) is not in the state the request needs."""


class HotplugError(RequestError):
    """The domain's definition cannot take a hot-plugged ivshmem device."""


class DeviceError(IvloopLibvirtError):
    """libvirt (or QEMU below it) refused to attach or detach the device."""


class MigrationError(IvloopLibvirtError):
    """A migration failed in ``report.failed_phase``, before completing; the source keeps it."""

    def __init__(self, message: str, report: MigrationReport) -> None:
        super().__init__(message)
        self.report = report


class IncompleteMigrationError(MigrationError):
    """The VM runs, but not as it should: ``report.hint`` is the command that finishes the move.

    After a completed migration the VM stays on the destination whatever
    fails next (``report.completed``); before it, the source could not get
    its device back.
    """


class ServerRestartError(IvloopLibvirtError):
    """The server restart command failed, or some domain was not re-plugged."""

    def __init__(self, message: str, report: RestartReport) -> None:
        super().__init__(message)
        self.report = report
