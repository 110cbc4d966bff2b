"""Soak: migrate one VM back and forth with traffic running, and count failures.

Each move runs inside its own :class:`~harness.experiments.watch.Watch` window (a TCP
stream plus a 20 ms ping from a VM that stays put), so a lost connection or
lost pings are pinned to the move that caused them.  At the end every VM's
kernel log is checked for warnings.  All along, ivl-memcheck writes in the
moving VM's memory and checks each write arrived.  The target is zero lost
connections, zero kernel warnings and zero lost writes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import migrate
from harness.errors import HarnessError, StateError
from harness.experiments import watch
from harness.lab import hostnet, memcheck, vms
from harness.lab.state import StateDir

log = logging.getLogger(__name__)

# Kernel trouble, matched case-sensitively: a 2-vCPU guest's boot line
# "... loops_per_jiffy" contains "oops", and "WARNING" alone is common prose.
KERNEL_TROUBLE = re.compile(r"WARNING: |BUG: |kernel BUG at|Kernel panic|Oops: |Oops#|"
                            r"Call Trace:|general protection fault|blocked for more than|"
                            r"refcount_t: |list_(add|del) corruption|UBSAN: |KASAN: ")
LEAD_IN = 2.0  # seconds of traffic before each move


@dataclass
class Move:
    index: int
    source: str
    destination: str
    ok: bool = False
    error: str = ""
    downtime_ms: float | None = None
    total_s: float = 0.0
    switch_source_s: float | None = None
    switch_dest_s: float | None = None
    stream_ok: bool = False
    stream_error: str = ""
    ping_sent: int = 0
    ping_lost: int = 0
    # after a lost connection: the last kernel lines and counters of both ends
    diagnostics: dict[str, str] = field(default_factory=dict)


@dataclass
class SoakReport:
    vm: str
    peer: str
    moves: list[Move] = field(default_factory=list)
    kernel_warnings: dict[str, list[str]] = field(default_factory=dict)
    memory: memcheck.Result | None = None  # the moving VM's writes, checked
    memory_error: str = ""  # why they could not be checked

    @property
    def lost_connections(self) -> int:
        return sum(1 for m in self.moves if not m.stream_ok)

    @property
    def failed_moves(self) -> int:
        return sum(1 for m in self.moves if not m.ok)

    @property
    def ok(self) -> bool:
        return (not self.failed_moves and not self.lost_connections
                and not any(self.kernel_warnings.values())
                and self.memory is not None and self.memory.ok)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(lost_connections=self.lost_connections, failed_moves=self.failed_moves,
                    ok=self.ok)
        return data


def pick_peer(sd: StateDir, vm: str, source: str) -> str:
    """A VM that stays on *source* and runs ivloop.ko: it sends the traffic."""
    state = sd.load()
    topo = vms.topology_of(state)
    for name, vs in state.vms.items():
        if name != vm and vs.host == source and vms.driver_for(state, topo.vm(name)):
            return name
    raise StateError(f"soak needs a second VM on host {source} to send traffic; "
                     "name one with --peer")


def kernel_warnings(sd: StateDir) -> dict[str, list[str]]:
    state = sd.load()
    found: dict[str, list[str]] = {}
    for name in state.vms:
        try:
            with vms.guest(sd, state, name, timeout=30) as g:
                text = g.run("dmesg", timeout=30)
        except HarnessError as exc:
            found[name] = [f"cannot read dmesg: {exc}"]
            continue
        found[name] = [line for line in text.splitlines() if KERNEL_TROUBLE.search(line)]
    return found


def console_trouble(logs: Path, since: float) -> dict[str, list[str]]:
    """Kernel trouble in the serial consoles written since *since*.

    A guest that panics reboots (panic=-1) with a fresh dmesg, so only its
    console log still shows why.
    """
    found: dict[str, list[str]] = {}
    for path in sorted(logs.glob("console-*.log")):
        try:
            if path.stat().st_mtime < since:
                continue
            text = path.read_text(errors="replace")
        except OSError:
            continue
        lines = [line for line in text.splitlines() if KERNEL_TROUBLE.search(line)]
        if lines:
            found[path.name] = lines
    return found


def run(sd: StateDir, vm: str, source: str, dest: str, count: int = 20, *,
        peer: str | None = None, window: float = 25.0, out_dir: Path | None = None,
        say: Callable[[str], None] = lambda text: None) -> SoakReport:
    """Migrate *vm* *count* times, alternating *source* -> *dest* and back."""
    if count < 1:
        raise StateError("--count must be at least 1")
    peer = peer or pick_peer(sd, vm, source)
    if peer == vm:
        raise StateError("the traffic peer must not be the VM that migrates")
    # Refuse a bad first move now, not after a traffic window per move.
    migrate.validate(sd.load(), vm, source, dest)
    report = SoakReport(vm=vm, peer=peer)
    started = time.time()
    out_dir = out_dir or sd.file("soak")
    here, there = source, dest
    with vms.guest(sd, sd.load(), vm) as g:
        writer = memcheck.start(g)
    for i in range(1, count + 1):
        move = Move(index=i, source=here, destination=there)
        report.moves.append(move)
        w = watch.Watch(sd, peer, vm, duration=window, out_dir=out_dir / f"move-{i:03d}")
        with w:
            time.sleep(LEAD_IN)
            try:
                with sd:
                    mig = migrate.migrate(sd, vm, here, there, progress=w.progress)
            except HarnessError as exc:
                move.error = str(exc)
                log.error("move %d (%s -> %s) failed: %s", i, here, there, exc)
            else:
                move.ok = mig.ok
                move.downtime_ms = mig.downtime_ms
                move.total_s = mig.total_s
                move.switch_source_s = mig.switch_source_s
                move.switch_dest_s = mig.switch_dest_s
            w.wait()
        tl = w.timeline
        move.stream_ok, move.stream_error = tl.iperf_ok, tl.stream_failure()
        move.ping_sent, move.ping_lost = tl.ping_sent, tl.ping_lost
        if not move.stream_ok:
            move.diagnostics = _diagnose(sd, (vm, peer))
        say(describe(move))
        if move.ok:
            here, there = there, here
        elif not move.stream_ok:
            break  # nothing sensible to measure any more
    try:
        with vms.guest(sd, sd.load(), vm) as g:
            report.memory = memcheck.stop(g, writer)
    except HarnessError as exc:
        report.memory_error = str(exc)
    report.kernel_warnings = kernel_warnings(sd)
    report.kernel_warnings.update(console_trouble(sd.file("logs"), started))
    return report


def _diagnose(sd: StateDir, names: tuple[str, ...]) -> dict[str, str]:
    """What a lost stream leaves behind: guest logs and tables, host FDBs."""
    state = sd.load()
    found: dict[str, str] = {}
    for name in names:
        try:
            with vms.guest(sd, state, name, timeout=30) as g:
                found[name] = g.run("dmesg | grep -iE 'ivloop|ivl0|warn|bug' | tail -n 60; "
                                    "ethtool -S ivl0; cat /sys/kernel/debug/ivloop/*/peers; "
                                    "ip neigh show dev ivl0; tc -s qdisc show dev ivl0",
                                    timeout=30, check=False)
        except HarnessError as exc:
            found[name] = f"unreachable: {exc}"
    for host, hs in state.hosts.items():
        try:
            found[f"host {host} fdb"] = hostnet.bridge_fdb(hs.netns)
        except HarnessError as exc:
            found[f"host {host} fdb"] = f"unreadable: {exc}"
    return found


def _s(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.3f}"


def describe(m: Move) -> str:
    return (f"move {m.index}: {m.source} -> {m.destination} "
            f"{'ok' if m.ok else 'FAILED ' + m.error}; downtime {_s(m.downtime_ms, 1e-3)} s, "
            f"switch src {_s(m.switch_source_s)} s / dst {_s(m.switch_dest_s)} s, "
            f"stream {'survived' if m.stream_ok else 'LOST ' + m.stream_error}, "
            f"pings lost {m.ping_lost}/{m.ping_sent}")
