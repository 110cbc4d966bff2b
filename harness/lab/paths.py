"""Which road a guest's traffic takes, read from the driver itself.

The driver publishes each device's peer table in debugfs
(``/sys/kernel/debug/ivloop/<pci address>/peers``: ``id mac state gen
tx_packets tx_bytes rx_packets rx_bytes peer_id``, ``#`` comments) and
per-path counters through ``ethtool -S ivl0``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from harness.errors import GuestError
from harness.lab.guest import Guest

# A glob for the guest's shell: one file per ivshmem device (a guest has one).
PEERS = "/sys/kernel/debug/ivloop/*/peers"
# The driver's knobs: append "on" or "off"; append the ring poller's longest
# window in microseconds (0: doorbells only).
FORCE_LOWER = "ethtool --set-priv-flags ivl0 force-lower"
SET_POLL_US = "ethtool -C ivl0 rx-usecs"
# Prints the current window in microseconds.
GET_POLL_US = "ethtool -c ivl0 | sed -n 's/^rx-usecs: *//p'"


@dataclass(frozen=True)
class Peer:
    id: int
    mac: str
    state: str  # "up" means frames to this MAC use shared memory

    @property
    def shm(self) -> bool:
        return self.state == "up"


def parse_peers(text: str) -> list[Peer]:
    peers = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) < 3:
            continue
        peers.append(Peer(id=int(fields[0]), mac=fields[1].lower(), state=fields[2]))
    return peers


def peers(g: Guest) -> list[Peer] | None:
    """The driver's peer table, or None when no ivshmem device is attached."""
    code, out = g.status(f"cat {PEERS} 2>/dev/null", timeout=10)
    if code != 0 or not out.strip():
        return None
    return parse_peers(out)


def parse_ethtool(text: str) -> dict[str, int]:
    counters = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition(":")
        if sep and value.strip().isdigit():
            counters[name.strip()] = int(value)
    return counters


def counters(g: Guest, dev: str = "ivl0") -> dict[str, int]:
    return parse_ethtool(g.run(f"ethtool -S {dev}", timeout=10))


def describe(g: Guest) -> str:
    """A one-line summary for `harness status`."""
    code, _ = g.status("test -d /sys/class/net/ivl0", timeout=10)
    if code != 0:
        return "lower only (no ivl0)"
    table = peers(g)
    if table is None:
        return "lower (no ivshmem)"
    shm = [p.mac for p in table if p.shm]
    return f"shm to {len(shm)} peer(s)" if shm else "lower"


def wait_peer(g: Guest, mac: str, shm: bool, timeout: float = 30, interval: float = 0.1) -> float:
    """Wait until *g* routes *mac* over shared memory (or not); seconds waited."""
    start = time.monotonic()
    mac = mac.lower()
    while True:
        table = peers(g) or []
        if any(p.mac == mac and p.shm for p in table) == shm:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise GuestError(g.vm, f"wait for {mac} {'on' if shm else 'off'} shm", None,
                             f"peer table after {timeout:.0f} s: {table}")
        time.sleep(interval)
