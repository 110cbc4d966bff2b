"""A running topology for VM tests, and helpers to drive traffic in it."""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness import migrate as migrate_mod
from harness.experiments.soak import KERNEL_TROUBLE
from harness.lab import paths, topology, vms
from harness.lab.guest import Guest
from harness.lab.state import State, StateDir
from harness.lab.topology import Topology

#: The longest a round-trip migration test streams: two migrations on a
#: loaded 2-core machine and the seconds around them.  Watch.end_after()
#: ends the stream a few seconds after the return, however long that took.
ROUND_TRIP_MAX_S = 120


@dataclass
class Lab:
    sd: StateDir
    topo: Topology
    _guests: dict[str, Guest] = field(default_factory=dict)

    @property
    def state(self) -> State:
        return self.sd.load()

    def guest(self, name: str) -> Guest:
        g = self._guests.get(name)
        if g is None:
            g = vms.guest(self.sd, self.state, name, timeout=60)
            self._guests[name] = g
        return g

    def reconnect(self, name: str) -> Guest:
        self.drop(name)
        return self.guest(name)

    def drop(self, name: str) -> None:
        g = self._guests.pop(name, None)
        if g is not None:
            g.close()

    def migrate(self, name: str, source: str, dest: str, **kw: Any) -> migrate_mod.Report:
        """``harness migrate`` of *name*; its SSH session goes (it ran through the source)."""
        with self.sd:
            report = migrate_mod.migrate(self.sd, name, source, dest, **kw)
        self.drop(name)
        return report

    def close(self) -> None:
        for name in list(self._guests):
            self.drop(name)

    def ip(self, name: str) -> str:
        return self.topo.vm(name).ip

    def mac(self, name: str) -> str:
        return self.topo.vm(name).mac

    # traffic ----------------------------------------------------------
    def ping(self, src: str, dst_ip: str, count: int = 3, interval: float = 0.2) -> int:
        """Packets lost out of *count*."""
        out = self.guest(src).run(f"ping -c {count} -i {interval} -W 2 {dst_ip} || true",
                                  timeout=count * interval + 30)
        m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", out)
        assert m, f"unexpected ping output: {out}"
        return int(m.group(1)) - int(m.group(2))

    def iperf3(self, src: str, dst: str, seconds: int = 3, extra: str = "") -> dict[str, Any]:
        out = self.guest(src).run(f"iperf3 -c {self.ip(dst)} -t {seconds} -J {extra}",
                                  timeout=seconds + 60)
        result: dict[str, Any] = json.loads(out)
        return result


def received_bytes(iperf: dict[str, Any]) -> int:
    end = iperf["end"]
    summary = end.get("sum_received") or end.get("sum")
    return int(summary["bytes"])


def mbps(iperf: dict[str, Any]) -> float:
    end = iperf["end"]
    summary = end.get("sum_received") or end.get("sum")
    return float(summary["bits_per_second"]) / 1e6


# ---------------------------------------------------------------------------
# helpers for the issue-16 tests (test_smp, test_mesh, test_isolation)

TOPOLOGIES = Path(harness.__file__).resolve().parent / "topologies"


def topology_file(name: str) -> Topology:
    """A topology shipped in harness/topologies/ (e.g. "smp.toml")."""
    return topology.load(TOPOLOGIES / name)


@dataclass(frozen=True)
class PeerRow:
    """One line of the driver's peers file, with its per-peer counters."""

    id: int
    mac: str
    state: str
    gen: int
    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int
    peer_id: int | None


def parse_peer_rows(text: str) -> list[PeerRow]:
    """The peers file (``id mac state gen tx_packets tx_bytes rx_packets
    rx_bytes [peer_id]``); raises on a row it cannot read, so a format change
    fails loudly instead of reading as zero traffic."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 8:
            raise AssertionError(f"peers file row with {len(fields)} fields: {line!r}")
        gen, txp, txb, rxp, rxb = (int(f) for f in fields[3:8])
        rows.append(PeerRow(id=int(fields[0]), mac=fields[1].lower(), state=fields[2],
                            gen=gen, tx_packets=txp, tx_bytes=txb, rx_packets=rxp,
                            rx_bytes=rxb,
                            peer_id=int(fields[8]) if len(fields) > 8 else None))
    return rows


def peer_rows(g: Guest) -> list[PeerRow]:
    """*g*'s peer table; empty when it has no ivshmem device attached.
    paths.PEERS may be a glob (one file per device): the shell expands it."""
    code, out = g.status(f"cat {paths.PEERS} 2>/dev/null", timeout=10)
    return parse_peer_rows(out) if code == 0 else []


def rows_for(rows: list[PeerRow], mac: str) -> list[PeerRow]:
    return [r for r in rows if r.mac == mac.lower()]


def row_deltas(before: list[PeerRow], after: list[PeerRow]) -> list[PeerRow]:
    """*after*'s rows with each counter less its value in *before*'s row of the
    same slot.  The driver's per-peer counters belong to the slot and outlive
    its occupant, so a slot that changed hands (or a MAC that moved to another
    slot) is only compared with itself; a counter that went down was reset
    and counts from zero."""
    old = {r.id: r for r in before}

    def less(now: int, then: int) -> int:
        return now - then if now >= then else now

    out = []
    for r in after:
        b = old.get(r.id)
        if b is None:
            out.append(r)
            continue
        out.append(PeerRow(id=r.id, mac=r.mac, state=r.state, gen=r.gen,
                           tx_packets=less(r.tx_packets, b.tx_packets),
                           tx_bytes=less(r.tx_bytes, b.tx_bytes),
                           rx_packets=less(r.rx_packets, b.rx_packets),
                           rx_bytes=less(r.rx_bytes, b.rx_bytes), peer_id=r.peer_id))
    return out


def deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """after - before for every counter of *after* (a new counter starts at 0)."""
    return {k: v - before.get(k, 0) for k, v in after.items()}


def kernel_trouble(g: Guest) -> list[str]:
    """dmesg lines that mean real kernel trouble (harness.experiments.soak's pattern)."""
    return [line for line in g.run("dmesg").splitlines() if KERNEL_TROUBLE.search(line)]


def server_log(sd: StateDir, host: str, since: float = 0.0) -> list[dict[str, Any]]:
    """Records of *host*'s ivloop-server log (JSON lines) stamped at or after *since*."""
    records = []
    for line in sd.file("logs", f"server-{host}.log").read_text().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and float(obj.get("ts", 0)) >= since:
            records.append(obj)
    return records


@dataclass(frozen=True)
class PingRun:
    sent: int
    received: int
    rtts_ms: list[float]

    @property
    def lost(self) -> int:
        return self.sent - self.received

    @property
    def max_ms(self) -> float:
        return max(self.rtts_ms, default=float("inf"))

    def percentile(self, q: float) -> float:
        """The *q* quantile (0..1) of the round trips, nearest rank."""
        if not self.rtts_ms:
            return float("inf")
        ordered = sorted(self.rtts_ms)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def parse_ping(text: str) -> PingRun:
    """busybox ping's output: every reply's time, and the summary counts."""
    m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", text)
    if not m:
        raise AssertionError(f"no ping summary in: {text[-500:]}")
    rtts = [float(t) for t in re.findall(r"seq=\d+ ttl=\d+ time=([\d.]+) ms", text)]
    return PingRun(sent=int(m.group(1)), received=int(m.group(2)), rtts_ms=rtts)


def in_ns(ns: str | None, command: str) -> str:
    """*command* run in the guest's network namespace *ns* (None: the guest's own).
    iproute2's ip by path: busybox's sh prefers its own applets, ip included."""
    return command if ns is None else f"/sbin/ip netns exec {ns} {command}"


def start_hashing_receiver(g: Guest, port: int, ns: str | None = None) -> str:
    """nc listening on *port* in *g* (in its namespace *ns*), handing the socket
    to sha256sum, which writes /tmp/rx-PORT.sum (busybox nc copies 1 KiB per
    syscall; the program reads the socket itself).  Returns once it listens;
    the value is the receiver's log, for :func:`collect`."""
    rx = f"/tmp/rx-{port}"
    spawn(g, in_ns(ns, f"nc -l -p {port} -e sh -c 'sha256sum > {rx}.sum'"), f"{rx}.log")
    g.run(in_ns(ns, f"sh -c 't=0; until netstat -ltn | grep -q \":{port} \"; do sleep 0.1; "
                    f"t=$((t + 1)); [ $t -gt 100 ] && exit 1; done; true'"))
    return f"{rx}.log"


def spawn(g: Guest, command: str, log: str) -> None:
    """Start *command* in *g*'s background, detached from the SSH session (it
    survives the session and a migration): stdout and stderr to *log*, its
    exit status to *log*.rc when it ends (see :func:`collect`)."""
    inner = shlex.quote(f"{command}; echo $? > {log}.rc")
    g.run(f"rm -f {log} {log}.rc; (setsid sh -c {inner} > {log} 2>&1 < /dev/null &)")


def collect(g: Guest, log: str, timeout: float) -> tuple[int, str]:
    """Wait for a command :func:`spawn` started to end; its exit status and output."""
    ticks = max(1, int(timeout * 5))
    code, _ = g.status(f"t=0; until [ -s {log}.rc ]; do sleep 0.2; t=$((t + 1)); "
                       f"[ $t -gt {ticks} ] && exit 1; done; true", timeout=timeout + 30)
    if code != 0:
        raise AssertionError(f"{g.vm}: '{log}' still running after {timeout:.0f} s: "
                             + g.run(f"tail -c 2000 {log}", check=False))
    return int(g.run(f"cat {log}.rc").strip()), g.run(f"cat {log}")
