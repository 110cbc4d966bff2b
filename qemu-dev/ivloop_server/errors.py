"""Exceptions raised by ivloop_server.

Every exception the package raises on purpose derives from one root, so a
caller can catch them all at once::

    IvloopServerError
     +-- ConfigError          a value given by the user cannot work
     |    +-- LayoutError     the region cannot hold the rings asked for
     |    +-- NicMapError     the --nic-macs file has bad lines
     +-- SocketPathError      the listening socket path cannot be used
     |    +-- SocketInUseError  another server is listening on it
     +-- PidfileError         the pidfile names another running server
     +-- RegionError          a region (memfd or mapped file) is unusable
     +-- StateError           an operation was called in the wrong state
     +-- HandOffError         the region and members cannot be handed over or taken over

The message of each one says what was wrong and, where there is one, what
to do about it.  The CLI prints it as a single line.
"""

from __future__ import annotations


class IvloopServerError(Exception):
    """Root of every error raised on purpose by ivloop_server."""


class ConfigError(IvloopServerError):
    """A configuration value (CLI option or constructor argument) is invalid."""


class LayoutError(ConfigError):
    """The requested region size, peer count and ring size do not fit together."""


class NicMapError(ConfigError):
    """The operator's NIC map cannot be used; ``problems`` has one entry per bad line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"bad --nic-macs file {source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


class SocketPathError(IvloopServerError):
    """The listening socket path exists and cannot be used or replaced."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class SocketInUseError(SocketPathError):
    """Another server accepts connections on the socket path."""


class PidfileError(IvloopServerError):
    """The pidfile cannot be written, or belongs to another running server."""


class RegionError(IvloopServerError):
    """The shared region cannot be created, or an existing one is not valid."""


class StateError(IvloopServerError):
    """A state transition or call was refused because of the current state."""

    def __init__(self, what: str, current: object, wanted: object) -> None:
        super().__init__(
            f"{what}: cannot go from {getattr(current, 'value', current)} "
            f"to {getattr(wanted, 'value', wanted)}"
        )
        self.what = what
        self.current = current
        self.wanted = wanted


class HandOffError(IvloopServerError):
    """The server cannot hand its region and members over, or take them over."""
