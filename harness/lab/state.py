"""The state directory: everything a running topology owns, on disk.

Hosts, VMs and servers are recorded *before* they are created, so
``harness down`` can remove them even when the harness that created them
was killed half-way.  A migration destination is recorded only once the
move succeeds; until then its QEMU is known by its pidfile
(``qemu-VM-gN.pid``), which ``harness down`` also looks for.
Processes are recorded with their PID and start time and are only ever
signalled when both still match.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from harness.errors import BusyError, StateError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/ivloop")
STATE_FILE = "state.json"


class VMStatus(StrEnum):
    """Life cycle of a VM; transitions happen in harness.cluster and a backend's move."""

    BOOTING = "booting"
    RUNNING = "running"
    MIGRATING = "migrating"
    DOWN = "down"


@dataclass
class ProcRecord:
    """A process the harness started: PID plus start time (guards PID reuse)."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcRecord:
        return cls(pid=pid, start_time=proc_start_time(pid) or 0)

    def alive(self) -> bool:
        return self.start_time != 0 and proc_start_time(self.pid) == self.start_time


@dataclass
class HostState:
    name: str
    netns: str
    server: ProcRecord | None = None
    server_socket: str = ""
    #: The server's fd-store supervisor (harness.lab.fdstore).
    supervisor: ProcRecord | None = None


@dataclass
class VMState:
    name: str
    host: str
    status: VMStatus = VMStatus.BOOTING
    proc: ProcRecord | None = None
    qmp: str = ""
    console: str = ""
    ssh_port: int = 0
    tap: str = ""
    accel: str = ""
    ivshmem: bool = False
    generation: int = 0  # bumped by every migration (new QEMU, new files)
    unplugs: int = 0  # ivshmem unplugs in this QEMU (names the fds qmp.unplug_ivshmem parks)
    qemu: str = ""  # the QEMU binary this process runs ("": recorded by an older harness)
    qemu_banner: str = ""  # its `--version` line, which names its version


@dataclass
class State:
    instance: str
    topology: dict[str, Any]
    topology_source: str
    accel: str = ""
    # The data NICs' taps run vhost-net (accel.Choice.vhost_net, decided at
    # `harness up`: KVM and a usable /dev/vhost-net); False in a state
    # written by an older harness, which never asked for it.
    vhost_net: bool = False
    driver: bool = True  # guests stack ivl0 (ivloop.ko) on their data NIC
    # The QEMU binary every VM of the topology runs (chosen at `harness up`:
    # --qemu, $IVLOOP_QEMU or PATH) and its `--version` line when it was
    # chosen; "" in a state written by an older harness (the default QEMU).
    qemu: str = ""
    qemu_banner: str = ""
    # Who runs the VMs: "qemu" (the harness starts QEMU itself) or "libvirt"
    # (a libvirtd per host, VMs are domains: harness.backends.libvirt).
    backend: str = "qemu"
    hosts: dict[str, HostState] = field(default_factory=dict)
    vms: dict[str, VMState] = field(default_factory=dict)
    extra_netns: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> State:
        raw = json.loads(text)

        def proc(value: dict[str, int] | None) -> ProcRecord | None:
            return ProcRecord(**value) if value else None

        hosts = {
            k: HostState(**{**v, "server": proc(v.get("server")),
                            "supervisor": proc(v.get("supervisor"))})
            for k, v in raw.get("hosts", {}).items()
        }
        vms = {
            k: VMState(**{**v, "status": VMStatus(v["status"]), "proc": proc(v.get("proc"))})
            for k, v in raw.get("vms", {}).items()
        }
        return cls(
            instance=raw["instance"],
            topology=raw["topology"],
            topology_source=raw.get("topology_source", ""),
            accel=raw.get("accel", ""),
            vhost_net=bool(raw.get("vhost_net", False)),
            driver=bool(raw.get("driver", True)),
            qemu=str(raw.get("qemu", "")),
            qemu_banner=str(raw.get("qemu_banner", "")),
            backend=str(raw.get("backend", "qemu")),
            hosts=hosts,
            vms=vms,
            extra_netns=list(raw.get("extra_netns", [])),
        )


def proc_start_time(pid: int) -> int | None:
    """Start time of *pid* in clock ticks since boot, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


class StateDir:
    """A directory holding one topology's runtime state.

    Use as a context manager to hold its lock for the duration of an
    operation that changes state; a second such harness on the same directory
    gets :class:`BusyError`.  Read-only commands (status, ssh, exec) only
    :meth:`load`, which needs no lock: :meth:`save` replaces the file
    atomically, so a reader sees the old state or the new one.
    """

    def __init__(self, path: Path | None = None) -> None:
        env = os.environ.get("IVLOOP_STATE_DIR")
        self.path = (path or (Path(env) if env else DEFAULT_STATE_DIR)).absolute()
        # Short, stable id for names that live outside the directory (netns).
        self.instance = hashlib.sha1(str(self.path).encode()).hexdigest()[:6]
        self._lock_fd: int | None = None

    def __enter__(self) -> StateDir:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    def lock(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.path}: {exc.strerror}") from exc
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BusyError(
                f"another harness is working on {self.path}; wait for it or use --state-dir"
            ) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # Paths ------------------------------------------------------------
    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def netns_name(self, host: str) -> str:
        return f"ivl-{self.instance}-{host}"

    @property
    def key_path(self) -> Path:
        return self.file("id_ed25519")

    # Persistence ------------------------------------------------------
    def exists(self) -> bool:
        return self.file(STATE_FILE).exists()

    def load(self) -> State:
        try:
            return State.from_json(self.file(STATE_FILE).read_text())
        except FileNotFoundError:
            raise StateError(f"nothing is up in {self.path}; run 'harness up' first") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"{self.file(STATE_FILE)} is corrupt ({exc}); "
                "'harness down' removes what it can find by name"
            ) from exc

    def save(self, state: State) -> None:
        tmp = self.file(STATE_FILE + ".tmp")
        tmp.write_text(state.to_json())
        os.replace(tmp, self.file(STATE_FILE))

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.file(STATE_FILE).unlink()

    def sockets(self) -> Iterator[Path]:
        yield from self.path.glob("*.sock")
