"""`make demo`: the whole story in one run.

Boot the default topology, show vm1 <-> vm2 over shared memory next to the
forced lower path, then move vm2 to host B and back while a TCP stream and a
20 ms ping run from vm1, and report what happened.  Everything is torn down
at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import cluster
from harness import migrate as migrate_mod
from harness.experiments.watch import Timeline, Watch
from harness.lab import paths, topology, vms
from harness.lab.guest import Guest
from harness.lab.state import StateDir

log = logging.getLogger(__name__)
Say = Callable[[str], None]


@dataclass
class DemoResult:
    accel: str = ""
    shm_mbps: float = 0.0
    lower_mbps: float = 0.0
    shm_rr_us: float = 0.0  # TCP_RR mean round trip
    lower_rr_us: float = 0.0
    shm_counter_bytes: int = 0
    lower_counter_bytes_during_shm: int = 0
    migrations: list[migrate_mod.Report] = field(default_factory=list)
    timeline: Timeline | None = None
    timeline_json: Path | None = None
    timeline_png: Path | None = None


def iperf_mbps(g: Guest, ip: str, seconds: int = 4) -> float:
    out = json.loads(g.run(f"iperf3 -c {ip} -t {seconds} -J", timeout=seconds + 60))
    return float(out["end"]["sum_received"]["bits_per_second"]) / 1e6


def rr_mean_us(g: Guest, ip: str, seconds: int = 4) -> float:
    """netperf TCP_RR: mean round-trip time in µs."""
    out = g.run(f"netperf -P 0 -H {ip} -t TCP_RR -l {seconds} -- -o MEAN_LATENCY",
                timeout=seconds + 60)
    return float(out.strip().splitlines()[-1])


@contextlib.contextmanager
def forced_lower(guests: tuple[Guest, ...]) -> Iterator[None]:
    """Both ends on the lower path, as `harness bench` measures it."""
    try:
        for g in guests:
            g.run(f"{paths.FORCE_LOWER} on")
        yield
    finally:
        for g in guests:
            g.run(f"{paths.FORCE_LOWER} off")


def side_by_side(sd: StateDir, say: Say, result: DemoResult) -> None:
    state = sd.load()
    ip2 = vms.topology_of(state).vm("vm2").ip
    with vms.guest(sd, state, "vm1") as g, vms.guest(sd, state, "vm2") as g2:
        before = paths.counters(g)
        result.shm_mbps = iperf_mbps(g, ip2)
        after = paths.counters(g)
        result.shm_counter_bytes = after["shm_tx_bytes"] - before["shm_tx_bytes"]
        result.lower_counter_bytes_during_shm = after["lower_tx_bytes"] - before["lower_tx_bytes"]
        result.shm_rr_us = rr_mean_us(g, ip2)
        say(f"vm1 -> vm2 over shared memory: {result.shm_mbps:.0f} Mbit/s "
            f"({result.shm_counter_bytes / 2**20:.0f} MiB counted on shm_tx_bytes), "
            f"TCP_RR round trip {result.shm_rr_us:.0f} µs")
        with forced_lower((g, g2)):
            result.lower_mbps = iperf_mbps(g, ip2)
            result.lower_rr_us = rr_mean_us(g, ip2)
        say(f"vm1 -> vm2 forced onto the lower path: {result.lower_mbps:.0f} Mbit/s "
            f"(ratio {result.shm_mbps / max(result.lower_mbps, 1e-9):.1f}x), TCP_RR round "
            f"trip {result.lower_rr_us:.0f} µs "
            f"({result.lower_rr_us / max(result.shm_rr_us, 1e-9):.1f}x lower on shm)")


def run(sd: StateDir, say: Say, out_dir: Path, duration: float = 40,
        accel: str | None = None) -> DemoResult:
    result = DemoResult()
    with sd:
        state = cluster.up(sd, topology.load(), accel)
    result.accel = state.accel
    say(f"topology up: vm1, vm2 on host A, vm3 on host B (accelerator {state.accel})")
    try:
        side_by_side(sd, say, result)
        with Watch(sd, "vm1", "vm2", duration=duration, out_dir=out_dir) as watch:
            time.sleep(5)
            for source, dest in (("A", "B"), ("B", "A")):
                watch.mark(f"migrate vm2 {source}->{dest}")
                say(f"migrating vm2 {source} -> {dest} with the stream running ...")
                with sd:
                    report = migrate_mod.migrate(sd, "vm2", source, dest,
                                                 progress=watch.progress)
                result.migrations.append(report)
                say(f"  done: downtime {report.downtime_ms} ms, QEMU total "
                    f"{report.total_s:.2f} s")
                if source == "A":
                    time.sleep(8)
            watch.wait()
        result.timeline = watch.timeline
        result.timeline_json, result.timeline_png = watch.write()
    finally:
        with sd:
            removed = cluster.down(sd)
        say(f"torn down ({len(removed)} processes, namespaces and sockets removed)")
    return result


def summary_rows(result: DemoResult) -> list[tuple[str, str]]:
    rows = [("accelerator", result.accel),
            ("vm1->vm2 shm / lower (Mbit/s)",
             f"{result.shm_mbps:.0f} / {result.lower_mbps:.0f} "
             f"({result.shm_mbps / max(result.lower_mbps, 1e-9):.1f}x)"),
            ("vm1->vm2 TCP_RR round trip shm / lower (µs)",
             f"{result.shm_rr_us:.0f} / {result.lower_rr_us:.0f} "
             f"({result.lower_rr_us / max(result.shm_rr_us, 1e-9):.1f}x lower)")]
    for r in result.migrations:
        def fmt(v: Any, scale: float = 1.0, unit: str = "s") -> str:
            return "-" if v is None else f"{float(v) * scale:.3f} {unit}"
        rows += [
            (f"{r.source}->{r.destination}: QEMU total / downtime",
             f"{fmt(r.total_s)} / {fmt(r.downtime_ms, 1, 'ms')}"),
            (f"{r.source}->{r.destination}: unplug / plug ivshmem",
             f"{fmt(r.unplug_s)} / {fmt(r.plug_s)}"),
            (f"{r.source}->{r.destination}: path switch source / dest",
             f"{fmt(r.switch_source_s)} / {fmt(r.switch_dest_s)}"),
        ]
    tl = result.timeline
    if tl is not None:
        pb = tl.path_bytes()
        rows += [
            ("TCP stream through both moves",
             "survived" if tl.iperf_ok else f"FAILED {tl.stream_failure()}"),
            ("stream bytes on shm / lower (vm1 counters)",
             f"{pb['shm'] / 2**20:.0f} MiB / {pb['lower'] / 2**20:.0f} MiB"),
            ("20 ms pings lost", f"{tl.ping_lost} of {tl.ping_sent}"),
        ]
    if result.timeline_png:
        rows.append(("timeline plot", str(result.timeline_png)))
    return rows
