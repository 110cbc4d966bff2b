"""The server at full house (issue 29): 64 members, and a storm of joins and leaves.

A real ``ivloop-server`` process (the CLI, ``--max-peers 64`` and the
smallest region that holds 64 peers) is driven through FakeQemu, the
protocol client that decodes messages the way QEMU does; storm.py has the
house, its model of what the server must have done, and the storm.

The server runs with ``--leave-notices`` (the spawn fixture's default, the
documented protocol): only then does a member's own list of peers follow
the leaves, so it can be compared with the live set.  The default mode,
with real QEMUs among the members, is stormed in test_storm_qemu.py.

The storm is seeded: the seed is printed and recorded as a property;
``IVLOOP_STORM_SEED=N`` replays one.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from .conftest import ServerProcess
from .storm import (
    MAX_PEERS,
    MEDIAN_JOIN_LIMIT,
    SERVER_ARGS,
    House,
    ServerUse,
    assert_log_agrees,
    assert_server_flat,
    fake_op,
    fill,
    latency_numbers,
    log_records,
    report,
    run_storm,
    storm_seed,
)

STORM_OPS = 2000
#: Full consistency checks during the storm, every this many operations.
CHECK_EVERY = 250


@pytest.fixture
def house(spawn: Callable[..., ServerProcess]) -> Iterator[House]:
    h = House(spawn(*SERVER_ARGS), leave_notices=True)
    try:
        yield h
    finally:
        h.close()


def test_64_members_fill_the_house_and_the_65th_is_refused(house: House) -> None:
    fill(house)
    house.check()  # (settling at full house, it refuses a QEMU already)
    # IDs 0..63 in slots 0..63: each join took the lowest free slot.
    assert house.slot_of == {i: i for i in range(MAX_PEERS)}
    # The 65th gets -1 where the version belongs, then EOF (QEMU: "server
    # sent version -1"), and the members hear nothing of it.
    house.refused_join()
    house.quiet()
    # A leave makes room again: the freed slot, with a new ID.
    house.leave(17)
    house.drain()
    newcomer = house.join()
    assert (newcomer.own_id, house.slot_of[64]) == (64, 17)
    house.drain()
    house.check()
    house.refused_join()
    assert house.sp.terminate() == 0
    events = Counter(r.get("event") for r in log_records(house.sp))
    assert events["join"] == events["leave"] == house.next_id == 65
    assert events["refuse"] == house.refusals


def test_join_leave_storm_keeps_every_view_consistent_and_the_server_flat(
    house: House, record_property: Callable[[str, object], None]
) -> None:
    """2000 operations in seeded order: joins (refused at full house), leaves,
    bursts of both, and QEMUs killed during their setup.

    Membership swings between a random low-water mark and full house.
    Asserted: each operation's ID, slot and generations as it happens, and
    the directory after each; every CHECK_EVERY operations and at the end,
    each member's own list of peers and its reading of the directory
    against the live set, and the server's eventfds against the live
    members'; then, at full house again, the server's fds exactly as after
    the first fill, its private RSS within PRIVATE_RSS_SLACK_KIB of it, a
    median join latency below MEDIAN_JOIN_LIMIT, a clean stop, and a log
    that agrees (every ID joined and left once, every refusal logged,
    nobody dropped).
    """
    rng = storm_seed(record_property)
    fill(house)  # the warm-up: baselines are taken at full house
    house.check()
    fill_latencies, house.latencies = house.latencies, []
    before = ServerUse.of(house.pid)

    started = time.monotonic()
    ops = run_storm(house, rng, STORM_OPS, fake_op, CHECK_EVERY)
    fill(house)
    house.check()
    house.quiet()
    storm_time = time.monotonic() - started

    # Same membership as at the baseline: the same fds, once the leaves'
    # fds and the refused connections are closed (after their notices).
    after = ServerUse.settled_like(house.pid, before)
    median = statistics.median(house.latencies)
    report({
        "storm_seconds": round(storm_time, 2),
        "storm_ops": dict(sorted(ops.items())),
        "ids_given_out": house.next_id,
        "refusals": house.refusals,
        **latency_numbers("join", house.latencies),
        "fill_join_median_ms": round(statistics.median(fill_latencies) * 1000, 2),
        **before.numbers("before"),
        **after.numbers("after"),
    }, record_property)  # fmt: skip

    assert_server_flat(before, after, house.next_id - MAX_PEERS)
    assert median < MEDIAN_JOIN_LIMIT, f"median join {median * 1000:.1f} ms"
    assert house.sp.terminate() == 0
    assert_log_agrees(house)
