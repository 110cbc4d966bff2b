"""The failure rule after a completed migration, the same on every backend.

The destination host's ivloop-server is filled with protocol clients of
our own (``tests/server/fakeclient.py``, the same handshake QEMU does), so
it refuses the migrated VM's new device with its "all slots are in use"
answer.  The VM must stay on the destination on its lower NIC, with its
TCP stream alive; the source QEMU must be gone (never resumed); the report
must say incomplete and name the command that finishes the move, and that
command must put the VM on shared memory once the server has room.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from harness import cluster
from harness.errors import HarnessError, IncompleteMigrationError
from harness.experiments.watch import Watch
from harness.lab import paths
from ivloop_libvirt.reports import PHASES, MigrationReport

from ..server.fakeclient import FakeQemu
from .lab import Lab


@contextlib.contextmanager
def server_full(lab: Lab, host: str) -> Iterator[int]:
    """*host*'s server with every free slot taken; yields how many were free."""
    sock = Path(lab.state.hosts[host].server_socket)
    members: list[FakeQemu] = []
    try:
        while len(members) < 64:
            client = FakeQemu.connect(sock)
            client.sock.settimeout(10)
            first = client.sock.recv(8, socket.MSG_PEEK)
            if len(first) == 8 and struct.unpack("<q", first)[0] == -1:
                assert client.refused(), "the server's refusal is not the one QEMU reads"
                client.close()
                break
            members.append(client)
            client.handshake()
        yield len(members)
    finally:
        for client in members:
            client.close()


def a_refused_plug_leaves_the_vm_on_the_destination(
        lab: Lab, tmp_path: Path, backend: str) -> MigrationReport:
    """vm2 moves A -> B while vm1 streams to it; B's server is full.  Returns the report."""
    before = lab.state.vms["vm2"]
    assert before.host == "A" and before.ivshmem and before.proc is not None
    mac2 = lab.mac("vm2")
    with server_full(lab, "B") as free:
        assert free >= 1
        with Watch(lab.sd, "vm1", "vm2", duration=60, out_dir=tmp_path) as watch:
            time.sleep(3)
            with pytest.raises(IncompleteMigrationError) as info:
                lab.migrate("vm2", "A", "B", progress=watch.progress)
            time.sleep(4)
            moved = watch.timeline.samples[-1]
            watch.end_after(4)
    report = info.value.report
    assert report is not None
    tl = watch.timeline
    # the stream survived, and after the move it ran over the lower path
    assert tl.iperf_ok, tl.stream_failure()
    assert tl.samples[-1].lower_tx_bytes - moved.lower_tx_bytes > 100_000
    assert tl.samples[-1].shm_tx_bytes == moved.shm_tx_bytes
    # one report schema and one set of phase names on every backend
    assert set(report.as_dict()) == {f.name for f in fields(MigrationReport)}
    assert report.backend == backend and report.vm == "vm2"
    assert (report.completed, report.ok, report.failed_phase) == (True, False, "plug")
    assert report.source_restored is None
    assert report.hint.endswith("harness plug vm2"), report.hint
    assert "runs there without shared memory" in str(info.value)
    events = [e for _, e in report.events]
    assert events[0] == "unplug on source" and events[-1] == "source stopped", events
    assert all(getattr(report, f"{p}_s") >= 0 for p in PHASES)
    # the VM is on B, on its lower NIC; the source QEMU is gone
    after = lab.state.vms["vm2"]
    assert after.host == "B" and after.status.value == "running" and not after.ivshmem
    assert after.proc is not None and after.proc.alive() and after.proc != before.proc
    assert not before.proc.alive()
    lab.drop("vm2")
    assert lab.guest("vm2").run("hostname").strip() == "vm2"
    # the hint's command, once the server has room, finishes the move (the
    # server frees a slot once its leave is announced: allow it a moment)
    deadline = time.monotonic() + 20
    while True:
        try:
            with lab.sd:
                cluster.set_ivshmem(lab.sd, "vm2", True)
            break
        except HarnessError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert lab.state.vms["vm2"].ivshmem
    paths.wait_peer(lab.guest("vm3"), mac2, shm=True)
    return report
