"""A running topology for VM tests, and helpers to drive traffic in it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from harness import cluster
from harness.guest import Guest
from harness.state import State, StateDir
from harness.topology import Topology


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
            g = cluster.guest(self.sd, self.state, name, timeout=60)
            self._guests[name] = g
        return g

    def reconnect(self, name: str) -> Guest:
        self.drop(name)
        return self.guest(name)

    def drop(self, name: str) -> None:
        g = self._guests.pop(name, None)
        if g is not None:
            g.close()

    def close(self) -> None:
        for name in list(self._guests):
            self.drop(name)

    def ip(self, name: str) -> str:
        return self.topo.vm(name).ip

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
