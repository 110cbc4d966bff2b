"""Exceptions raised by the harness.

Every error a user can cause or fix derives from :class:`HarnessError`, and
its message says what went wrong and what to do about it::

    HarnessError
     ├── TopologyError      the topology file is invalid
     ├── StateError         the state directory disagrees with the request
     │    └── BusyError     another harness holds the state directory
     ├── HostNetError       namespaces, bridges, taps or wires
     ├── AccelError         no usable accelerator / bad --accel
     ├── ImageError         the guest image is missing
 ├── QemuBinaryError    the QEMU binary is missing, not a QEMU, or too old
     ├── LaunchError        a QEMU or ivloop-server process did not start
     ├── GuestError         a command in a guest failed or SSH is unreachable
     ├── QMPError           QEMU's monitor refused or timed out
     └── MigrationError     a live migration failed (source kept running)
          └── IncompleteMigrationError  the VM runs, but not on shared memory
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ivloop_libvirt.reports import MigrationReport


class HarnessError(Exception):
    """Root of every error the harness reports to its user."""


class TopologyError(HarnessError):
    """The topology file is malformed or inconsistent."""


class StateError(HarnessError):
    """The requested operation does not fit the current state."""


class BusyError(StateError):
    """Another harness process holds the state directory lock."""


class QemuBinaryError(HarnessError):
    """The QEMU binary to run is missing, is not a QEMU, or is too old."""


class HostNetError(HarnessError):
    """Creating or removing host networking failed."""


class AccelError(HarnessError):
    """The accelerator choice is invalid or unusable."""


class ImageError(HarnessError):
    """The guest image is missing or incomplete."""


class ServerBinaryError(HarnessError):
    """The ivloop-server to run (``$IVLOOP_SERVER_ROOT``) is not there."""


class LaunchError(HarnessError):
    """A process did not start; carries its command line and output."""

    def __init__(self, what: str, argv: list[str], exitcode: int | None, output: str) -> None:
        self.argv = argv
        self.exitcode = exitcode
        self.output = output
        status = "still running" if exitcode is None else f"exit status {exitcode}"
        tail = "\n".join(output.strip().splitlines()[-15:])
        super().__init__(f"{what} ({status})" + (f"; last output:\n{tail}" if tail else ""))


class GuestError(HarnessError):
    """A command in a guest failed, or the guest is unreachable."""

    def __init__(self, vm: str, command: str, exitcode: int | None, output: str) -> None:
        self.vm = vm
        self.command = command
        self.exitcode = exitcode
        self.output = output
        detail = output.strip().splitlines()[-5:]
        super().__init__(
            f"{vm}: '{command}' failed"
            + ("" if exitcode is None else f" with exit status {exitcode}")
            + (": " + " | ".join(detail) if detail else "")
        )


class QMPError(HarnessError):
    """QEMU's monitor refused a command or did not answer in time."""


class MigrationError(HarnessError):
    """A live migration failed before completing; the source VM is kept running.

    ``report`` (an :class:`ivloop_libvirt.reports.MigrationReport`, None when
    the request was refused before it started) says which phase failed.
    """

    def __init__(self, message: str, report: MigrationReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class IncompleteMigrationError(MigrationError):
    """The VM runs, but not on shared memory; the message ends with the command to run.

    After a completed migration the VM stays on the destination (on its
    lower NIC if the plug failed) and the source is never resumed.
    """
