"""The seam between the lab and whoever runs QEMU.

A :class:`Backend` is chosen once, from the state directory's record
(:func:`harness.backends.of`); :mod:`harness.cluster` and
:mod:`harness.migrate` call nothing backend-specific except through it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from harness.errors import StateError
from harness.lab import qemu
from harness.lab.state import State, StateDir, VMState, VMStatus
from harness.lab.topology import VMSpec
from ivloop_libvirt.flow import Mover


def begin_move(sd: StateDir, state: State, vs: VMState, mig_sock: Path) -> None:
    """Record *vs* as migrating once a move's check passed; a stale stream socket goes."""
    vs.status = VMStatus.MIGRATING
    sd.save(state)
    mig_sock.unlink(missing_ok=True)


def plug_command(dest: str, vm: str) -> str:
    """What finishes a move whose plug *dest*'s server refused, on either backend."""
    return (f"once host {dest}'s server takes it (its log: logs/server-{dest}.log "
            f"in the state directory): harness plug {vm}")


class Backend(ABC):
    """How VMs start, get their device, move and are cleaned up."""

    #: What ``harness up --backend`` and the state file call it.
    name: ClassVar[str]
    #: Whether ``harness restart`` and ``harness server-restart`` work on it.
    restarts: ClassVar[bool] = False

    def start_hosts(self, sd: StateDir, state: State) -> None:
        """Start what each host needs before its VMs (nothing by default)."""
        return None

    @abstractmethod
    def start_vm(self, sd: StateDir, state: State, vm: VMSpec, *, ivshmem: bool,
                 binary: qemu.Binary) -> VMState:
        """Start *vm* on its host, recorded in *state* before it runs."""

    @abstractmethod
    def set_ivshmem(self, sd: StateDir, state: State, vs: VMState, attached: bool) -> None:
        """Plug (on the host's server) or unplug *vs*'s device; the caller records it."""

    @abstractmethod
    def moving(self, sd: StateDir, state: State, vm: str, source: str, dest: str, *,
               max_bandwidth_mib: int | None,
               qemu_path: str | None) -> contextlib.AbstractContextManager[Mover]:
        """The steps that move *vm* from *source* to *dest* (:mod:`ivloop_libvirt.flow`).

        A context manager: what the steps need open (libvirt connections)
        stays open until the move is over.
        """

    def down(self, sd: StateDir) -> list[str]:
        """Stop what this backend started beyond the recorded QEMUs; what it removed."""
        return []

    def require_restarts(self, command: str) -> None:
        """Refuse *command* (``restart``, ``server-restart``) where the backend lacks it."""
        if not self.restarts:
            raise StateError(f"'harness {command}' is not available on the {self.name} "
                             f"backend yet; 'harness down' and 'harness up --backend "
                             f"{self.name}' again")

    def restart_vm(self, sd: StateDir, state: State, name: str, timeout: float) -> VMState:
        """Boot *name* again on the host it was last on, as a new incarnation."""
        raise NotImplementedError

    def replug(self, sd: StateDir, state: State, vs: VMState, server: str) -> None:
        """Unplug *vs*'s device and plug a new one on *server* (a new server's socket)."""
        raise NotImplementedError
