"""`harness watch` leaves the guest's own iperf3 server running (issue 19)."""

from __future__ import annotations

import time
from pathlib import Path

from harness.experiments import watch as watch_mod
from harness.experiments.watch import Watch

from .lab import Lab, received_bytes


def test_a_watch_stops_its_client_and_leaves_the_server(lab: Lab, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with Watch(lab.sd, "vm1", "vm2", duration=3, out_dir=tmp_path) as w:
        w.wait()
    took = time.monotonic() - t0
    assert w.timeline.iperf_ok, w.timeline.stream_failure()
    # The client ends by itself a second after the watch: no wait to the deadline.
    assert took < 3 + watch_mod.CLIENT_GRACE - 5, f"the watch took {took:.1f} s"
    # vm1's `iperf3 -s -D` (images/init) still answers: vm2 streams to it.
    assert received_bytes(lab.iperf3("vm2", "vm1", seconds=1)) > 0
    assert lab.guest("vm1").run("ps -o comm | grep -c '^iperf3$' || true").strip() == "1"
