"""`Watch` stops only the iperf3 client and ping it started (issue 19).

The guest runs its own `iperf3 -s -D` (images/init); a watch that matched it
by name waited out its deadline and then killed it.  The fake guest here
keeps a process table and answers the commands a watch sends, whichever
way they name processes (by PID through /proc, or by name with pidof and
killall), so the old code fails this test and the new one passes.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from harness.experiments import watch
from harness.lab import vms
from harness.lab.state import State, StateDir

SERVER_PID = 50

IPERF_JSON = json.dumps({
    "intervals": [{"sum": {"start": 0.0, "end": 1.0, "bits_per_second": 8e6}}],
    "end": {"sum_received": {"bytes": 1_000_000}},
})


class FakeGuest:
    """A guest whose processes are a table of PID -> name, shared by sessions."""

    def __init__(self, procs: dict[int, str], log: list[str], lock: threading.Lock,
                 vm: str = "vm1", mib_reads: dict[str, int] | None = None) -> None:
        self.vm = vm
        self.mib_reads = {} if mib_reads is None else mib_reads
        self.procs = procs
        self.log = log
        self.lock = lock
        self.client_checks = self.CLIENT_CHECKS

    #: Liveness checks of the client before it ends by itself.
    CLIENT_CHECKS = 2
    #: Bytes the source's ivl0 sent between two samples (its ethtool reads).
    TX_PER_SAMPLE = 0
    tx_reads = 0
    #: Per VM, how far its clock moves between two snapshots (default 0).
    CLOCK_STEP: ClassVar[dict[str, float]] = {}
    SERVER_LOG = "-----\nServer listening on 5201 (test #2)\n"

    def snapshot(self) -> str:
        """The VM's /proc/uptime, /proc/net/snmp and /proc/net/netstat: each
        read after its first shows one more reset sent and one more abort on
        close, and the clock CLOCK_STEP later."""
        n = self.mib_reads[self.vm] = self.mib_reads.get(self.vm, -1) + 1
        up = 1000 + n * self.CLOCK_STEP.get(self.vm, 0.0)
        return (f"{up:.2f} 1900.00\nTcp: RtoAlgorithm OutRsts InErrs\nTcp: 1 {n} 0\n"
                "Udp: InDatagrams\nUdp: 7\n"
                f"TcpExt: SyncookiesSent TCPAbortOnClose\nTcpExt: 0 {n}\n")

    def __enter__(self) -> FakeGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, command: str, timeout: float | None = 60, check: bool = True) -> str:
        return self.status(command, timeout)[1]

    def status(self, command: str, timeout: float | None = 60) -> tuple[int, str]:
        with self.lock:
            self.log.append(command)
            return self._answer(command)

    def _answer(self, command: str) -> tuple[int, str]:
        if command.startswith("cat /proc/uptime /proc/net/snmp"):
            return 0, self.snapshot()
        if "/tmp/iperf3-server.log" in command:
            return 0, self.SERVER_LOG
        if command.startswith("ethtool"):
            self.tx_reads += 1
            sent = self.tx_reads * self.TX_PER_SAMPLE
            return 0, f"shm_tx_bytes: {sent}\nlower_tx_bytes: 0\n"
        if "cat /tmp/watch-iperf.json" in command:
            return 0, getattr(self, "_iperf_json", IPERF_JSON)
        if "cat /tmp/watch-ping.log" in command:
            return 0, "64 bytes from 10.77.0.2: seq=0 ttl=64 time=0.5 ms\n1 packets transmitted"
        if "iperf3 -c" in command:
            self.procs[100] = "iperf3"
            self.procs[101] = "ping"
            return 0, "100\n101\n"
        if "pidof iperf3" in command:
            return (0 if "iperf3" in self.procs.values() else 1), ""
        if "killall" in command:
            names = {n for n in ("iperf3", "ping") if re.search(rf"\b{n}\b", command)}
            for pid in [p for p, n in self.procs.items() if n in names]:
                del self.procs[pid]
            return 0, ""
        code = 0
        for pid_s in re.findall(r"kill -INT (\d+)", command):
            self.procs.pop(int(pid_s), None)
        checks = re.findall(r"/proc/(\d+)/comm", command)
        if checks and "kill" not in command:
            pid = int(checks[0])
            if pid == 100 and pid in self.procs:
                self.client_checks -= 1
                if self.client_checks <= 0:
                    del self.procs[pid]  # the client ends by itself
            code = 0 if pid in self.procs else 1
        return code, ""

    def close(self) -> None:
        pass


@pytest.fixture
def guest_procs(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[int, str], list[str]]:
    procs = {1: "init", SERVER_PID: "iperf3"}
    log: list[str] = []
    lock = threading.Lock()
    mib_reads: dict[str, int] = {}

    def fake_guest(sd: StateDir, state: State, vm: str) -> FakeGuest:
        return FakeGuest(procs, log, lock, vm, mib_reads)

    monkeypatch.setattr(vms, "guest", fake_guest)
    monkeypatch.setattr(watch, "plot", lambda tl, path: None)
    return procs, log


def test_watch_leaves_the_guests_iperf3_server_alone(
        state_dir: StateDir, tmp_path: Path,
        guest_procs: tuple[dict[int, str], list[str]]) -> None:
    procs, log = guest_procs
    w = watch.Watch(state_dir, "vm1", "vm2", duration=0.2, out_dir=tmp_path / "w")
    t0 = time.monotonic()
    with w:
        w.wait()
    took = time.monotonic() - t0
    assert procs.get(SERVER_PID) == "iperf3", f"the guest's iperf3 -s was killed: {log}"
    assert 100 not in procs and 101 not in procs, "the watch's client and ping still run"
    # The client ended after two checks: the wait must not run to its 15 s deadline.
    assert took < 5, f"watch waited {took:.1f} s for an iperf3 that had ended"
    assert w.timeline.iperf_ok
    assert w.timeline.server_log == "", "the server log is read only for a failed stream"


def test_watch_stops_a_client_that_outlives_its_deadline(
        state_dir: StateDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        guest_procs: tuple[dict[int, str], list[str]]) -> None:
    procs, log = guest_procs
    monkeypatch.setattr(FakeGuest, "CLIENT_CHECKS", 10**6)
    monkeypatch.setattr(watch, "CLIENT_GRACE", 0.5)
    w = watch.Watch(state_dir, "vm1", "vm2", duration=0.1, out_dir=tmp_path / "w")
    with w:
        pass
    assert 100 not in procs and 101 not in procs, "a client past its deadline was not stopped"
    assert procs.get(SERVER_PID) == "iperf3", f"the guest's iperf3 -s was killed: {log}"


def test_watch_start_stops_only_a_previous_watchs_processes(
        state_dir: StateDir, tmp_path: Path,
        guest_procs: tuple[dict[int, str], list[str]]) -> None:
    procs, log = guest_procs
    procs[77] = "ping"  # someone else's ping
    w = watch.Watch(state_dir, "vm1", "vm2", duration=0.1, out_dir=tmp_path / "w")
    with w:
        pass
    assert procs.get(77) == "ping", f"a ping the watch did not start was killed: {log}"
    assert procs.get(SERVER_PID) == "iperf3"


def test_parse_mib_reads_each_sections_names_and_values() -> None:
    text = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
            "Tcp: RtoAlgorithm RtoMin MaxConn OutRsts\nTcp: 1 200 -1 12\n"
            "TcpExt: SyncookiesSent TCPAbortOnData\nTcpExt: 0 3\n"
            "IpExt: InNoRoutes\nIpExt: 0\n")
    mib = watch.parse_mib(text)
    assert mib["Tcp:OutRsts"] == 12 and mib["Tcp:MaxConn"] == -1
    assert mib["TcpExt:TCPAbortOnData"] == 3 and mib["Ip:DefaultTTL"] == 64
    assert "Tcp:RtoAlgorithm" in mib and len(mib) == 9


def test_parse_mib_skips_lines_that_are_not_a_header_and_its_values() -> None:
    assert watch.parse_mib("Tcp: A B\nTcp: 1\nTcpExt: X\nIp: 5\ngarbage\n\n") == {}


def test_a_failed_stream_reports_when_it_died_and_what_each_ends_tcp_counted(
        state_dir: StateDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        guest_procs: tuple[dict[int, str], list[str]]) -> None:
    monkeypatch.setattr(FakeGuest, "_iperf_json", json.dumps({
        "error": "unable to write to stream socket: Connection reset by peer",
        "intervals": [{"sum": {"start": 0.0, "end": 1.0, "bits_per_second": 8e6}},
                      {"sum": {"start": 1.0, "end": 2.0, "bits_per_second": 8e6}}],
        "end": {}}), raising=False)
    monkeypatch.setattr(FakeGuest, "CLOCK_STEP", {"vm2": 60.0})
    w = watch.Watch(state_dir, "vm1", "vm2", duration=0.2, out_dir=tmp_path / "w")
    with w:
        w.wait()
    tl = w.timeline
    assert not tl.iperf_ok and tl.iperf_last_s == 2.0
    assert tl.tcp["vm1"]["Tcp:OutRsts"] == 1 and tl.tcp["vm2"]["TcpExt:TCPAbortOnClose"] == 1
    why = tl.stream_failure()
    assert "Connection reset by peer" in why and "after 2.0 s" in why
    assert "vm2: Tcp:OutRsts +1, TcpExt:TCPAbortOnClose +1" in why, why
    # vm2's clock jumped a minute; vm1's stood still over the watch's second
    assert 59 < tl.clock_skew_s["vm2"] <= 60 and -5 < tl.clock_skew_s["vm1"] <= 0
    assert "vm2 +5" in why and "Server listening on 5201 (test #2)" in why, why
    assert json.loads((tmp_path / "w" / "timeline.json").read_text())["tcp"] == tl.tcp


INTERRUPTED_JSON = json.dumps({
    "error": watch.IPERF_INTERRUPTED,
    "intervals": [{"sum": {"start": 0.0, "end": 1.0, "bits_per_second": 8e6}}],
    "end": {"sum_sent": {"bytes": 900_000}, "sum_received": {"bytes": 0}}})


def test_end_after_interrupts_the_client_and_counts_that_as_a_clean_end(
        state_dir: StateDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        guest_procs: tuple[dict[int, str], list[str]]) -> None:
    procs, _ = guest_procs
    monkeypatch.setattr(FakeGuest, "CLIENT_CHECKS", 10**6)
    monkeypatch.setattr(FakeGuest, "_iperf_json", INTERRUPTED_JSON, raising=False)
    w = watch.Watch(state_dir, "vm1", "vm2", duration=60, out_dir=tmp_path / "w")
    t0 = time.monotonic()
    with w:
        w.end_after(0.2)
    assert time.monotonic() - t0 < 10, "end_after waited for the duration"
    tl = w.timeline
    assert tl.iperf_ok and tl.iperf_ended_early and tl.iperf_bytes == 900_000, tl
    assert 100 not in procs and procs.get(SERVER_PID) == "iperf3"


def test_an_interrupt_the_watch_did_not_plan_is_a_failed_stream(
        state_dir: StateDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        guest_procs: tuple[dict[int, str], list[str]]) -> None:
    # a client past its deadline is stopped the same way, but that is a failure
    monkeypatch.setattr(FakeGuest, "CLIENT_CHECKS", 10**6)
    monkeypatch.setattr(watch, "CLIENT_GRACE", 0.5)
    monkeypatch.setattr(FakeGuest, "_iperf_json", INTERRUPTED_JSON, raising=False)
    w = watch.Watch(state_dir, "vm1", "vm2", duration=0.1, out_dir=tmp_path / "w")
    with w:
        w.wait()
    tl = w.timeline
    assert not tl.iperf_ok and not tl.iperf_ended_early
    assert watch.IPERF_INTERRUPTED in tl.stream_failure()


ABORTED = ("malloc(): unaligned tcache chunk detected\n"
           "iperf3: malloc.c:2617: sysmalloc: Assertion `(old_top == initial_top (av) ...' failed.")


@pytest.mark.parametrize("moving", [True, False])
def test_an_iperf3_killed_by_the_watchs_own_interrupt_is_judged_by_the_path(
        state_dir: StateDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        guest_procs: tuple[dict[int, str], list[str]], moving: bool) -> None:
    """iperf3 3.12 can abort in its SIGINT handler (glibc's malloc assertion): with
    the stream still moving when end_after() interrupted it, that is an early end;
    with the source silent, still a failed stream."""
    monkeypatch.setattr(FakeGuest, "CLIENT_CHECKS", 10**6)
    monkeypatch.setattr(FakeGuest, "TX_PER_SAMPLE", 1_000_000 if moving else 0)
    monkeypatch.setattr(FakeGuest, "_iperf_json", ABORTED, raising=False)
    w = watch.Watch(state_dir, "vm1", "vm2", duration=60, out_dir=tmp_path / "w")
    with w:
        w.end_after(1.2)  # a few samples
    tl = w.timeline
    if moving:
        assert tl.iperf_ok and tl.iperf_ended_early and "sysmalloc" in tl.iperf_aborted, tl
        assert tl.iperf_bytes >= 1_000_000
    else:
        assert not tl.iperf_ok and not tl.iperf_aborted
        assert "no JSON from iperf3" in tl.stream_failure()
