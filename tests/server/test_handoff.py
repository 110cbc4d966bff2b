"""A server hands its region and members over to the next server process (SIGUSR2).

The service manager's file-descriptor store is played by
:class:`~tests.server.storemanager.StoreManager` (the real systemd does it
in tests/packaging/test_host_package.py).  Members are the project's
protocol client; what they must not notice is checked on their side: no
EOF, no message, the same region (by inode), the same slot and doorbells,
and a directory the next server keeps writing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivloop_server import abi, handoff
from ivloop_server.errors import HandOffError

from .conftest import server_command, wait_until
from .fakeclient import FakeQemu
from .storemanager import StoreManager

TIMEOUT = 10.0
_GENERATION = abi.IvlRegionHdr.generation.offset


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[StoreManager]:
    with StoreManager(tmp_path) as mgr:
        yield mgr


class Service:
    """ivloop-server run as a unit would be, restarted on exit status 75."""

    def __init__(self, tmp_path: Path, manager: StoreManager, *args: str) -> None:
        self.path = tmp_path / "ivl.sock"
        self.manager = manager
        self.argv = server_command("--socket", str(self.path), "--foreground",
                                   "--max-peers", "4", *args)  # fmt: skip
        self.stderr = tmp_path / "server.stderr"
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.procs[-1]

    def start(self, *extra: str) -> dict[str, str]:
        mark = len(self.manager.received)
        self.procs.append(self.manager.start([*self.argv, *extra], self.stderr))
        return self.manager.wait_ready(mark)

    def hand_off(self) -> int:
        """SIGUSR2; the exit status."""
        self.proc.send_signal(signal.SIGUSR2)
        return self.proc.wait(TIMEOUT)

    def log(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stderr.read_text().splitlines()
                if line.startswith("{")]  # fmt: skip

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)


@pytest.fixture
def service(tmp_path: Path, manager: StoreManager) -> Iterator[Service]:
    svc = Service(tmp_path, manager, "--log-format", "json")
    yield svc
    svc.close()


@pytest.fixture
def members() -> Iterator[list[FakeQemu]]:
    made: list[FakeQemu] = []
    yield made
    for client in made:
        client.close()


def inode(client: FakeQemu) -> int:
    assert client.shm_fd is not None
    return os.fstat(client.shm_fd).st_ino


def region_generation(client: FakeQemu) -> int:
    """The header's generation, as a guest polls it."""
    return int.from_bytes(client.region[_GENERATION : _GENERATION + 8], "little")


def test_members_keep_region_slot_and_doorbells_across_a_hand_off(
    service: Service, manager: StoreManager, members: list[FakeQemu]
) -> None:
    service.start()
    a, b, c = (FakeQemu.join(service.path) for _ in range(3))
    members.extend((a, b, c))
    assert [m.own_id for m in (a, b, c)] == [0, 1, 2]
    a.expect_join(1), a.expect_join(2), b.expect_join(2)
    slots = {m.own_id: m.my_slot(4) for m in (a, b)}
    c.close()  # ID 2 is parked with the eventfds a and b keep
    wait_until(lambda: not any(a.server_half(s)["present"] and a.server_half(s)["peer_id"] == 2
                               for s in range(4)), what="c's leave")  # fmt: skip
    gen = region_generation(a)
    region = inode(a)
    first = service.proc.pid

    assert service.hand_off() == handoff.EXIT_HANDED_OFF
    stored = manager.stored()
    assert stored[0] == handoff.STATE
    assert set(stored) == {"state", "region", "listener", "peer0", "peer0v0", "peer0v1",
                           "peer1", "peer1v0", "peer1v1", "parked2v0", "parked2v1"}
    # A QEMU connecting while no server runs waits in the listener's backlog.
    joined: list[FakeQemu] = []
    late = threading.Thread(target=lambda: joined.append(FakeQemu.join(service.path)))
    late.start()
    time.sleep(0.3)
    assert not a.pending() and not b.pending(), "a member heard from the departing server"

    ready = service.start()
    assert service.proc.pid != first
    assert ready["STATUS"].startswith("2 of 4 peers"), ready
    manager.wait_store_empty()  # the new server alone holds the members' connections
    late.join(TIMEOUT)
    assert joined, "the QEMU that connected during the swap never joined"
    d = joined[0]
    members.append(d)
    # The same region, directory carried on from where it was.
    assert inode(d) == region
    assert [m.my_slot(4) for m in (a, b)] == [slots[0], slots[1]]
    assert region_generation(a) == gen + 1  # d's join, nothing else
    # d got the parked ID 2 with the eventfds a and b kept: they are told nothing.
    assert d.own_id == 2
    assert not a.pending() and not b.pending()
    d.ring(0, 1)
    assert a.take_interrupts(1) == 1
    a.ring(2, 1)
    assert d.take_interrupts(1) == 1
    a.ring(1, 1)
    assert b.take_interrupts(1) == 1
    # The new server sees members go: b leaves, a reads it in the directory.
    b.close()
    wait_until(lambda: not a.server_half(slots[1])["present"], what="b's leave")
    # A real stop drops the rest and marks them absent.
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(TIMEOUT) == 0
    assert a.at_eof() and d.at_eof()
    assert not a.server_half(slots[0])["present"]
    events = [r.get("event") for r in service.log()]
    assert "hand_off" in events and "handed_off" in events and "resume" in events
    resume = next(r for r in service.log() if r.get("event") == "resume")
    assert resume["peers"] == [0, 1] and resume["parked"] == [2] and resume["lost"] == []


def test_without_a_store_the_server_keeps_serving(
    tmp_path: Path, manager: StoreManager, members: list[FakeQemu]
) -> None:
    svc = Service(tmp_path, manager, "--log-format", "json")
    try:
        manager.fdstore.limit = 0
        svc.start()
        a = FakeQemu.join(svc.path)
        members.append(a)
        svc.proc.send_signal(signal.SIGUSR2)
        wait_until(lambda: any(r.get("event") == "hand_off_failed" for r in svc.log()),
                   what="the refusal")  # fmt: skip
        failed = next(r for r in svc.log() if r.get("event") == "hand_off_failed")
        assert "FileDescriptorStoreMax" in str(failed["reason"])
        assert svc.proc.poll() is None and not a.pending()
        b = FakeQemu.join(svc.path)
        members.append(b)
        a.expect_join(b.own_id or 0)
    finally:
        svc.close()


def test_a_member_lost_from_the_store_is_marked_absent_alone(
    service: Service, manager: StoreManager, members: list[FakeQemu]
) -> None:
    service.start()
    a, b = FakeQemu.join(service.path), FakeQemu.join(service.path)
    members.extend((a, b))
    a.expect_join(1)
    slot_b = b.my_slot(4)
    assert service.hand_off() == handoff.EXIT_HANDED_OFF
    # The store lost b's connection (systemd drops what does not fit).
    os.close(manager.store.pop("peer1"))
    service.start()
    assert b.at_eof(), "b's connection should be closed by nobody holding it"
    wait_until(lambda: not a.server_half(slot_b)["present"], what="b marked absent")
    assert not a.pending()
    resume = next(r for r in service.log() if r.get("event") == "resume")
    assert resume["peers"] == [0] and resume["lost"] == [1]
    c = FakeQemu.join(service.path)
    members.append(c)
    assert c.own_id == 2  # b's ID is retired, not handed on
    a.expect_join(2)


def test_a_changed_configuration_drops_the_members_and_starts_anew(
    service: Service, manager: StoreManager, members: list[FakeQemu]
) -> None:
    service.start()
    a = FakeQemu.join(service.path)
    members.append(a)
    slot = a.my_slot(4)
    assert service.hand_off() == handoff.EXIT_HANDED_OFF
    service.start("--size", "64M")
    assert a.at_eof()
    assert not a.server_half(slot)["present"], "the old region must show the member gone"
    b = FakeQemu.join(service.path)
    members.append(b)
    assert inode(b) != inode(a) and b.own_id == 0
    failed = next(r for r in service.log() if r.get("event") == "resume_failed")
    assert "size" in str(failed["reason"])
    manager.wait_store_empty()


def test_an_unreadable_state_starts_anew_and_lets_the_members_go(
    service: Service, manager: StoreManager, members: list[FakeQemu]
) -> None:
    service.start()
    a = FakeQemu.join(service.path)
    members.append(a)
    assert service.hand_off() == handoff.EXIT_HANDED_OFF
    bad = os.memfd_create("state")
    os.write(bad, b'{"format": 1, "pid": "x"}')
    os.close(manager.store.pop("state"))
    manager.store["state"] = bad
    service.start()
    assert a.at_eof()
    manager.wait_store_empty()
    failed = next(r for r in service.log() if r.get("event") == "resume_failed")
    assert "state" in str(failed["reason"])
    b = FakeQemu.join(service.path)
    members.append(b)
    assert inode(b) != inode(a)


@pytest.mark.parametrize("data, words", [
    (b"not json", "not JSON"),
    (b"[]", "not an object"),
    (b'{"format": 2}', "format 2"),
    (b'{"format": 1, "region": {"max_peers": 1000}}', "max_peers"),
])  # fmt: skip
def test_bad_states_are_refused_with_a_reason(data: bytes, words: str) -> None:
    with pytest.raises(HandOffError, match=words):
        handoff.parse_state(data)


def test_inherited_takes_only_descriptors_meant_for_this_process() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert handoff.inherited(env) == {}
    assert env == {}, "the variables are not removed"


def test_the_new_server_trusts_its_record_not_the_region(
    service: Service, manager: StoreManager, members: list[FakeQemu]
) -> None:
    """A member that rewrites the directory during the swap is undone from the handed-over
    record: the region is never read back as the server's truth."""
    service.start()
    a, b = FakeQemu.join(service.path), FakeQemu.join(service.path)
    members.extend((a, b))
    a.expect_join(1)
    slot_b = b.my_slot(4)
    honest = a.server_half(slot_b)
    assert service.hand_off() == handoff.EXIT_HANDED_OFF
    # b's slot claims another occupant; the header another generation.
    base = a.slot_base(slot_b)
    a.region[base + 4 : base + 8] = (77).to_bytes(4, "little")
    a.region[_GENERATION : _GENERATION + 8] = (1000).to_bytes(8, "little")
    service.start()
    wait_until(lambda: a.server_half(slot_b)["peer_id"] == 1, what="the slot restored")
    restored = a.server_half(slot_b)
    assert (restored["present"], restored["generation"]) == (1, honest["generation"])
    assert region_generation(a) == honest["generation"]
    assert not a.pending() and not b.pending()
