"""The server's side of the trust model: it publishes each peer's NIC MAC and
evicts a peer whose guest claims another MAC."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable

import pytest

from ivloop_server import abi
from ivloop_server.nic import NicIdentity

from .conftest import ServerThread, qemu_process, wait_until
from .fakeclient import FakeQemu

MAC_A, MAC_B, MAC_C = (bytes.fromhex(f"5254000000{i:02x}") for i in (0xA, 0xB, 0xC))
OTHER = bytes.fromhex("5254000000ff")  # nobody's NIC: a gateway, a VM on another host
KNOWN, EVICTED = abi.IVL_SLOT_F_MAC_KNOWN, abi.IVL_SLOT_F_EVICTED
UP, LEAVING, DOWN = FakeQemu.STATE_UP, FakeQemu.STATE_LEAVING, FakeQemu.STATE_DOWN
FAST = {"police_interval": 0.02, "evict_holdoff": 0.5, "evict_holdoff_max": 10.0}


def fmt(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class QueueResolver:
    """Hands out identities in connection order: in-process fake clients all
    have the test's pid, so the pid cannot tell them apart."""

    def __init__(self) -> None:
        self.queue: list[NicIdentity] = []

    def resolve(self, pid: int) -> NicIdentity:
        if self.queue:
            return self.queue.pop(0)
        return NicIdentity(pid, None, "test: not queued")


def identity(mac: bytes | None, name: str, key: int) -> NicIdentity:
    return NicIdentity(70000 + key, mac, "test" if mac else "test: unknown", name, key)


class Lab:
    def __init__(self, st: ServerThread, resolver: QueueResolver, clients: list[FakeQemu]):
        self.st = st
        self.resolver = resolver
        self.clients = clients

    def join(self, mac: bytes | None, name: str, key: int) -> FakeQemu:
        self.resolver.queue.append(identity(mac, name, key))
        client = FakeQemu.join(self.st.path)
        self.clients.append(client)
        self.st.settle()
        return client

    def present(self) -> list[int]:
        return self.st.call(
            lambda: [p.id for p in self.st.server.peers().values()]
        )

    def events(self, caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "event", None) == event]


@pytest.fixture
def lab(make_server: Callable[..., ServerThread], clients: list[FakeQemu]) -> Lab:
    resolver = QueueResolver()
    return Lab(make_server(resolver=resolver, **FAST), resolver, clients)


def test_known_mac_is_published_unknown_is_logged(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ivloop_server"):
        a = lab.join(MAC_A, "vm-a", 1)
        b = lab.join(None, "vm-b", 2)
    slot_a, slot_b = a.my_slot(), b.my_slot()
    # Each guest sees both slots, flags and MACs, through its own mapping.
    assert a.server_half(slot_a)["srv_flags"] == KNOWN
    assert a.server_half(slot_a)["nic_mac"] == MAC_A
    assert a.server_half(slot_b)["srv_flags"] == 0
    assert a.server_half(slot_b)["nic_mac"] == bytes(6)
    for half in (a.server_half(slot_a), a.server_half(slot_b)):
        assert half["srv_seq"] == 2  # one update each: even, settled
    nic = lab.events(caplog, "nic")
    assert [(r.peer, r.nic_mac) for r in nic] == [(0, fmt(MAC_A)), (1, None)]  # type: ignore[attr-defined]
    assert all(r.levelno == logging.INFO for r in nic)
    assert "cannot be checked" in nic[1].getMessage() and "vm-b" in nic[1].getMessage()


def test_honest_peers_are_never_evicted(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    a = lab.join(MAC_A, "vm-a", 1)
    b = lab.join(MAC_B, "vm-b", 2)
    c = lab.join(None, "vm-c", 3)
    a.expect_join(1)
    a.expect_join(2)
    b.expect_join(2)
    with caplog.at_level(logging.INFO, logger="ivloop_server"):
        a.publish(MAC_A)
        b.publish(MAC_B)
        c.publish(MAC_C)  # unknown NIC, nobody else's MAC: not checked
        lab.st.rounds(10)
        b.publish(MAC_B, LEAVING)
        a.publish(OTHER, DOWN)  # DOWN claims nothing
        lab.st.rounds(5)
    assert lab.present() == [0, 1, 2]
    assert lab.events(caplog, "evict") == []
    assert not a.pending() and not b.pending() and not c.pending()
    unchecked = lab.events(caplog, "unchecked")
    assert [(r.peer, r.mac) for r in unchecked] == [(2, fmt(MAC_C))]  # type: ignore[attr-defined]
    assert all(a.server_half(s)["srv_flags"] & EVICTED == 0 for s in range(3))


def test_liar_is_evicted_once_and_others_are_told(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    a = lab.join(MAC_A, "vm-a", 1)
    b = lab.join(MAC_B, "vm-b", 2)
    a.expect_join(1)
    a.publish(MAC_A)
    slot_b = b.my_slot()
    gen_before = a.server_half(slot_b)["generation"]
    with caplog.at_level(logging.INFO, logger="ivloop_server"):
        b.publish(OTHER)
        a.expect_leave(1)
        assert b.at_eof(), "the liar's connection is closed"
        lab.st.settle()
        # It goes on lying through the mapping it keeps: nothing more happens.
        b.publish(MAC_A, slot=slot_b)
        lab.st.rounds(5)
    assert a.take_interrupts(abi.IVL_VEC_MEMBERSHIP) >= 1
    half = a.server_half(slot_b)
    assert half["present"] == 0 and half["srv_flags"] == KNOWN | EVICTED
    assert half["nic_mac"] == MAC_B and half["generation"] == gen_before + 1
    assert half["srv_seq"] % 2 == 0
    assert lab.present() == [0]
    evicts = lab.events(caplog, "evict")
    assert len(evicts) == 1
    r = evicts[0]
    assert r.levelno == logging.WARNING
    assert (r.peer, r.slot, r.qemu_name) == (1, slot_b, "vm-b")  # type: ignore[attr-defined]
    assert (r.claimed_mac, r.nic_mac) == (fmt(OTHER), fmt(MAC_B))  # type: ignore[attr-defined]
    msg = r.getMessage()
    for part in ("peer 1", f"slot {slot_b}", "pid", "vm-b", fmt(OTHER), fmt(MAC_B)):
        assert part in msg, part
    leaves = lab.events(caplog, "leave")
    assert [(x.peer, x.levelno) for x in leaves] == [(1, logging.INFO)]  # type: ignore[attr-defined]
    assert "evicted" in leaves[0].reason  # type: ignore[attr-defined]
    assert [x for x in caplog.records if x.levelno >= logging.WARNING] == evicts


def test_liar_while_leaving_is_evicted(lab: Lab) -> None:
    a = lab.join(MAC_A, "vm-a", 1)
    b = lab.join(MAC_B, "vm-b", 2)
    a.expect_join(1)
    b.publish(OTHER, LEAVING)  # peers still read a LEAVING peer's ring
    a.expect_leave(1)


def test_stale_guest_half_does_not_count_against_a_newcomer(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    anchor = lab.join(MAC_A, "vm-a", 1)
    old = lab.join(MAC_B, "vm-b", 2)
    anchor.expect_join(1)
    slot = old.my_slot()
    old.publish(MAC_B)
    old.close()  # killed: its slot still says UP, MAC_B
    anchor.expect_leave(1)
    lab.st.settle()
    with caplog.at_level(logging.WARNING, logger="ivloop_server"):
        new = lab.join(MAC_C, "vm-c", 3)
        anchor.expect_join(2)
        assert new.my_slot() == slot
        lab.st.rounds(5)  # the half still says UP, MAC_B, with the old joined_gen
        assert lab.present() == [0, 2]
        new.publish(MAC_C, joined_gen=1)  # UP for a generation that is not its join
        lab.st.rounds(5)
        assert lab.present() == [0, 2]
        assert lab.events(caplog, "evict") == []
        new.publish(MAC_B)  # now it really claims the departed peer's MAC
        anchor.expect_leave(2)


def test_mid_update_slot_is_skipped_then_checked(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    a = lab.join(MAC_A, "vm-a", 1)
    b = lab.join(MAC_B, "vm-b", 2)
    a.expect_join(1)
    with caplog.at_level(logging.INFO, logger="ivloop_server"):
        b.publish(OTHER, finish=False)  # the lie is written, seq stays odd
        lab.st.rounds(15)
        assert lab.present() == [0, 1]
        stuck = lab.events(caplog, "stuck")
        assert len(stuck) == 1 and stuck[0].levelno == logging.WARNING
        slot = b.my_slot()
        base = b.slot_base(slot)
        seq = struct.unpack_from("<I", b.region, base + b.SEQ_OFF)[0]
        struct.pack_into("<I", b.region, base + b.SEQ_OFF, seq + 1)  # settles
        a.expect_leave(1)
    assert len(lab.events(caplog, "stuck")) == 1


def test_forged_server_half_is_restored_and_the_forger_evicted(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """A guest can write its own nic_mac and generation; guests would believe it."""
    a = lab.join(MAC_A, "vm-a", 1)
    b = lab.join(MAC_B, "vm-b", 2)
    a.expect_join(1)
    slot = b.my_slot()
    base = b.slot_base(slot)
    true_half = a.server_half(slot)
    with caplog.at_level(logging.INFO, logger="ivloop_server"):
        # Make the slot say "NIC OTHER, rejoined at generation 99", then claim OTHER.
        b.region[base + 24 : base + 30] = OTHER
        struct.pack_into("<Q", b.region, base + 8, 99)
        b.publish(OTHER, joined_gen=99)
        a.expect_leave(1)
        lab.st.settle()
    repairs = lab.events(caplog, "repair")
    assert len(repairs) == 1 and repairs[0].slot == slot  # type: ignore[attr-defined]
    assert "generation 99" in repairs[0].getMessage()
    assert len(lab.events(caplog, "evict")) == 1
    half = a.server_half(slot)
    assert half["nic_mac"] == MAC_B
    assert half["generation"] == true_half["generation"] + 1


def test_scribbled_header_is_restored(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    a = lab.join(MAC_A, "vm-a", 1)
    good = bytes(a.region[0:64])
    with caplog.at_level(logging.WARNING, logger="ivloop_server"):
        for _ in range(3):  # again and again: one warning per minute at most
            a.region[16:24] = b"\xff" * 8  # max_peers, ring_size
            lab.st.rounds(2)
            assert bytes(a.region[0:64]) == good
    assert len(lab.events(caplog, "repair")) == 1
    assert lab.present() == [0]


def test_unknown_peer_may_not_claim_a_known_peers_mac(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    a = lab.join(MAC_A, "vm-a", 1)
    b = lab.join(None, "vm-b", 2)
    a.expect_join(1)
    with caplog.at_level(logging.WARNING, logger="ivloop_server"):
        b.publish(MAC_A)
        a.expect_leave(1)
        lab.st.settle()
    (r,) = lab.events(caplog, "evict")
    assert "that is the NIC of peer 0 (QEMU vm-a)" in r.getMessage()
    assert r.nic_mac is None  # type: ignore[attr-defined]


def test_evicted_qemu_is_held_off_then_let_back(
    lab: Lab, clients: list[FakeQemu], caplog: pytest.LogCaptureFixture
) -> None:
    a = lab.join(MAC_A, "vm-a", 1)
    b = lab.join(MAC_B, "vm-b", 2)
    a.expect_join(1)
    with caplog.at_level(logging.DEBUG, logger="ivloop_server"):
        b.publish(OTHER)
        a.expect_leave(1)
        # The same QEMU process (key 2) comes straight back, twice: refused,
        # the first time at WARNING, then quietly.
        for _ in range(2):
            lab.resolver.queue.append(identity(MAC_B, "vm-b", 2))
            c = FakeQemu.connect(lab.st.path)
            clients.append(c)
            assert c.refused(), "refused, the way QEMU understands"
            lab.st.settle()
        # Another QEMU is not held off.
        d = lab.join(MAC_C, "vm-c", 3)
        a.expect_join(d.own_id or 0)
        refusals = lab.events(caplog, "refuse")
        assert [r.levelno for r in refusals] == [logging.WARNING, logging.DEBUG]
        assert "was evicted" in refusals[0].reason  # type: ignore[attr-defined]
        assert "may rejoin in" in refusals[0].reason  # type: ignore[attr-defined]
        (ev,) = lab.events(caplog, "evict")
        assert ev.holdoff == 0.5  # type: ignore[attr-defined]
        # After the hold-off it may rejoin; a second lie doubles the hold-off.
        lab.resolver.queue.append(identity(MAC_B, "vm-b", 2))
        wait_until(lambda: lab.st.call(lambda: _holdoff_over(lab, 2)), 5, "hold-off")
        e = lab.join(MAC_B, "vm-b", 2)
        a.expect_join(e.own_id or 0)
        e.publish(OTHER)
        a.expect_leave(e.own_id or 0)
        lab.st.settle()
        assert [r.holdoff for r in lab.events(caplog, "evict")] == [0.5, 1.0]  # type: ignore[attr-defined]


def _holdoff_over(lab: Lab, key: int) -> bool:
    strike = lab.st.server._strikes.get((70000 + key, key))
    return strike is None or time.monotonic() >= strike.until


# -- the production path: SO_PEERCRED and /proc --------------------------------


def test_real_process_nic_is_learned_and_enforced(
    make_server: Callable[..., ServerThread], clients: list[FakeQemu],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    st = make_server(**FAST)  # the default resolver: /proc
    anchor = FakeQemu.join(st.path)  # this test process: no NIC, unknown
    clients.append(anchor)
    args = ["-name", "guest=vm9,debug-threads=on", "-netdev", "tap,id=data",
            "-device", f"virtio-net-pci,netdev=data,mac={fmt(MAC_B)}", "-netdev", "user,id=m",
            "-device", f"virtio-net-pci,netdev=m,mac={fmt(MAC_C)}"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="ivloop_server"), qemu_process(st.path, *args) as (
        client, pid,
    ):  # fmt: skip
        anchor.expect_join(1)
        st.settle()
        slot = client.my_slot()
        assert client.server_half(slot)["srv_flags"] == KNOWN
        assert client.server_half(slot)["nic_mac"] == MAC_B
        client.publish(MAC_B)
        st.rounds(5)
        assert anchor.take_interrupts(abi.IVL_VEC_MEMBERSHIP) >= 1
        assert not anchor.pending()
        client.publish(MAC_C)  # its management NIC's MAC is not its data NIC's
        anchor.expect_leave(1)
        st.settle()
    (ev,) = [r for r in caplog.records if getattr(r, "event", None) == "evict"]
    assert (ev.pid, ev.qemu_name) == (pid, "vm9")  # type: ignore[attr-defined]
    assert (ev.claimed_mac, ev.nic_mac) == (fmt(MAC_C), fmt(MAC_B))  # type: ignore[attr-defined]
    joins = [r for r in caplog.records if getattr(r, "event", None) == "join"]
    assert [(r.pid, r.qemu_name) for r in joins] == [(pid, "vm9")]  # type: ignore[attr-defined]


def test_map_names_the_data_nic_of_a_two_nic_qemu(
    make_server: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    st = make_server(nic_macs={"vm9": MAC_C}, **FAST)
    args = ["-name", "vm9", "-netdev", "tap,id=a", "-netdev", "tap,id=b",
            "-device", f"e1000,netdev=a,mac={fmt(MAC_B)}",
            "-device", f"e1000,netdev=b,mac={fmt(MAC_C)}"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="ivloop_server"), qemu_process(st.path, *args) as (
        client, _,
    ):  # fmt: skip
        st.settle()
        slot = client.my_slot()
        assert (client.server_half(slot)["srv_flags"], client.server_half(slot)["nic_mac"]) == (
            KNOWN, MAC_C)  # fmt: skip
    nic = [r for r in caplog.records if getattr(r, "event", None) == "nic"]
    assert nic[0].source == "--nic-macs map"  # type: ignore[attr-defined]
    # Without the map the same QEMU is unknown, and says why.
    st2 = make_server(**FAST)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ivloop_server"), qemu_process(st2.path, *args) as (
        client, _,
    ):  # fmt: skip
        st2.settle()
        assert client.server_half(client.my_slot())["srv_flags"] == 0
    nic = [r for r in caplog.records if getattr(r, "event", None) == "nic"]
    assert "2 NICs could be the data NIC" in nic[0].source  # type: ignore[attr-defined]
