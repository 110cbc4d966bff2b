"""What a migration and a server restart report: plain data, shared by every caller.

The same :class:`MigrationReport` comes out of ``ivloop-libvirt migrate``
and ``harness migrate`` on either backend (``--json`` prints it), so a
script reads one schema whichever tool moved the VM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: The five phases of a move, in order (ivloop's DESIGN.md, "Migration, step by
#: step").  ``check`` comes before them and changes nothing.
PHASES = ("unplug", "prepare", "migrate", "plug", "finish")


@dataclass
class MigrationReport:
    vm: str
    source: str
    destination: str
    backend: str = ""  # "qemu" (the harness runs QEMU itself) or "libvirt"
    ok: bool = False
    # The migration completed: the destination is the VM from then on, and
    # the source is never resumed (its memory is older than what peers saw).
    completed: bool = False
    failed_phase: str = ""  # "", "check", or one of PHASES
    error: str = ""
    hint: str = ""  # the command that finishes an incomplete move
    # After a failure before completion: the source runs with its device again.
    source_restored: bool | None = None
    flags: list[str] = field(default_factory=list)  # libvirt's migration flags
    source_socket: str | None = None
    dest_socket: str | None = None
    # Seconds each phase took (0 when it did not run or had nothing to do).
    unplug_s: float = 0.0
    prepare_s: float = 0.0  # the destination ready to receive
    migrate_s: float = 0.0
    plug_s: float = 0.0
    finish_s: float = 0.0  # the source stopped
    total_s: float = 0.0  # wall clock, check to finish
    job_ms: float | None = None  # the migration job by the hypervisor's own clock
    setup_ms: float | None = None
    downtime_ms: float | None = None
    transferred_mib: float = 0.0
    # From the caller's hooks: unplug/plug start until the peers switched path.
    switch_source_s: float | None = None
    switch_dest_s: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """The report as (step, seconds) rows, the table both CLIs print."""

        def opt(v: float | None, scale: float = 1.0) -> str:
            return "-" if v is None else f"{v * scale:.3f}"
        return [
            ("unplug (source)", f"{self.unplug_s:.3f}"),
            ("path switch (source)", opt(self.switch_source_s)),
            ("prepare (destination)", f"{self.prepare_s:.3f}"),
            ("migrate", f"{self.migrate_s:.3f}"),
            ("downtime", opt(self.downtime_ms, 1e-3)),
            ("plug (destination)", f"{self.plug_s:.3f}"),
            ("path switch (destination)", opt(self.switch_dest_s)),
            ("finish (source stopped)", f"{self.finish_s:.3f}"),
            ("total", f"{self.total_s:.3f}"),
            ("RAM transferred (MiB)", f"{self.transferred_mib:.1f}"),
        ]


@dataclass
class DomainResult:
    domain: str
    unplugged: bool = False
    plugged: bool = False
    error: str = ""


@dataclass
class RestartReport:
    socket: str
    command: list[str] = field(default_factory=list)
    command_status: int | None = None
    command_output: str = ""
    ok: bool = False
    domains: list[DomainResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
