"""The server at full house (issue 29): a 64-member house and its storm of joins and leaves.

What test_storm.py (protocol clients only) and test_storm_qemu.py (real
QEMUs among them) share: :class:`House`, a real ``ivloop-server`` process
with its members and a model of what the server must have done -- which
member holds which slot, the next peer ID, the generation of every slot and
of the header -- checked against what QEMU and its guest can see: the setup
and notices each member received, its membership doorbell, and the
directory read through each member's own mapping of the region; the storm
that drives it (:func:`run_storm`); and what the test sees of the server
process (fds, eventfds, memory, log).

Members here are FakeQemu, the protocol client that decodes messages the
way QEMU does.  A house runs in either protocol mode of the server: with
``--leave-notices`` a member's list of peers follows the leaves and must
equal the live set; in the default mode (the one real QEMUs get) nobody is
told of a leave but by the directory and the vector-0 doorbell, so a
member's list must hold every live peer, and beyond them only peers that
have left.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import re
import select
import statistics
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivloop_server import abi
from ivloop_server.region import find_server_region, format_size, min_region_size

from .conftest import ServerProcess, wait_until
from .fakeclient import FakeQemu

MAX_PEERS = 64
#: The smallest region the server accepts for 64 peers (2G: 4096 rings of 256K).
SIZE = format_size(min_region_size(MAX_PEERS))
SERVER_ARGS = ("--max-peers", str(MAX_PEERS), "--size", SIZE, "--log-format", "json")
SYNC_TIMEOUT = 5.0

# Header and slot words (guest-driver/ivl_abi.h), written out here as in
# fakeclient.py, so that a mirror of the ABI gone wrong cannot hide itself.
HDR_GENERATION_OFF, HDR_NR_PRESENT_OFF = 48, 56
SLOT_BASE, SLOT_SIZE = 4096, 128
SLOT_WORDS = struct.Struct("<IIQ")  # present, peer_id, generation

#: Growth of the server's private memory (VmRSS less RssShmem) allowed over
#: a storm.  The region's own pages (RssShmem) are left out: how many of
#: them the server holds depends on how it clears a slot's rings (writing
#: zeroes or punching holes), not on a leak.  The slack is for the
#: allocator: pymalloc arenas and malloc's heap keep some of the peaks of
#: the storm (setup message lists, log records) and free them in their own
#: time.  test_storm.py's storm admits some 1400 connections, so state kept
#: per connection of 6 KiB or more crosses it.  Smaller per-ID state does
#: not: the server keeps ~0.6 KiB per peer ID given out (one
#: logging.Logger per peer, never removed from logging's registry), ~1 MiB
#: over that storm.
PRIVATE_RSS_SLACK_KIB = 8 << 10
#: Join latency that would only come from a pathological regression (a
#: join touching the whole region, a blocking wait): speed is the
#: benchmarks' business, so this bound is generous on purpose.
MEDIAN_JOIN_LIMIT = 0.050
#: How a protocol client dies during its setup (see House.kill_mid_setup).
KILLS = ("at-connect", "after-version", "mid-peers")


# -- what the test sees of the server process -------------------------------------


def fd_kinds(pid: int) -> Counter[str]:
    """The process's open fds by kind: socket, anon_inode:[eventfd], /memfd:ivloop ..."""
    kinds: Counter[str] = Counter()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(entry)
        except FileNotFoundError:  # closed while we listed
            continue
        kinds[re.sub(r":\[\d+\]$", "", link)] += 1
    return kinds


def eventfd_ids(pid: int | str, fds: Iterable[int] | None = None) -> dict[int, int]:
    """fd -> the kernel's ID of the eventfd behind it (``eventfd-id`` in fdinfo).

    The ID names the eventfd object, so the same doorbell has the same ID
    in the server, in every QEMU it was passed to and in the test.  Without
    ``fds``, every eventfd the process holds.
    """
    proc = Path(f"/proc/{pid}")
    if fds is None:
        fds = []
        for entry in (proc / "fd").iterdir():
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(entry) == "anon_inode:[eventfd]":
                    fds.append(int(entry.name))
    ids: dict[int, int] = {}
    for fd in fds:
        try:
            info = (proc / "fdinfo" / str(fd)).read_text()
        except FileNotFoundError:  # closed while we looked
            continue
        found = re.search(r"^eventfd-id:\s*(\d+)$", info, re.MULTILINE)
        assert found is not None, f"no eventfd-id in /proc/{pid}/fdinfo/{fd}:\n{info}"
        ids[fd] = int(found[1])
    return ids


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem of ``pid``, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0])
    return out


def private_kib(mem: dict[str, int]) -> int:
    return mem["VmRSS"] - mem["RssShmem"]


@dataclass
class ServerUse:
    """The server process's fds (by kind) and memory at one moment."""

    fds: Counter[str]
    mem: dict[str, int]

    @classmethod
    def of(cls, pid: int) -> ServerUse:
        return cls(fd_kinds(pid), memory_kib(pid))

    @classmethod
    def settled_like(cls, pid: int, before: ServerUse) -> ServerUse:
        """The use once the fds are back to ``before`` (refused connections close in their
        own time), or as they are after SYNC_TIMEOUT; the caller asserts."""
        with contextlib.suppress(AssertionError):
            wait_until(lambda: fd_kinds(pid) == before.fds, what="fds as at the baseline")
        return cls.of(pid)

    def numbers(self, when: str) -> dict[str, object]:
        return {f"server_fds_{when}": sum(self.fds.values()), f"server_kib_{when}": self.mem}


def assert_server_flat(before: ServerUse, after: ServerUse, admitted: int) -> None:
    """Same membership as at ``before``: the same fds, and private RSS within the slack."""
    assert after.fds == before.fds, (
        f"server fds after the storm: {sum(after.fds.values())}, at the baseline "
        f"{sum(before.fds.values())} (more: {dict(after.fds - before.fds)}, "
        f"fewer: {dict(before.fds - after.fds)})"
    )
    growth = private_kib(after.mem) - private_kib(before.mem)
    assert growth <= PRIVATE_RSS_SLACK_KIB, (
        f"server private RSS grew {growth} KiB over {admitted} admitted "
        f"connections ({before.mem} -> {after.mem})"
    )


def latency_numbers(prefix: str, latencies: list[float]) -> dict[str, object]:
    """Count, median, p99 and maximum of ``latencies`` (seconds) in ms, keys ``prefix_...``."""
    if not latencies:
        return {f"{prefix}_timed": 0}
    lat = sorted(latencies)
    # (inclusive: a p99 of a few dozen samples lies within them, not beyond the last)
    p99 = statistics.quantiles(lat, n=100, method="inclusive")[98] if len(lat) > 1 else lat[0]
    return {
        f"{prefix}_timed": len(lat),
        f"{prefix}_median_ms": round(statistics.median(lat) * 1000, 2),
        f"{prefix}_p99_ms": round(p99 * 1000, 2),
        f"{prefix}_max_ms": round(lat[-1] * 1000, 2),
    }


def report(numbers: dict[str, object], record_property: Callable[[str, object], None]) -> None:
    """Record ``numbers`` as test properties and print them, one JSON line."""
    for key, value in numbers.items():
        record_property(key, value)
    print(json.dumps(numbers))


def log_records(sp: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sp.stderr().splitlines() if line.startswith("{")]


class ServerLog:
    """The server's JSON log records, read as they are written (each read: the new ones)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return [json.loads(line) for line in lines if line.startswith(b"{")]


def assert_log_agrees(house: House) -> None:
    """After the server stopped: no errors, nobody dropped, every ID joined and left
    once, every refusal logged."""
    records = log_records(house.sp)
    assert [r for r in records if r["level"] not in ("debug", "info", "warning")] == []
    dropped = [r for r in records if r.get("event") == "leave" and "not reading" in r["reason"]]
    assert dropped == [], "the server dropped members that read all their messages"
    events = Counter(r.get("event") for r in records)
    assert events["join"] == events["leave"] == house.admitted
    assert events["refuse"] == house.refusals


def readable(fds: Iterable[int], timeout: float = 0.0) -> list[int]:
    """Those of ``fds`` with something to read.

    poll(), not select(): 64 members hold thousands of fds, and select()
    cannot take an fd above 1023.
    """
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(timeout * 1000)]


class House:
    """A 64-peer server process, its members, and what the server must have done.

    Every operation waits until the server has carried it out (the header
    generation, bumped on every join and every leave, says so), so the next
    one starts from a known state: the slot given out, the ID, the
    generations are all predictable, and checked as they happen.  What the
    members were told is compared at :meth:`check`, after :meth:`settle`.

    ``leave_notices`` says how the server was started (see the module
    docstring).
    """

    def __init__(self, sp: ServerProcess, *, leave_notices: bool) -> None:
        self.sp = sp
        self.path = sp.socket_path
        self.pid = sp.proc.pid
        self.leave_notices = leave_notices
        self.fakes: dict[int, FakeQemu] = {}  # QEMU peer ID -> its protocol client
        self.slot_of: dict[int, int] = {}  # every member's QEMU peer ID -> directory slot
        self.departed: set[int] = set()  # IDs admitted and gone since (some back since)
        self.next_id = 0  # the next new ID: they count up 0, 1, 2 ...
        # Default mode: IDs of members that hung up, which the server hands on
        # (lowest first, before a new one) with the eventfds members kept.
        self.parked: set[int] = set()
        self.admitted = 0  # connections admitted (IDs given out, new or handed on)
        self.generation = 0  # the header's
        self.slot_gen = [0] * MAX_PEERS  # each slot's
        self.refusals = 0
        self.latencies: list[float] = []  # of FakeQemu joins
        # The test's own read-only mapping of the region, for the header
        # and for slots while no member is left to look through.
        fd = os.open(find_server_region(self.pid), os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._region = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)

    def close(self) -> None:
        for client in self.fakes.values():
            client.close()
        self.fakes.clear()
        self._region.close()

    @property
    def size(self) -> int:
        """How many members the house has (of MAX_PEERS)."""
        return len(self.slot_of)

    @property
    def full(self) -> bool:
        return self.size == MAX_PEERS

    # -- the region, read by the test ------------------------------------

    def header_generation(self) -> int:
        value: int = struct.unpack_from("<Q", self._region, HDR_GENERATION_OFF)[0]
        return value

    def nr_present(self) -> int:
        value: int = struct.unpack_from("<I", self._region, HDR_NR_PRESENT_OFF)[0]
        return value

    def slot_words(self, slot: int) -> tuple[int, int, int]:
        present, peer_id, generation = SLOT_WORDS.unpack_from(
            self._region, SLOT_BASE + slot * SLOT_SIZE
        )
        return int(present), int(peer_id), int(generation)

    def free_slots(self) -> list[int]:
        return sorted(set(range(MAX_PEERS)) - set(self.slot_of.values()))

    def lowest_free_slot(self) -> int:
        return self.free_slots()[0]

    def _bump(self, slot: int, by: int) -> None:
        """Account for ``by`` membership changes, the last of them in ``slot``."""
        self.generation += by
        assert self.generation > self.slot_gen[slot], "slot generations only increase"
        self.slot_gen[slot] = self.generation

    def upcoming_ids(self, count: int = 1) -> list[int]:
        """The IDs the next ``count`` admitted connections get, in order."""
        ids = sorted(self.parked)[:count]
        return ids + list(range(self.next_id, self.next_id + count - len(ids)))

    @property
    def expected_id(self) -> int:
        return self.upcoming_ids()[0]

    def _spend(self, peer_id: int) -> None:
        """The server gave ``peer_id`` to the next connection: the lowest parked
        ID, else the next new one (with notices: IDs are never given twice)."""
        assert peer_id == self.expected_id, (
            f"ID {peer_id} given out, expected {self.expected_id} (the lowest departed ID "
            f"free to hand on, of {sorted(self.parked)}, else the next new one)"
        )
        if peer_id in self.parked:
            self.parked.remove(peer_id)
        else:
            self.next_id += 1
        self.admitted += 1

    def _departed(self, peer_ids: Iterable[int]) -> None:
        """Members ``peer_ids`` hung up: without notices, the server parks their IDs."""
        self.departed.update(peer_ids)
        if not self.leave_notices:
            self.parked.update(peer_ids)

    def _admitted(self, peer_id: int, slot: int) -> None:
        """The server admitted the next connection: ``peer_id`` (see :meth:`_spend`)
        in ``slot`` (the lowest free one), with the next generation."""
        self._spend(peer_id)
        assert slot == self.lowest_free_slot(), "a join takes the lowest free slot"
        self.slot_of[peer_id] = slot
        self._bump(slot, 1)

    def sync(self) -> None:
        """Wait until the server has made every change the test made; no more."""
        deadline = time.monotonic() + SYNC_TIMEOUT
        delay = 0.0001
        while (seen := self.header_generation()) < self.generation:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"header generation {seen} after {SYNC_TIMEOUT} s, expected "
                    f"{self.generation}: the server did not carry out a join or leave"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
        assert seen == self.generation, (
            f"header generation {seen}, expected {self.generation}: the server made "
            f"{seen - self.generation} membership change(s) the test did not (a member dropped?)"
        )

    # -- operations -------------------------------------------------------

    def join(self) -> FakeQemu:
        """One QEMU joins: the next ID, the lowest free slot, a new generation."""
        assert not self.full
        start = time.perf_counter()
        client = FakeQemu.join(self.path)
        self.latencies.append(time.perf_counter() - start)
        assert client.own_id is not None
        self.fakes[client.own_id] = client
        slot = self.lowest_free_slot()
        live = set(self.slot_of)
        self._admitted(client.own_id, slot)
        assert client.my_slot() == slot, "a join takes the lowest free slot"
        half = client.server_half(slot)
        assert half["generation"] == self.generation, half
        assert set(client.peers) == live, "the setup names every live member, no other"
        return client

    def refused_join(self) -> None:
        """A QEMU connects to the full house: refused as QEMU reads it, nothing changes."""
        assert self.full
        with FakeQemu.connect(self.path) as client:
            assert client.refused()
        self.refusals += 1
        self.sync()

    def join_or_refused(self) -> None:
        if self.full:
            self.refused_join()
        else:
            self.join()

    def burst_join(self, count: int) -> None:
        """``count`` QEMUs connect at once, then set up; past the free slots, refused.

        The server accepts them in connection order, so the first ones get
        the free slots (lowest first) and the next IDs.
        """
        conns: list[FakeQemu] = []
        try:
            for _ in range(count):
                conns.append(FakeQemu.connect(self.path))
            for client in conns:
                if self.full:
                    assert client.refused()
                    self.refusals += 1
                    continue
                client.handshake()
                assert client.own_id is not None
                self.fakes[client.own_id] = client
                self._admitted(client.own_id, self.lowest_free_slot())
                assert client.my_slot() == self.slot_of[client.own_id]
        finally:
            for client in conns:
                if client.own_id not in self.fakes:
                    client.close()
        self.sync()

    def go(self, peer_id: int) -> None:
        """Member ``peer_id``'s QEMU goes away (here: closes its connection)."""
        self.fakes.pop(peer_id).close()

    def leave(self, *peer_ids: int) -> None:
        """Members go away, all at once (see :meth:`go`)."""
        self.clear_rings()
        slots = [self.slot_of.pop(p) for p in peer_ids]
        for peer_id in peer_ids:
            self.go(peer_id)
        self.left(peer_ids, slots)

    def left(self, peer_ids: Iterable[int], slots: list[int]) -> None:
        """The members ``peer_ids`` (already out of the model) went away from ``slots``.

        The server takes several leaves in an order of its own, so each of
        their slots gets one of the new generations, in some order.  Each
        remaining member's membership doorbell rings: in the default mode
        that and the directory are all it learns of a leave.
        """
        self._departed(peer_ids)
        first = self.generation + 1
        self.generation += len(slots)
        self.sync()
        found = {slot: self.slot_words(slot) for slot in slots}
        assert all(present == 0 for present, _, _ in found.values()), found
        assert sorted(g for _, _, g in found.values()) == list(range(first, self.generation + 1))
        for slot, (_, _, generation) in found.items():
            assert generation > self.slot_gen[slot], "slot generations only increase"
            self.slot_gen[slot] = generation
        self.expect_rung()

    def kill_mid_setup(self, how: str, rng: random.Random) -> None:
        """A QEMU dies during its setup: ``how`` says when.

        at-connect: closes before reading anything; after-version: reads the
        version message only; mid-peers: reads its ID, the region and some of
        its peers' vectors.  Below full house the server has admitted it (an
        ID spent, a slot taken) and must take it out again; at full house it
        was refused.
        """
        full = self.full
        slot = None if full else self.lowest_free_slot()
        with FakeQemu.connect(self.path) as client:
            if how != "at-connect":
                first = client.recv()
                if full:
                    assert (first.value, first.fd) == (-1, None), first
                else:
                    assert (first.value, first.fd) == (0, None), first
                    if how == "mid-peers":
                        own = client.recv()
                        assert own.value == self.expected_id, own
                        client.recv()  # the region
                        for _ in range(rng.randrange(2 * self.size + 2)):
                            client.recv()
        if full:
            self.refusals += 1
            if how == "at-connect":
                # Nothing showed the server took it yet: a refused connection
                # behind it, accepted in order, does.
                self.refused_join()
            return
        assert slot is not None
        peer_id = self.expected_id
        self._spend(peer_id)
        self._departed([peer_id])
        self._bump(slot, 2)  # present, then absent again
        self.sync()
        present, _, generation = self.slot_words(slot)
        assert (present, generation) == (0, self.generation)

    # -- doorbells ------------------------------------------------------------

    def clear_rings(self) -> None:
        """Reset every member's membership doorbell (before a change that must ring it)."""
        for client in self.fakes.values():
            client.take_interrupts(abi.IVL_VEC_MEMBERSHIP)

    def expect_rung(self) -> None:
        """Every member's membership doorbell has rung since :meth:`clear_rings`."""
        waiting = {c.own_vectors[abi.IVL_VEC_MEMBERSHIP]: i for i, c in self.fakes.items()}
        deadline = time.monotonic() + SYNC_TIMEOUT
        while waiting and time.monotonic() < deadline:
            for fd in readable(waiting, 0.1):
                del waiting[fd]
        assert not waiting, f"membership doorbell not rung for members {sorted(waiting.values())}"

    # -- reading and checking -----------------------------------------------

    def drain(self) -> None:
        """Every member reads what is waiting for it (QEMU reads each message as it comes)."""
        by_fd = {c.sock.fileno(): c for c in self.fakes.values()}
        while ready := readable(by_fd):
            for fd in ready:
                by_fd[fd].next_event()

    def quiet(self, timeout: float = 0.05) -> None:
        """Nothing more arrives for any member."""
        by_fd = {c.sock.fileno(): i for i, c in self.fakes.items()}
        ready = [by_fd[fd] for fd in readable(by_fd, timeout)]
        assert not ready, f"unexpected messages for members {ready}"

    def expect_told(self, peer_id: int) -> None:
        """Every member (but ``peer_id``) has been told of ``peer_id``: all its vectors."""
        for member, client in self.fakes.items():
            if member == peer_id:
                continue
            while len(client.peers.get(peer_id, [])) < client.vectors:
                try:
                    client.next_event(timeout=SYNC_TIMEOUT)
                except TimeoutError:
                    raise AssertionError(f"member {member} was not told of {peer_id}") from None

    def settle(self) -> None:
        """Make every member read all the server has sent it; nothing more is on its way.

        The generation alone does not say that: the server bumps it before it
        sends the notices of the same join or leave, and a setup killed at
        connect may or may not have reached the members at all.  A connection
        the server answers does: it handles one connection or event at a
        time, each to the end, so by its answer every earlier notice is in
        the members' sockets.  At full house that is a refused QEMU; below,
        a member more, whose own connect notices then come last.
        """
        self.sync()
        if self.full:
            self.refused_join()
        else:
            last = self.join().own_id
            assert last is not None
            self.expect_told(last)
        self.drain()

    def check_directory(self) -> None:
        """The directory, read through the test's own mapping, is the model's."""
        assert self.header_generation() == self.generation
        assert self.nr_present() == self.size
        holder = {slot: peer_id for peer_id, slot in self.slot_of.items()}
        for slot in range(MAX_PEERS):
            present, peer_id, generation = self.slot_words(slot)
            if slot in holder:
                assert (present, peer_id) == (1, holder[slot]), (
                    f"slot {slot} reads present {present} peer {peer_id}: peer {holder[slot]} "
                    "holds it"
                )
            else:
                assert present == 0, f"slot {slot} reads present (peer {peer_id}): it is free"
            assert generation == self.slot_gen[slot], (
                f"slot {slot}: generation {generation}, its last join or leave was "
                f"{self.slot_gen[slot]}"
            )
        assert self.generation == max(self.slot_gen)

    def vector_ids(self) -> dict[int, frozenset[int]]:
        """Each live member's doorbells (eventfd IDs), as the members received them."""
        ids: dict[int, frozenset[int]] = {}
        for peer_id, client in self.fakes.items():
            ids[peer_id] = frozenset(eventfd_ids("self", client.own_vectors).values())
        for peer_id in set(self.slot_of) - set(ids):
            told = next((c for c in self.fakes.values() if peer_id in c.peers), None)
            assert told is not None, f"no member was told of peer {peer_id}"
            ids[peer_id] = frozenset(eventfd_ids("self", told.peers[peer_id]).values())
        return ids

    def check(self) -> None:
        """Every view of membership matches the test's model."""
        self.settle()
        live = set(self.slot_of)
        # Each member's own account, from its setup and the notices since.
        for peer_id, client in self.fakes.items():
            known, want = set(client.peers), live - {peer_id}
            if self.leave_notices:
                assert known == want, (
                    f"member {peer_id} knows peers {sorted(known)}: of the live ones it misses "
                    f"{sorted(want - known)}, it still has {sorted(known - want)}"
                )
                assert len(client.gone) == len(set(client.gone)), f"{peer_id}: a leave told twice"
                assert not set(client.gone) & want, f"{peer_id}: an ID came back after its leave"
                assert all(p < self.next_id for p in client.gone)
            else:
                assert want <= known, f"member {peer_id} misses live peers {sorted(want - known)}"
                stale = known - want
                assert stale <= self.departed, (
                    f"member {peer_id} holds peers {sorted(stale - self.departed)}, "
                    "neither live nor departed"
                )
                assert client.gone == [], f"{peer_id} got leave messages (QEMU double-frees)"
                # Like QEMU, it keeps the departed peers' eventfds: an ID handed
                # on comes with them, and it is sent nothing for it again.
        # The directory, through each member's own mapping of BAR2, and the
        # test's: slots, generations.
        want_dir = {slot: peer_id for peer_id, slot in self.slot_of.items()}
        for peer_id, client in self.fakes.items():
            seen = {}
            for slot in range(MAX_PEERS):
                half = client.server_half(slot)
                if half["present"]:
                    seen[slot] = half["peer_id"]
            assert seen == want_dir, f"member {peer_id} reads the directory as {seen}"
        self.check_directory()
        # Every member rings each live peer through that peer's own doorbells,
        # including the ones it kept from an earlier holder of the same ID.
        members = self.vector_ids()
        own = eventfd_ids("self")  # every eventfd of the test's, read once
        for peer_id, client in self.fakes.items():
            for other in live - {peer_id}:
                ids = frozenset(own[fd] for fd in client.peers[other])
                assert ids == members[other], (
                    f"member {peer_id}'s doorbells for peer {other} are not {other}'s own"
                )
        # The server holds the doorbells of the live members and of the
        # parked IDs (as members kept them), no other.
        held = set(eventfd_ids(self.pid).values())
        want_held = set().union(*members.values())
        unseen = 0  # parked IDs no member still here was told of
        for parked in self.parked:
            told = next((c for c in self.fakes.values() if parked in c.peers), None)
            if told is None:
                unseen += 1
            else:
                want_held |= set(eventfd_ids("self", told.peers[parked]).values())
        assert want_held <= held and len(held) == len(want_held) + unseen * abi.IVL_NR_VECTORS, (
            f"the server holds {len(held)} eventfds, the {len(members)} live members' and "
            f"{len(self.parked)} parked IDs' are {len(want_held)} + {unseen} IDs unseen "
            f"({len(held - want_held)} held beyond them, {len(want_held - held)} missing)"
        )


def fill(house: House) -> None:
    while not house.full:
        house.join()
        house.drain()


def fake_op(house: House, rng: random.Random, rising: bool) -> str:
    """One operation of protocol clients; returns its name.

    Joins (refused at full house), leaves, bursts of both, and QEMUs killed
    during their setup; joins are likelier while membership is ``rising``.
    """
    fakes = sorted(house.fakes)
    pick = rng.random()
    if pick < 0.15:
        how = rng.choice(KILLS)
        house.kill_mid_setup(how, rng)
        return f"kill {how}"
    if pick < 0.20:
        house.burst_join(rng.randint(2, 6))
        return "burst join"
    if pick < 0.25 and len(fakes) >= 2:
        house.leave(*rng.sample(fakes, rng.randint(2, min(6, len(fakes)))))
        return "burst leave"
    if not fakes or rng.random() < (0.7 if rising else 0.3):
        full = house.full
        house.join_or_refused()
        return "join refused" if full else "join"
    house.leave(rng.choice(fakes))
    return "leave"


Op = Callable[[House, random.Random, bool], str]


def run_storm(house: House, rng: random.Random, ops: int, op: Op, check_every: int) -> Counter[str]:
    """``ops`` operations by ``op``; returns how many of each name.

    Membership swings between a random low-water mark and full house (a
    refusal says it was reached).  After every operation the members read
    what they were sent and the directory is checked; every
    ``check_every`` operations, every view (:meth:`House.check`).
    """
    done: Counter[str] = Counter()
    rising, low = False, rng.randint(4, 40)
    for n in range(1, ops + 1):
        refusals = house.refusals
        done[op(house, rng, rising)] += 1
        house.drain()
        house.check_directory()
        if rising and house.refusals > refusals:  # full house reached: ebb
            rising, low = False, rng.randint(4, 40)
        elif not rising and house.size <= low:
            rising = True
        if n % check_every == 0:
            house.check()
    return done


def storm_seed(record_property: Callable[[str, object], None]) -> random.Random:
    """The storm's random generator: seeded from $IVLOOP_STORM_SEED, or at random (printed)."""
    seed = int(os.environ.get("IVLOOP_STORM_SEED") or random.randrange(1 << 32))
    print(f"storm seed {seed} (IVLOOP_STORM_SEED={seed} replays it)")
    record_property("storm_seed", seed)
    return random.Random(seed)
