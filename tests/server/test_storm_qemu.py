"""The server at full house (issue 29) with real QEMUs among the members.

Up to MAX_QEMUS real ``qemu-system-x86_64`` processes, each with the stock
``ivshmem-doorbell`` device on the server's socket, share a 64-member house
(storm.py) with protocol clients (FakeQemu), through a storm that mixes
QEMUs started (alone, and several at once), killed with SIGKILL, quit over
QMP, killed right after start (before or after they connected, by chance)
and killed the moment the server shows them joined, and refused at full
house, with the protocol clients' joins, leaves and killed setups.

The QEMUs need no guest: each runs paused (``-S``, TCG, 32M, no default
devices), so what they do is only what QEMU's ivshmem does on its own --
read its setup in device realize, then the notices from its main loop.
The server runs in its default mode, the one real QEMUs get (no "peer
left" message, after which QEMU double-frees): a member learns of a leave
from the directory and the membership doorbell only.

What each operation must do is predicted and checked as it happens (ID,
slot, generations, the QEMU's PID in the server's join record, its exit
status); only a QEMU killed right after its start has an outcome the test
cannot know in advance (did it connect before it died?), which the
server's log then tells, in the server's order, and the test checks that
against the directory.  After every operation the directory is checked;
every CHECK_EVERY operations, every member's view: each protocol client's
list of peers, each QEMU's eventfds (by the kernel's eventfd IDs, the same
objects in every process), the server's.

Numbers reported: QEMU join time (start of the process until the server's
directory shows its slot), protocol-client join time, the server's fds and
RSS before and after the storm, and the outcome counts.  The storm is
seeded: the seed is printed and recorded; ``IVLOOP_STORM_SEED=N`` replays
one, as far as QEMU's own timing lets it.

test_a_qemu_outlives_more_peer_joins_than_its_fd_limit: in the default mode
QEMU keeps every departed peer's eventfds, so the server hands a departed
ID on with them; a QEMU under a small fd limit outlives many joins.

Not marked ``vm``: no guest boots, and it needs neither root nor the guest
image; the paused QEMUs cost about what the protocol clients of
test_storm.py do, so it runs with the unit tests, which ``make deps``
gives their QEMU.  ``$IVLOOP_QEMU`` picks another binary, as for the harness.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from harness.errors import QemuBinaryError
from harness.lab import qemu
from ivloop_server import abi

from .conftest import ServerProcess
from .fakeclient import FakeQemu
from .storm import (
    MAX_PEERS,
    SERVER_ARGS,
    SYNC_TIMEOUT,
    House,
    ServerLog,
    ServerUse,
    assert_log_agrees,
    assert_server_flat,
    eventfd_ids,
    fake_op,
    fill,
    latency_numbers,
    report,
    run_storm,
    storm_seed,
)

#: QEMUs at once, at most (the build machine has 2 cores; paused, each
#: costs some 40 MiB and nothing of them).
MAX_QEMUS = 8
#: QEMUs started before the baseline (present into the storm, until it takes
#: them out), and again at its end.
FIRST_QEMUS = 4
STORM_OPS = 600
#: Of the storm's operations, about this share are QEMU operations.
QEMU_SHARE = 0.4
CHECK_EVERY = 25
#: A QEMU's start-up to its join is some 25 ms on the build machine; this
#: is for a loaded one.
QEMU_TIMEOUT = 20.0
#: A median QEMU join time above this is a server that makes QEMU wait
#: (a blocking setup, a timer), not a slow QEMU.
QEMU_MEDIAN_JOIN_LIMIT = 1.0
#: QEMU's realize error when the server turns it away (hw/misc/ivshmem.c).
REFUSED_BY_SERVER = "server sent version -1"
#: The server's log records of membership (the others: nic, start, stop ...).
MEMBERSHIP_EVENTS = ("join", "leave", "refuse")


@dataclass
class Qemu:
    """One QEMU process: its stock ivshmem-doorbell on the server's socket, a QMP socket."""

    name: str
    proc: subprocess.Popen[bytes]
    qmp: Path
    log: Path
    started: float  # time.perf_counter() just before it was started

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self) -> int:
        try:
            return self.proc.wait(QEMU_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU {self.name} did not exit: {self.output()}") from None


class Launch(Protocol):
    """Start a QEMU on a server socket (with an fd limit, if given)."""

    def __call__(self, server: Path, nofile: int | None = None, /) -> Qemu: ...


def qemu_argv(binary: str, name: str, server: Path, qmp: Path,
              nofile: int | None = None) -> list[str]:
    """A paused, guest-less QEMU with the device as the harness gives it (templates/qemu.j2);
    with ``nofile``, that RLIMIT_NOFILE (prlimit execs QEMU: the PID is QEMU's)."""
    limit = ["prlimit", f"--nofile={nofile}:{nofile}"] if nofile is not None else []
    return [
        *limit, binary, "-name", name, "-machine", "pc", "-accel", "tcg", "-S",
        "-nodefaults", "-no-user-config", "-display", "none", "-m", "32",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-chardev", f"socket,id={qemu.IVSHMEM_CHARDEV},path={server}",
        "-device", f"ivshmem-doorbell,id={qemu.IVSHMEM_ID},chardev={qemu.IVSHMEM_CHARDEV},"
                   f"vectors={abi.IVL_NR_VECTORS}",
    ]  # fmt: skip


@pytest.fixture
def qemu_binary() -> str:
    try:
        return qemu.probe().path
    except QemuBinaryError as exc:
        pytest.skip(f"no QEMU to run: {exc}")


@pytest.fixture
def launch_qemu(tmp_path: Path, qemu_binary: str) -> Iterator[Launch]:
    """Start QEMUs on a server socket; each one started is killed (if alive) and reaped."""
    started: list[Qemu] = []

    def launch(server: Path, nofile: int | None = None) -> Qemu:
        n = len(started)
        name, qmp, log = f"storm{n}", tmp_path / f"qmp{n}.sock", tmp_path / f"qemu{n}.log"
        with log.open("wb") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(qemu_argv(qemu_binary, name, server, qmp, nofile),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out)  # fmt: skip
        started.append(Qemu(name, proc, qmp, log, t0))
        return started[-1]

    yield launch
    for q in started:
        if q.proc.poll() is None:
            q.proc.kill()
    for q in started:
        q.proc.wait(QEMU_TIMEOUT)


class QemuHouse(House):
    """A house in the server's default mode, some of whose members are real QEMUs."""

    def __init__(self, sp: ServerProcess, launch: Launch) -> None:
        super().__init__(sp, leave_notices=False)
        self._launch = launch
        self.qemus: dict[int, Qemu] = {}  # QEMU peer ID -> the process
        self.log = ServerLog(sp.stderr_path)
        self.records: list[dict[str, Any]] = []  # its joins, leaves and refusals so far
        self.qemu_latencies: list[float] = []  # QEMUs started alone
        self.burst_latencies: list[float] = []  # QEMUs started together
        self.started = 0
        self.max_qemu_eventfds = 0

    @property
    def room(self) -> int:
        """How many more QEMUs may join now."""
        return min(MAX_QEMUS - len(self.qemus), MAX_PEERS - self.size)

    def launch(self, nofile: int | None = None) -> Qemu:
        self.started += 1
        return self._launch(self.path, nofile)

    # -- the server's word ----------------------------------------------------

    def mark(self) -> int:
        """Where the records of what happens from now on start (see :meth:`records_of`)."""
        self._read_log()
        return len(self.records)

    def _read_log(self) -> None:
        self.records += [r for r in self.log.read() if r.get("event") in MEMBERSHIP_EVENTS]

    def records_of(self, mine: Callable[[dict[str, Any]], bool],
                   done: Callable[[list[dict[str, Any]]], bool], what: str,
                   since: int = 0) -> list[dict[str, Any]]:
        """The server's join, leave and refusal records from ``since`` on that are
        ``mine``, in the server's order, once they are ``done``.

        The log lags the directory (a change is logged after it is made), so
        records are picked by whom they name (a PID, an ID), not by when they
        were read; ``since`` keeps out a PID's earlier owner.
        """
        deadline = time.monotonic() + QEMU_TIMEOUT
        while True:
            self._read_log()
            got = [r for r in self.records[since:] if mine(r)]
            if done(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"the server's log does not show {what}: {got}")
            time.sleep(0.002)

    def joined_as(self, q: Qemu, peer_id: int, since: int) -> None:
        """The server's one join record of ``q``'s process since ``since`` gives it
        ``peer_id`` and names its -name (IDs are handed on: PIDs pick records)."""
        [rec] = self.records_of(lambda r: r["event"] == "join" and r["pid"] == q.pid, bool,
                                f"the join of peer {peer_id}", since)  # fmt: skip
        assert (rec["peer"], rec["qemu_name"]) == (peer_id, q.name), rec

    # -- QEMU operations ----------------------------------------------------------

    def until_present(self, qemus: list[Qemu], slots: list[int], ids: set[int]) -> dict[int, float]:
        """Wait until each of ``slots`` shows present with one of ``ids``; when each did."""
        seen: dict[int, float] = {}
        deadline = time.monotonic() + QEMU_TIMEOUT
        while len(seen) < len(slots):
            for slot in slots:
                present, peer_id, _ = self.slot_words(slot)
                if slot not in seen and present and peer_id in ids:
                    seen[slot] = time.perf_counter()
            for q in qemus:
                assert q.proc.poll() is None, f"QEMU {q.name} exited: {q.output()}"
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"slots {sorted(set(slots) - set(seen))} not taken after {QEMU_TIMEOUT} s"
                )
            time.sleep(0.0005)
        return seen

    def qemu_join(self, nofile: int | None = None) -> None:
        """A QEMU starts and joins: the next ID, the lowest free slot; every member told."""
        assert self.room > 0
        peer_id, slot = self.expected_id, self.lowest_free_slot()
        since = self.mark()
        q = self.launch(nofile)
        seen = self.until_present([q], [slot], {peer_id})
        self.qemu_latencies.append(seen[slot] - q.started)
        self._admitted(peer_id, slot)
        self.qemus[peer_id] = q
        self.sync()
        self.joined_as(q, peer_id, since)
        self.expect_told(peer_id)

    def qemu_burst(self, count: int) -> None:
        """``count`` QEMUs start at once: the next IDs, in the order they connect, get the
        lowest free slots in turn; which QEMU is which, the server's log tells."""
        assert 0 < count <= self.room
        ids, slots = self.upcoming_ids(count), self.free_slots()[:count]
        since = self.mark()
        qs = [self.launch() for _ in range(count)]
        seen = self.until_present(qs, slots, set(ids))
        by_pid = {q.pid: q for q in qs}
        joins = self.records_of(lambda r: r["event"] == "join" and r["pid"] in by_pid,
                                lambda got: len(got) == count, f"{count} joins", since)
        assert [r["peer"] for r in joins] == ids, joins
        for rec in joins:
            q = by_pid[rec["pid"]]
            self._admitted(rec["peer"], rec["slot"])
            self.qemus[rec["peer"]] = q
            self.burst_latencies.append(seen[rec["slot"]] - q.started)
        self.sync()
        for peer_id in ids:
            self.expect_told(peer_id)

    def qemu_refused(self) -> None:
        """A QEMU starts at full house: refused, it fails its device realize and exits."""
        assert self.full
        since = self.mark()
        q = self.launch()
        assert q.wait() == 1, q.output()
        assert REFUSED_BY_SERVER in q.output(), q.output()
        self.refusals += 1
        self.sync()
        self.records_of(lambda r: r["pid"] == q.pid,
                        lambda got: [r["event"] for r in got] == ["refuse"], "its refusal", since)

    def go(self, peer_id: int) -> None:
        """A QEMU member is killed (SIGKILL: the kernel closes its connection)."""
        q = self.qemus.pop(peer_id, None)
        if q is None:
            super().go(peer_id)
            return
        q.proc.kill()
        assert q.wait() == -signal.SIGKILL, q.output()

    def qemu_quit(self, peer_id: int) -> None:
        """A QEMU member quits (QMP quit): a clean exit closes its connection."""
        self.clear_rings()
        slot, q = self.slot_of.pop(peer_id), self.qemus.pop(peer_id)
        qemu.qmp_run(q.qmp, "quit")
        assert q.wait() == 0, q.output()
        self.left([peer_id], [slot])

    def qemu_killed_at_join(self) -> str:
        """A QEMU is killed the moment the directory shows it joined; returns how the
        server saw it go (the leave's reason: its setup could not be sent, or it
        disconnected after)."""
        assert self.room > 0
        peer_id, slot = self.expected_id, self.lowest_free_slot()
        # (The join rings the members too, so the doorbell check of the
        # leave below cannot fail for this operation alone.)
        self.clear_rings()
        since = self.mark()
        q = self.launch()
        seen = self.until_present([q], [slot], {peer_id})
        q.proc.kill()
        self.qemu_latencies.append(seen[slot] - q.started)
        assert q.wait() == -signal.SIGKILL, q.output()
        self._admitted(peer_id, slot)
        self.joined_as(q, peer_id, since)
        del self.slot_of[peer_id]
        self.left([peer_id], [slot])
        [rec] = self.records_of(lambda r: r["event"] == "leave" and r["pid"] == q.pid, bool,
                                f"the leave of peer {peer_id}", since)  # fmt: skip
        assert rec["peer"] == peer_id, rec
        return str(rec["reason"])

    def qemu_killed_early(self, delay: float) -> str:
        """A QEMU is killed ``delay`` s after its start, then a protocol client connects.

        Whether the QEMU connected before it died is chance.  The client's
        connection comes after any it made, and the server takes them in
        order, so by the client's answer the server has admitted or refused
        the QEMU, or never saw it; the log says which, in the server's order.
        """
        full = self.full
        since = self.mark()
        q = self.launch()
        time.sleep(delay)
        q.proc.kill()
        status = q.wait()
        assert status == -signal.SIGKILL or (full and status == 1), (status, q.output())
        client: FakeQemu | None = None
        try:
            if full:
                self.refused_join()
            else:
                client = FakeQemu.join(self.path)

            barrier = client.own_id if client is not None else None

            def mine(rec: dict[str, Any]) -> bool:
                return bool(rec["pid"] == q.pid
                            or (rec["event"] == "join" and rec["peer"] == barrier))

            def complete(got: list[dict[str, Any]]) -> bool:
                if barrier is None:  # refused at full house: all was logged before
                    return True
                its = [r["event"] for r in got if r["pid"] == q.pid]
                # the client's join, and a QEMU that joined leaves, too
                return len(got) > len(its) and its != ["join"]

            recs = self.records_of(mine, complete, "the QEMU's and the client's records", since)
            outcome = "not connected"
            for rec in recs:
                if rec["pid"] == q.pid and rec["event"] == "join":
                    self._admitted(rec["peer"], rec["slot"])
                    outcome, qemu_id = "joined", rec["peer"]
                elif rec["pid"] == q.pid and rec["event"] == "leave":
                    assert outcome == "joined" and rec["peer"] == qemu_id, rec
                    self._departed([qemu_id])
                    self._bump(self.slot_of.pop(qemu_id), 1)
                elif rec["pid"] == q.pid and rec["event"] == "refuse":
                    assert full, rec
                    outcome = "refused"
                    self.refusals += 1
                elif client is not None and rec["peer"] == client.own_id:
                    live = set(self.slot_of)
                    self._admitted(rec["peer"], rec["slot"])
                    assert client.my_slot() == rec["slot"]
                    assert set(client.peers) == live, "the setup names every live member"
                    self.fakes[rec["peer"]] = client
                    client = None
                assert rec.get("generation", self.generation) == self.generation, rec
            assert client is None or full, "the client's join is not in the log"
        finally:
            if client is not None and client.own_id not in self.fakes:
                client.close()
        self.sync()
        return outcome

    def qemu_op(self, rng: random.Random, rising: bool) -> str:
        """One QEMU operation; returns its name.  Joins are likelier while ``rising``."""
        pick = rng.random()
        # (With one slot free, the QEMU killed early and the client after it
        # might compete for it.)
        if pick < 0.2 and self.size != MAX_PEERS - 1:
            typical = statistics.median(self.qemu_latencies) if self.qemu_latencies else 0.05
            return "qemu killed early: " + self.qemu_killed_early(rng.uniform(0, typical))
        if pick < 0.3 and self.room:
            return "qemu killed at join: " + self.qemu_killed_at_join()
        if self.qemus and (not self.room or rng.random() < (0.3 if rising else 0.7)):
            peer_id = rng.choice(sorted(self.qemus))
            if rng.random() < 0.4:
                self.qemu_quit(peer_id)
                return "qemu quit"
            if rng.random() < 0.3 and self.size >= 2:  # with others, at once
                others = sorted(set(self.slot_of) - {peer_id})
                self.leave(peer_id, *rng.sample(others, rng.randint(1, min(4, len(others)))))
                return "qemu killed with others"
            self.leave(peer_id)
            return "qemu killed"
        if self.full:
            self.qemu_refused()
            return "qemu refused"
        if self.room >= 2 and rng.random() < 0.25:
            self.qemu_burst(rng.randint(2, min(3, self.room)))
            return "qemu burst"
        self.qemu_join()
        return "qemu join"

    # -- checking -------------------------------------------------------------

    def check(self) -> None:
        """Every view (House.check), and each QEMU's (:meth:`expect_qemus_hold`)."""
        super().check()
        self.expect_qemus_hold()

    def expect_qemus_hold(self) -> None:
        """Every QEMU is alive and holds every live member's doorbells among its eventfds
        (once it has read what it was sent)."""
        members = self.vector_ids()
        for peer_id, q in self.qemus.items():
            deadline = time.monotonic() + SYNC_TIMEOUT
            while True:
                assert q.proc.poll() is None, f"QEMU {peer_id} ({q.name}) exited: {q.output()}"
                assert "Too many eventfd" not in q.output(), (
                    f"QEMU {peer_id} ({q.name}) was sent a second set of eventfds: {q.output()}"
                )
                held = set(eventfd_ids(q.pid).values())
                missing = sorted(p for p, ids in members.items() if not ids <= held)
                if not missing:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"QEMU {peer_id} ({q.name}) holds no eventfds of members {missing}"
                    )
                time.sleep(0.005)
            self.max_qemu_eventfds = max(self.max_qemu_eventfds, len(held))


def mixed_op(house: House, rng: random.Random, rising: bool) -> str:
    assert isinstance(house, QemuHouse)
    if rng.random() < QEMU_SHARE:
        return house.qemu_op(rng, rising)
    return fake_op(house, rng, rising)


@pytest.fixture
def qemu_house(spawn: Callable[..., ServerProcess], launch_qemu: Launch) -> Iterator[QemuHouse]:
    h = QemuHouse(spawn(*SERVER_ARGS, notices=False), launch_qemu)
    try:
        yield h
    finally:
        h.close()


def test_storm_of_qemus_and_clients_keeps_every_view_consistent_and_the_server_flat(
    qemu_house: QemuHouse, record_property: Callable[[str, object], None]
) -> None:
    """FIRST_QEMUS QEMUs and protocol clients fill the house; a QEMU is refused;
    STORM_OPS operations in seeded order, some QEMU_SHARE of them QEMUs'.

    Asserted: each operation as it happens and the directory after each
    (see the module docstring); every CHECK_EVERY operations and at the
    end, every member's view; then, at full house again (FIRST_QEMUS QEMUs
    among the members if there is room), the server's fds exactly as at the
    baseline and its private RSS within the slack; every QEMU left quits
    cleanly; a median QEMU join below QEMU_MEDIAN_JOIN_LIMIT, a clean stop
    of the server, and a log that agrees.
    """
    house = qemu_house
    rng = storm_seed(record_property)
    for _ in range(FIRST_QEMUS):
        house.qemu_join()
    fill(house)  # the baseline is taken at full house
    house.check()
    before = ServerUse.of(house.pid)

    started = time.monotonic()
    house.qemu_refused()  # (the storm itself reaches full house only now and then)
    ops = run_storm(house, rng, STORM_OPS, mixed_op, CHECK_EVERY)
    ops["qemu refused"] += 1
    while len(house.qemus) < FIRST_QEMUS and house.room:
        house.qemu_join()
    fill(house)
    house.check()
    house.quiet()
    storm_time = time.monotonic() - started
    after = ServerUse.settled_like(house.pid, before)
    report({
        "storm_seconds": round(storm_time, 2),
        "storm_ops": dict(sorted(ops.items())),
        "joins": house.admitted,
        "ids_given_out": house.next_id,
        "refusals": house.refusals,
        "qemus_started": house.started,
        "qemus_at_the_end": len(house.qemus),
        **latency_numbers("qemu_join", house.qemu_latencies),
        **latency_numbers("qemu_burst_join", house.burst_latencies),
        **latency_numbers("client_join", house.latencies),
        "qemu_max_eventfds": house.max_qemu_eventfds,
        **before.numbers("before"),
        **after.numbers("after"),
    }, record_property)  # fmt: skip

    assert_server_flat(before, after, house.admitted - MAX_PEERS)
    # Every member that left hung up, so its ID was handed on: no more IDs
    # than the most members at once, and no QEMU holds more doorbells.
    assert house.next_id <= MAX_PEERS, f"{house.next_id} IDs given out for {MAX_PEERS} slots"
    # Every QEMU that lived through the storm quits cleanly.
    for peer_id in sorted(house.qemus):
        house.qemu_quit(peer_id)
    median = statistics.median(house.qemu_latencies)
    assert median < QEMU_MEDIAN_JOIN_LIMIT, f"median QEMU join {median * 1000:.0f} ms"
    assert house.sp.terminate() == 0
    assert_log_agrees(house)


#: RLIMIT_NOFILE of the QEMU below: it holds some 14 fds of its own ...
SMALL_FD_LIMIT = 64
#: ... and, were every joiner's ID new, 2 more for each of these peer joins:
#: more than fit.
PEER_JOINS = 40


def test_a_qemu_outlives_more_peer_joins_than_its_fd_limit(qemu_house: QemuHouse) -> None:
    """No "peer left" message reaches QEMU in the default mode, so QEMU never closes a
    departed peer's eventfds.  Were each joiner given a new ID, a long-lived VM on
    a busy host would collect them up to its RLIMIT_NOFILE (1024 unless raised:
    some 500 joins); then, by what QEMU 7.2 does, with its fd table full the next
    join kills it (SIGABRT, "double free or corruption"), and with one fd free it
    stays up but takes no more eventfds, so its guest cannot ring any later
    peer.  The server hands each departed ID on with the eventfds QEMU kept:
    here, under a small limit, 40 protocol clients come and go one after
    another; the QEMU must stay up, hold every live member's doorbells, and
    keep the eventfds of one ID, not 40."""
    house = qemu_house
    house.qemu_join(nofile=SMALL_FD_LIMIT)
    [q] = house.qemus.values()
    kinds: Counter[str] = Counter()
    for n in range(PEER_JOINS):
        house.join()
        house.drain()
        house.expect_qemus_hold()
        house.leave(*house.fakes)
        if n == 0:  # the QEMU has its setup and one peer's eventfds
            kinds = Counter(os.readlink(f) for f in Path(f"/proc/{q.pid}/fd").iterdir())
    house.check()
    assert house.next_id == 2, f"{house.next_id} IDs given out for two members at once"
    after = Counter(os.readlink(f) for f in Path(f"/proc/{q.pid}/fd").iterdir())
    assert after == kinds, (
        f"the QEMU's fds grew by {dict(after - kinds)} over {PEER_JOINS - 1} joins"
    )
