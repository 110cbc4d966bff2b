"""Who runs QEMU: the harness itself (``qemu``), or a libvirtd per simulated host.

:func:`of` is the one place the choice is read: everything else asks the
:class:`~harness.backends.base.Backend` it returns.
"""

from __future__ import annotations

from harness.backends.base import Backend
from harness.backends.direct import DirectBackend
from harness.backends.libvirt import LibvirtBackend
from harness.errors import StateError
from harness.lab.state import State

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (DirectBackend, LibvirtBackend)}
NAMES = tuple(BACKENDS)


def named(name: str) -> Backend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise StateError(f"unknown backend {name!r}: one of {', '.join(NAMES)}") from None


def of(state: State) -> Backend:
    """The backend that runs *state*'s VMs, as `harness up` recorded it."""
    return named(state.backend)
