"""Live migration with the path switched under a running TCP connection."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from harness import migrate
from harness.errors import MigrationError
from harness.experiments.watch import Watch
from harness.lab import memcheck, paths

from .lab import ROUND_TRIP_MAX_S, Lab
from .refused_plug import a_refused_plug_leaves_the_vm_on_the_destination


def shm_and_lower(lab: Lab, vm: str) -> tuple[int, int]:
    c = paths.counters(lab.guest(vm))
    return c["shm_tx_bytes"], c["lower_tx_bytes"]


def moved_over(lab: Lab, src: str, dst: str, seconds: int = 2) -> tuple[int, int]:
    """(shm, lower) bytes *src* sent while streaming to *dst*."""
    shm0, low0 = shm_and_lower(lab, src)
    lab.iperf3(src, dst, seconds=seconds)
    shm1, low1 = shm_and_lower(lab, src)
    return shm1 - shm0, low1 - low0


@pytest.mark.versions
def test_stream_survives_a_round_trip_migration(
    lab: Lab, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    mac2 = lab.topo.vm("vm2").mac
    paths.wait_peer(lab.guest("vm1"), mac2, shm=True)
    shm, lower = moved_over(lab, "vm1", "vm2")
    assert shm > 1_000_000 and lower < shm / 50, (shm, lower)

    reports = []
    with Watch(lab.sd, "vm1", "vm2", duration=ROUND_TRIP_MAX_S, out_dir=tmp_path) as watch:
        time.sleep(3)
        reports.append(lab.migrate("vm2", "A", "B", progress=watch.progress))
        time.sleep(6)
        after_first = watch.timeline.samples[-1]
        reports.append(lab.migrate("vm2", "B", "A", progress=watch.progress))
        watch.end_after(6)  # of traffic back home
    tl = watch.timeline
    record_property("ping_lost", f"{tl.ping_lost}/{tl.ping_sent}")
    record_property("downtime_ms", [r.downtime_ms for r in reports])
    record_property("switch_s", [(r.switch_source_s, r.switch_dest_s) for r in reports])

    assert tl.iperf_ok, tl.stream_failure()  # same iperf3 run, no reconnect
    assert all(r.ok for r in reports)
    # While vm2 was on B the stream left shared memory for the wire ...
    before_move = next(s for s in tl.samples if s.t >= 2)
    assert after_first.lower_tx_bytes - before_move.lower_tx_bytes > 500_000
    # ... and came back to shared memory after the return.
    last = tl.samples[-1]
    assert last.shm_tx_bytes - after_first.shm_tx_bytes > 1_000_000
    # Ping loss bounded by the moves' downtime (20 ms probes) plus slack.
    budget = sum((r.downtime_ms or 0) / 20 for r in reports) + 2 * len(reports) + 10
    assert tl.ping_lost <= budget, (tl.ping_lost, budget, tl.lost_at)

    # Back home, vm1 <-> vm2 is on shared memory again.
    shm, lower = moved_over(lab, "vm1", "vm2")
    assert shm > 1_000_000 and lower < shm / 50, (shm, lower)


def test_killing_the_destination_keeps_the_source_on_shared_memory(
    lab: Lab, record_property: pytest.RecordProperty
) -> None:
    before = lab.state.vms["vm2"]
    pidfile = lab.sd.file(f"qemu-vm2-g{before.generation + 1}.pid")
    statuses: list[str] = []  # the source's migration status, in the order reported
    killed_at: list[int] = []  # index in statuses of the answer the kill followed

    def progress(phase: str, info: dict[str, Any]) -> None:
        # Called in the migration's thread: "transfer" carries the source's
        # query-migrate answer, "migration" its MIGRATION events.
        if phase not in ("transfer", "migration"):
            return
        statuses.append(str(info["status"]))
        if (phase == "transfer" and not killed_at and info["status"] == "active"
                and float(info["mib"]) > 0):  # into the (throttled) RAM transfer
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
            killed_at.append(len(statuses) - 1)
            record_property("killed_after_mib", round(float(info["mib"]), 1))

    failure: MigrationError | None = None
    with lab.sd:
        try:
            migrate.migrate(lab.sd, "vm2", "A", "B", max_bandwidth_mib=4, progress=progress)
        except MigrationError as exc:
            failure = exc
    assert killed_at, f"the source never said 'active' with RAM sent: {statuses}"
    # The kill followed an 'active' answer, and the source's migration then
    # failed without completing in between: it was active when the kill landed.
    after_kill = statuses[killed_at[0] + 1:]
    assert "completed" not in after_kill and after_kill[-1:] == ["failed"], statuses
    assert failure is not None and "migration failed" in str(failure), failure

    after = lab.state.vms["vm2"]
    assert after.host == "A" and after.status.value == "running" and after.ivshmem
    assert after.proc == before.proc
    lab.drop("vm2")
    assert lab.guest("vm2").run("hostname").strip() == "vm2"
    paths.wait_peer(lab.guest("vm1"), lab.topo.vm("vm2").mac, shm=True)
    shm, lower = moved_over(lab, "vm1", "vm2")
    assert shm > 1_000_000 and lower < shm / 50, (shm, lower)


def test_a_plug_refused_after_the_move_leaves_the_vm_on_the_destination(
    lab: Lab, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    report = a_refused_plug_leaves_the_vm_on_the_destination(lab, tmp_path, "qemu")
    record_property("report", {k: v for k, v in report.as_dict().items() if k != "events"})
    try:
        # plugged by hand on B, the migrated VM reaches B's VM over shared memory
        paths.wait_peer(lab.guest("vm2"), lab.mac("vm3"), shm=True)
        shm, lower = moved_over(lab, "vm2", "vm3")
        assert shm > 1_000_000 and lower < shm / 50, (shm, lower)
        # and vm1 (left behind on A) reaches vm2 across the wire
        shm, lower = moved_over(lab, "vm1", "vm2")
        assert lower > 1_000_000 and shm == 0, (shm, lower)
    finally:
        lab.migrate("vm2", "B", "A")
    assert lab.state.vms["vm2"].ivshmem


def test_migration_keeps_every_guest_write(
    lab: Lab, record_property: pytest.RecordProperty
) -> None:
    # QEMU 7.2 under TCG loses stores during migration unless the RAM size
    # steers its dirty sync to the path that resets the TLBs (accel.py).
    # A guest that keeps writing finds every write, and lives, on arrival.
    writer = memcheck.start(lab.guest("vm2"))
    reports = []
    try:
        time.sleep(1)
        for src, dst in (("A", "B"), ("B", "A")):
            reports.append(lab.migrate("vm2", src, dst))
            time.sleep(1)
    finally:
        result = memcheck.stop(lab.guest("vm2"), writer)  # raises if it died
    record_property("migrate_s", [round(r.migrate_s, 2) for r in reports])
    assert all(r.ok for r in reports)
    assert result.ok, result.detail
    assert result.sweeps > 100, result  # it wrote all along, not just before the moves
