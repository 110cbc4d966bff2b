"""`harness bench`: the shared path against the lower path and the wire, same run.

On the running topology, for one pair of co-resident VMs, measure

* ``shm``   the pair over the shared ring (normal operation),
* ``lower`` the same pair with ``force-lower`` set on both VMs (virtio-net;
            with vhost-net on KVM, :meth:`harness.lab.accel.Choice.vhost_net`:
            every report records which, ``lower_path``),
* ``wire``  a pair across hosts (virtio-net, tap, bridge, veth wire),

with iperf3, netperf and sockperf, interleaving the paths within every
repetition (shm, lower, wire, shm, lower, wire, ...) so that host noise hits
every path alike.  Every sample carries the sender's driver counters (before
and after); a sample whose counters contradict its path is marked invalid
and :mod:`harness.experiments.bench_report` refuses to use it.

The native ring benchmark (``make -C tests/ring bench-native``) runs first,
and its JSON is stored under ``native``.

``suite="smp"`` (on ``topologies/bench-smp.toml``) measures 2-vCPU guests
instead: 1 against 4 streams on shm and lower, the cross-host pair through
ivl0 against a pair booted without the driver, and a mixture.

``suite="pairs"`` (on ``topologies/many.toml``) runs 1, 2 and 4 co-resident
pairs at once, shm against lower at each step: aggregate iperf3 throughput
and aggregate TCP_RR transactions.

One runner serves every suite (:func:`run`): the checks before a run, what
is recorded about it, the interleaved repetitions and each sample
(:func:`measure`) are the same; what differs is the suite's description in
:mod:`harness.experiments.bench_suites`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import functools
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import GuestError, HarnessError
from harness.experiments.bench_report import counters_problem
from harness.experiments.bench_suites import (
    BUSY_POLL_SUFFIX,
    BY_NAME,
    CLASSIC,
    CLASSIC_SUITE,
    NO_RING_POLL_SUFFIX,
    PAIR_ROLES,
    PATH_ROLES,
    SMP_TOPOLOGY_PATH,
    SUITES,
    VARIANT_SUFFIXES,
    WORKLOADS,
    Suite,
)
from harness.lab import accel as accel_mod
from harness.lab import paths, qemu, vms
from harness.lab.guest import Guest
from harness.lab.state import State, StateDir
from harness.lab.topology import Topology

log = logging.getLogger(__name__)
Say = Callable[[str], None]
# role ("pair", "cross", "plain"; "pair2".."pair4") -> (client, server)
Roles = Mapping[str, tuple[str, str]]
T = TypeVar("T")

UDP_RATE = os.environ.get("IVLOOP_BENCH_UDP_RATE", "100M")  # iperf3 -b: offered load
SOCKPERF_PORT = 11111
SMALL, LARGE = 64, 16384  # sockperf message sizes (bytes)
# Workloads named *_bp run with socket busy polling (net.core.busy_read and
# busy_poll, in µs) on both guests of the pair, whatever the path.
BUSY_POLL_US = int(os.environ.get("IVLOOP_BENCH_BUSY_POLL_US", "200"))
# Workloads named *_irq run with the driver's ring poller off (ethtool's
# rx-usecs 0, paths.SET_POLL_US) on both guests.

SMP_TOPOLOGY = vms.REPO / SMP_TOPOLOGY_PATH
MIX_SEP = "--- ivl-mix ---"  # between the mixture's two iperf3 reports


class BenchError(HarnessError):
    """The benchmark cannot run on this topology (driver, tools or VMs missing)."""


# ---------------------------------------------------------------------------
# workloads: each runs on the client guest and returns its metrics


def _json(text: str) -> dict[str, Any]:
    start = text.find("{")
    data = json.loads(text[start:] if start >= 0 else text)
    if not isinstance(data, dict):
        raise ValueError("iperf3 printed no JSON object")
    if data.get("error"):
        raise ValueError(f"iperf3: {data['error']}")
    return data


def iperf3_tcp(g: Guest, ip: str, secs: int, streams: int) -> dict[str, float]:
    out = _json(g.run(f"iperf3 -c {ip} -t {secs} -P {streams} -J", timeout=secs + 60))
    return {"throughput_mbps": float(out["end"]["sum_received"]["bits_per_second"]) / 1e6}


def iperf3_udp(g: Guest, ip: str, secs: int) -> dict[str, float]:
    out = _json(g.run(f"iperf3 -c {ip} -u -b {UDP_RATE} -t {secs} -J", timeout=secs + 60))
    end = out["end"]
    s = end["sum"]
    loss = float(s["lost_percent"])
    if "sum_received" in end:  # iperf3 >= 3.13 reports the receiver side apart
        bps = float(end["sum_received"]["bits_per_second"])
    else:
        bps = float(s["bits_per_second"]) * (1 - loss / 100)
    return {"throughput_mbps": bps / 1e6, "loss_percent": loss, "jitter_ms": float(s["jitter_ms"])}


def parse_netperf(text: str, names: list[str]) -> dict[str, float]:
    """The values line of ``netperf -P 0 ... -- -o A,B,C`` (last line of numbers)."""
    for line in reversed(text.strip().splitlines()):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(names):
            continue
        try:
            values = [float(f) for f in fields]
        except ValueError:
            continue
        return dict(zip(names, values, strict=True))
    raise ValueError(f"no line of {len(names)} numbers in netperf output: {text[-300:]!r}")


def netperf_rr(g: Guest, ip: str, secs: int, test: str) -> dict[str, float]:
    sel = "THROUGHPUT,MIN_LATENCY,MEAN_LATENCY,P50_LATENCY,P90_LATENCY,P99_LATENCY"
    names = ["transactions_per_s", "lat_min_us", "lat_mean_us", "lat_p50_us", "lat_p90_us",
             "lat_p99_us"]
    text = g.run(f"netperf -P 0 -H {ip} -t {test} -l {secs} -- -o {sel}", timeout=secs + 60)
    return parse_netperf(text, names)


def netperf_stream(g: Guest, ip: str, secs: int) -> dict[str, float]:
    text = g.run(f"netperf -P 0 -H {ip} -t TCP_STREAM -l {secs} -- -o THROUGHPUT",
                 timeout=secs + 60)
    return parse_netperf(text, ["throughput_mbps"])  # netperf's default unit: 10^6 bit/s


_SOCKPERF_AVG = re.compile(r"avg-(?:latency|lat|rtt)\s*=\s*([\d.]+)")
_SOCKPERF_PCT = re.compile(r"--->\s*percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_SOCKPERF_MIN = re.compile(r"--->\s*<MIN> observation\s*=\s*([\d.]+)")


def parse_sockperf(text: str) -> dict[str, float]:
    """sockperf ping-pong summary (microseconds, half round trip by default)."""
    avg = _SOCKPERF_AVG.search(text)
    pct = {float(p): float(v) for p, v in _SOCKPERF_PCT.findall(text)}
    if avg is None or not {50.0, 90.0, 99.0} <= pct.keys():
        raise ValueError(f"no latency summary in sockperf output: {text[-300:]!r}")
    out = {"lat_mean_us": float(avg.group(1)), "lat_p50_us": pct[50.0],
           "lat_p90_us": pct[90.0], "lat_p99_us": pct[99.0]}
    low = _SOCKPERF_MIN.search(text)
    if low:
        out["lat_min_us"] = float(low.group(1))
    return out


def sockperf_pp(g: Guest, ip: str, secs: int, size: int) -> dict[str, float]:
    text = g.run(f"sockperf ping-pong -i {ip} -p {SOCKPERF_PORT} -t {secs} -m {size} 2>&1",
                 timeout=secs + 60)
    return parse_sockperf(text)


Runner = Callable[[Guest, str, int], dict[str, float]]
RUNNERS: dict[str, Runner] = {
    "iperf3_tcp_1": lambda g, ip, t: iperf3_tcp(g, ip, t, 1),
    "iperf3_tcp_4": lambda g, ip, t: iperf3_tcp(g, ip, t, 4),
    "iperf3_udp": iperf3_udp,
    "netperf_tcp_rr": lambda g, ip, t: netperf_rr(g, ip, t, "TCP_RR"),
    "netperf_udp_rr": lambda g, ip, t: netperf_rr(g, ip, t, "UDP_RR"),
    "netperf_tcp_stream": netperf_stream,
    "sockperf_pp_small": lambda g, ip, t: sockperf_pp(g, ip, t, SMALL),
    "sockperf_pp_large": lambda g, ip, t: sockperf_pp(g, ip, t, LARGE),
}
# the variants the report knows (busy poll, ring polling off) run the plain
# workload's runner
RUNNERS.update({w: RUNNERS[w.removesuffix(sfx)]
                for sfx in VARIANT_SUFFIXES for w in WORKLOADS if w.endswith(sfx)})


def parse_mix(text: str) -> tuple[dict[str, float], dict[str, int]]:
    """Two iperf3 -J reports (shm flow, MIX_SEP, wire flow): rates and bytes delivered."""
    shm_text, sep, wire_text = text.partition(MIX_SEP)
    if not sep:
        raise ValueError(f"no '{MIX_SEP}' between the two iperf3 reports: {text[-300:]!r}")
    metrics: dict[str, float] = {}
    flows: dict[str, int] = {}
    for flow, part in (("shm", shm_text), ("wire", wire_text)):
        try:
            received = _json(part)["end"]["sum_received"]
        except ValueError as exc:
            raise ValueError(f"{flow} flow: {exc}") from exc
        metrics[f"{flow}_mbps"] = float(received["bits_per_second"]) / 1e6
        flows[flow] = int(received["bytes"])
    return metrics, flows


def iperf3_mix(g: Guest, shm_ip: str, wire_ip: str,
               secs: int) -> tuple[dict[str, float], dict[str, int]]:
    """One iperf3 stream to each peer, both started at once from *g*."""
    out = "/tmp/ivl-mix"
    text = g.run(f"iperf3 -c {shm_ip} -t {secs} -J > {out}-shm.json 2>/dev/null & "
                 f"iperf3 -c {wire_ip} -t {secs} -J > {out}-wire.json 2>/dev/null & wait; "
                 f"cat {out}-shm.json; echo '{MIX_SEP}'; cat {out}-wire.json",
                 timeout=secs + 60)
    return parse_mix(text)


# ---------------------------------------------------------------------------
# the environment and the native ring benchmark


def _first_line(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (res.stdout or res.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def host_environment(state: State | None = None) -> dict[str, Any]:
    """The machine a bench ran on; qemu_version is the QEMU *state*'s VMs run."""
    return {
        "hostname": platform.node(),
        "host_kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "qemu_version": (state.qemu_banner if state is not None and state.qemu_banner
                         else _first_line([qemu.DEFAULT_BINARY, "--version"])),
        "python": platform.python_version(),
        "commit": _first_line(["git", "-C", str(vms.REPO), "describe", "--always",
                               "--dirty"]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def native(quick: bool) -> dict[str, Any]:
    """Run tests/ring's bench-native target; its one JSON object."""
    env = dict(os.environ)
    if quick:
        env.update(IVL_BENCH_SECONDS="0.2", IVL_BENCH_REPS="3", IVL_BENCH_RTTS="5000")
    argv = ["make", "-s", "--no-print-directory", "-C", str(vms.REPO / "tests" / "ring"),
            "bench-native"]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"native ring benchmark: {exc}") from exc
    if res.returncode != 0:
        raise BenchError(f"native ring benchmark failed ({' '.join(argv)}, exit status "
                         f"{res.returncode}): {res.stderr.strip()[-500:]}")
    try:
        data = json.loads(res.stdout)
    except ValueError as exc:
        raise BenchError(f"native ring benchmark printed no JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BenchError("native ring benchmark: JSON is not an object")
    return data


def _module_hash(g: Guest) -> str | None:
    """The first 12 hex digits of the guest's ivloop.ko: which driver was measured."""
    code, out = g.status("sha256sum /lib/modules/ivl/ivloop.ko", timeout=20)
    digest = out.split()[0] if code == 0 and out.split() else ""
    return digest[:12] if re.fullmatch(r"[0-9a-f]{64}", digest) else None


# ---------------------------------------------------------------------------
# the guests


class _Guests:
    """One SSH session per VM, opened on first use, all closed on exit."""

    def __init__(self, sd: StateDir) -> None:
        self.sd = sd
        self.state = sd.load()
        self._open: dict[str, Guest] = {}

    def __getitem__(self, name: str) -> Guest:
        if name not in self._open:
            self._open[name] = vms.guest(self.sd, self.state, name)
        return self._open[name]

    def close(self) -> None:
        for g in self._open.values():
            g.close()


# ---------------------------------------------------------------------------
# the checks before a run


def role_vms(suite: Suite, roles: Roles) -> list[str]:
    """The VMs a run of *suite* uses, each once, in the order of its roles."""
    return list(dict.fromkeys(name for role in suite.roles for name in roles[role]))


def ends(path: str, roles: Roles) -> tuple[str, str]:
    """(client, server) of a path; for mix the server is the co-resident receiver."""
    return roles[PATH_ROLES[path]]


def check_roles(suite: Suite, topo: Topology, state: State, roles: Roles) -> None:
    """The suite's roles fit the recorded topology (no guest is asked)."""
    missing = [r for r in suite.roles if r not in roles]
    if missing:
        raise BenchError(f"the {suite.name} suite needs VMs for {', '.join(missing)}")
    pair = roles["pair"]
    plain = roles["plain"] if "plain" in suite.roles else None
    names = role_vms(suite, roles)
    up = "'harness up" + (f" --topology {suite.topology}" if suite.topology else "") + "'"
    for name in names:
        topo.vm(name)  # unknown VM -> TopologyError
        if name not in state.vms:
            raise BenchError(f"VM {name} is not running; {up} starts the topology")
    host = {name: state.vms[name].host for name in names}
    pairs = [roles[r] for r in suite.roles if r in PAIR_ROLES]
    for a, b in pairs:
        if host[a] != host[b]:
            raise BenchError(f"the pair {a}, {b} is not co-resident (hosts {host[a]}, "
                             f"{host[b]})")
    in_pairs = [name for p in pairs for name in p]
    if len(pairs) > 1 and len(set(in_pairs)) != len(in_pairs):
        raise BenchError(f"the {suite.name} suite's pairs need {len(in_pairs)} VMs, each in one "
                         "pair; got " + ", ".join(f"{a} -> {b}" for a, b in pairs))
    if "cross" in suite.roles:
        cross = roles["cross"]
        if "mix" in suite.paths and cross[0] != pair[0]:
            raise BenchError(f"the cross pair must start at the pair's client {pair[0]} "
                             f"(the mixture streams from it), not {cross[0]}")
        if host[cross[0]] == host[cross[1]]:
            raise BenchError(f"the cross pair {cross[0]}, {cross[1]} shares host "
                             f"{host[cross[0]]}; it must span two hosts")
        if plain is not None:
            if {*plain} & {*pair, *cross} or plain[0] == plain[1]:
                raise BenchError(f"the no-driver pair {plain[0]}, {plain[1]} must be two VMs "
                                 "of its own, apart from the pair and the cross pair")
            if (host[plain[0]], host[plain[1]]) != (host[cross[0]], host[cross[1]]):
                raise BenchError(
                    f"the no-driver pair {plain[0]} (host {host[plain[0]]}) -> {plain[1]} "
                    f"(host {host[plain[1]]}) must be placed like the cross pair "
                    f"({host[cross[0]]} -> {host[cross[1]]})")
    specs = {name: topo.vm(name) for name in names}
    if suite.min_cpus is not None:
        if len({(s.cpus, s.memory) for s in specs.values()}) != 1:
            raise BenchError(
                f"the {suite.name} suite compares like with like: every VM it uses needs the "
                "same cpus and memory, got " + ", ".join(
                    f"{n} {s.cpus} vCPU/{s.memory} MiB" for n, s in specs.items()))
        cpus = specs[pair[0]].cpus
        if cpus < suite.min_cpus:
            raise BenchError(f"the {suite.name} suite needs guests with cpus >= "
                             f"{suite.min_cpus}, the topology gives {cpus} ({up})")
    if not state.driver:
        raise BenchError("the topology was started with --no-driver: there is no ivl0")
    for name in names:
        if name in (plain or ()):
            continue
        if not vms.driver_for(state, specs[name]):
            raise BenchError(f"{name} runs without the driver; the {suite.name} suite needs "
                             "it there")
    for name in plain or ():
        if vms.driver_for(state, specs[name]):
            raise BenchError(f"{name} loads the driver; the no-driver pair needs "
                             "'driver = false' in the topology")


def _check_tools(g: Guest, tools: set[str]) -> None:
    _, out = g.status(f"for t in {' '.join(sorted(tools))}; do command -v $t; done",
                      timeout=20)
    missing = [t for t in sorted(tools) if f"/{t}" not in out]
    if missing:
        raise BenchError(f"{g.vm}: missing in the guest: {', '.join(missing)} "
                         "(rebuild the image: make image)")


def _preflight(gs: _Guests, suite: Suite, roles: Roles, workloads: tuple[str, ...]) -> None:
    """The roles fit, and every guest has its tools, its vCPUs and its ivl0 (or none)."""
    state = gs.state
    topo = vms.topology_of(state)
    check_roles(suite, topo, state, roles)
    plain = roles["plain"] if "plain" in suite.roles else ()
    tools = {"iperf3"}
    tools |= {"netperf"} if any(w.startswith("netperf") for w in workloads) else set()
    tools |= {"sockperf"} if any(w.startswith("sockperf") for w in workloads) else set()
    for name in role_vms(suite, roles):
        g = gs[name]
        _check_tools(g, tools)
        if suite.min_cpus is not None:
            cpus = topo.vm(name).cpus
            seen = g.run("grep -c ^processor /proc/cpuinfo", timeout=20).strip()
            if seen != str(cpus):
                raise BenchError(f"{name}: the guest sees {seen} CPUs, the topology gives {cpus}")
        code, text = g.status("ethtool -S ivl0", timeout=20)
        if name in plain:
            if code == 0:
                raise BenchError(f"{name}: has an ivl0 although it booted without the driver")
            addrs = g.run("ip -4 addr show dev eth0", timeout=20)
            if f"{topo.vm(name).ip}/" not in addrs:
                raise BenchError(f"{name}: eth0 does not carry {topo.vm(name).ip}: "
                                 f"{addrs.strip()[-200:]}")
            continue
        if code != 0 or not {"shm_tx_bytes", "lower_tx_bytes"} <= paths.parse_ethtool(
                text).keys():
            raise BenchError(f"{name}: 'ethtool -S ivl0' gives no shm_tx_bytes/lower_tx_bytes "
                             f"(is ivloop.ko loaded? check its console log): "
                             f"{text.strip()[-200:]}")
    pairs = [roles[r] for r in suite.roles if r in PAIR_ROLES]
    for name in (name for p in pairs for name in p):
        code, text = gs[name].status("ethtool --show-priv-flags ivl0", timeout=20)
        if code != 0 or "force-lower" not in text:
            raise BenchError(f"{name}: ivl0 has no 'force-lower' private flag: {text.strip()}")
        gs[name].run(f"{paths.FORCE_LOWER} off", timeout=20)  # an interrupted run's
    for src, dst in [way for p in pairs for way in (p, p[::-1])]:
        try:
            paths.wait_peer(gs[src], topo.vm(dst).mac, shm=True, timeout=60)
        except GuestError as exc:
            raise BenchError(f"{src} does not route {dst} over shared memory: {exc}") from exc


# ---------------------------------------------------------------------------
# the guests' settings for a sample


@contextlib.contextmanager
def _sockperf_servers(gs: _Guests, servers: list[str], ips: dict[str, str]) -> Iterator[None]:
    try:
        for name in servers:
            g = gs[name]
            g.status("killall -q sockperf; true", timeout=20)
            # Detached, its output kept: a server that died tells us why.
            g.run(f"(sockperf server -i {ips[name]} -p {SOCKPERF_PORT} "
                  "> /tmp/sockperf-server.log 2>&1 < /dev/null &)", timeout=20)
        for name in servers:
            _wait_listening(gs[name], name)
        yield
    finally:
        for name in servers:
            with contextlib.suppress(HarnessError):
                gs[name].status("killall -q sockperf; true", timeout=20)


def _wait_listening(g: Guest, name: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, _ = g.status("pidof sockperf >/dev/null", timeout=10)
        if code == 0:
            return
        time.sleep(0.2)
    _, log_text = g.status("cat /tmp/sockperf-server.log", timeout=10)
    raise BenchError(f"{name}: sockperf server did not start: {log_text.strip()[-300:]}")


@contextlib.contextmanager
def _set_on(gs: _Guests, names: tuple[str, ...], on: str, off: str | dict[str, str],
            what: str) -> Iterator[None]:
    """Run *on* in each guest of *names*; *off* (or each guest's own, from a dict)
    afterwards, whatever happened."""
    try:
        for name in names:
            gs[name].run(on, timeout=20)
        yield
    finally:
        for name in names:
            try:
                gs[name].run(off if isinstance(off, str) else off[name], timeout=20)
            except HarnessError as exc:
                log.error("%s: could not turn %s off: %s", name, what, exc)


Setting = contextlib.AbstractContextManager[None]


def _busy_poll(gs: _Guests, names: tuple[str, ...], us: int) -> Setting:
    """Socket busy polling on both ends: the same sysctls for every path."""
    sysctl = "sysctl -qw net.core.busy_read={0} net.core.busy_poll={0}"
    return _set_on(gs, names, sysctl.format(us), sysctl.format(0), "busy polling")


def _ring_poll_off(gs: _Guests, names: tuple[str, ...]) -> Setting:
    """rx-usecs 0 on both ends (doorbells only); each guest's own value back afterwards."""
    now = {name: _poll_us(gs[name]) for name in names}
    back = {name: f"{paths.SET_POLL_US} {value}" for name, value in now.items()}
    return _set_on(gs, names, f"{paths.SET_POLL_US} 0", back, "ring polling off")


def _poll_us(g: Guest) -> int:
    """The driver's longest ring-poll window on ivl0 (ethtool rx-usecs), in µs."""
    text = g.run(paths.GET_POLL_US, timeout=20).strip()
    if not text.isdigit():
        raise BenchError(f"{g.vm}: ivl0 reports no rx-usecs (ring poll window): {text[:80]!r}")
    return int(text)


def _variant(gs: _Guests, workload: str, names: tuple[str, ...]) -> Setting:
    """The guest setting a workload variant runs under (none for a plain workload)."""
    if workload.endswith(BUSY_POLL_SUFFIX):
        return _busy_poll(gs, names, BUSY_POLL_US)
    if workload.endswith(NO_RING_POLL_SUFFIX):
        return _ring_poll_off(gs, names)
    return contextlib.nullcontext()


def _forced_lower(gs: _Guests, names: tuple[str, ...]) -> Setting:
    return _set_on(gs, names, f"{paths.FORCE_LOWER} on", f"{paths.FORCE_LOWER} off",
                   "force-lower")


def cpu_jiffies(g: Guest) -> tuple[int, int]:
    """(all, idle) jiffies of the guest's CPUs, from the first line of /proc/stat."""
    fields = g.run("head -n 1 /proc/stat", timeout=20).split()
    try:
        ticks = [int(f) for f in fields[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # idle + iowait
    except (ValueError, IndexError):
        raise BenchError(f"{g.vm}: /proc/stat does not start with a cpu line: "
                         f"{' '.join(fields)[:100]!r}") from None


def busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    total, idle = after[0] - before[0], after[1] - before[1]
    return 100.0 * (total - idle) / total if total > 0 else 0.0


def tx_counters(g: Guest, driver: bool) -> dict[str, int]:
    """What the client sent so far: ivl0's per-path bytes, or eth0's without the driver."""
    if driver:
        c = paths.counters(g)
        return {k: c.get(k, 0) for k in ("shm_tx_bytes", "lower_tx_bytes")}
    text = g.run("cat /sys/class/net/eth0/statistics/tx_bytes", timeout=20).strip()
    if not text.isdigit():
        raise BenchError(f"{g.vm}: eth0's tx_bytes is not a number: {text[:80]!r}")
    return {"eth0_tx_bytes": int(text)}


# ---------------------------------------------------------------------------
# one sample


def flows_of(suite: Suite, path: str, workload: str, roles: Roles) -> list[tuple[str, str]]:
    """(client, server) of each pair that runs a cell at once: the path's two ends, or
    the suite's first co-resident pairs for a workload of :attr:`Suite.at_once`."""
    return [roles[r] for r in suite.flow_roles(workload)] or [ends(path, roles)]


def at_once(jobs: list[Callable[[], T]]) -> list[T]:
    """Run *jobs* together, a thread each, released at one barrier; their results in order.

    Every job ends before anything is raised (the first failed job's exception,
    in the order given), so no client is left running into the next sample.
    """
    if len(jobs) == 1:
        return [jobs[0]()]
    barrier = threading.Barrier(len(jobs))

    def go(job: Callable[[], T]) -> T:
        barrier.wait(timeout=60)
        return job()

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(go, job) for job in jobs]
        concurrent.futures.wait(futures)
    return [f.result() for f in futures]


def _sum(values: list[dict[str, int]]) -> dict[str, int]:
    return {k: sum(v[k] for v in values) for k in values[0]}


def measure(gs: _Guests, path: str, workload: str, *, roles: Roles, ips: Mapping[str, str],
            secs: int, rep: int, suite: Suite = CLASSIC) -> dict[str, Any]:
    """One sample of a cell: counters, the workload (retried once if it fails), counters.

    Also how busy the guests' CPUs were: the shared path moves work from QEMU
    (native) into the guests (emulated under TCG), so CPU is part of the result.
    A cell of several pairs (:attr:`Suite.at_once`) starts every pair's client
    at once; its metrics are the sums of theirs, each pair's own in ``flows``,
    and every client's counters must show the path.  The sample has every key
    a suite may record (``flow_bytes``: mix only; ``flows``: several pairs only).
    """
    flows = flows_of(suite, path, workload, roles)
    base = suite.at_once[workload][0] if workload in suite.at_once else workload
    clients = [c for c, _ in flows]
    names = tuple(dict.fromkeys(n for f in flows for n in f))
    driver = path != "nodriver"
    error: str | None = None
    results: list[dict[str, float]] = []
    mix_bytes: dict[str, int] | None = None
    lower = _forced_lower(gs, names) if path == "lower" else contextlib.nullcontext()
    with lower, _variant(gs, base, names):  # a variant's suffix ends its base's name
        before = {c: tx_counters(gs[c], driver) for c in clients}
        cpu_before = {n: cpu_jiffies(gs[n]) for n in names}
        for attempt in (1, 2):
            try:
                if path == "mix":
                    pair = roles["pair"]
                    mixed, mix_bytes = iperf3_mix(gs[pair[0]], ips[pair[1]],
                                                  ips[roles["cross"][1]], secs)
                    results = [mixed]
                else:
                    results = at_once([functools.partial(RUNNERS[base], gs[c], ips[s], secs)
                                       for c, s in flows])
                error = None
                break
            except (GuestError, ValueError, KeyError, TypeError,
                    threading.BrokenBarrierError) as exc:
                error = f"{exc.__class__.__name__}: {exc}"
                log.warning("%s/%s rep %d attempt %d failed: %s", path, workload, rep,
                            attempt, error)
                time.sleep(1)
        cpu_after = {n: cpu_jiffies(gs[n]) for n in names}
        after = {c: tx_counters(gs[c], driver) for c in clients}
    counters = {c: {k: after[c][k] - before[c].get(k, 0) for k in after[c]} for c in clients}
    if error is None:
        wrong = [(c, p) for c in clients if (p := counters_problem(path, counters[c], mix_bytes))]
        if wrong:
            error = "; ".join(p if len(clients) == 1 else f"{c}: {p}" for c, p in wrong)
    busy = {n: round(busy_percent(cpu_before[n], cpu_after[n]), 1) for n in names}

    def cpu(pairs: list[tuple[str, str]]) -> dict[str, float]:
        return {"client_busy_pct": round(statistics.fmean(busy[c] for c, _ in pairs), 1),
                "server_busy_pct": round(statistics.fmean(busy[s] for _, s in pairs), 1)}

    metrics = results[0] if results else {}
    sample: dict[str, Any] = {
        "path": path, "workload": workload, "rep": rep, "client": clients[0],
        "server": flows[0][1], "valid": error is None, "error": error, "metrics": metrics,
        "counters": _sum(list(counters.values())), "cpu": cpu(flows)}
    if mix_bytes is not None:
        sample["flow_bytes"] = mix_bytes
    if workload in suite.at_once:
        sample["metrics"] = {m: sum(r[m] for r in results) for m in suite.workloads[workload][1]
                             if results and all(m in r for r in results)}
        sample["flows"] = [{"client": c, "server": s, "metrics": results[i] if results else {},
                            "counters": counters[c], "cpu": cpu([(c, s)])}
                           for i, (c, s) in enumerate(flows)]
    return sample


def _summary(sample: dict[str, Any]) -> str:
    if not sample["valid"]:
        return f"INVALID ({sample['error']})"
    m = sample["metrics"]
    if sample["path"] == "mix":
        return f"{m['shm_mbps']:.0f} + {m['wire_mbps']:.0f} Mbit/s (shm + wire)"
    for key, fmt in (("throughput_mbps", "{:.0f} Mbit/s"), ("transactions_per_s", "{:.0f} tr/s"),
                     ("lat_mean_us", "{:.0f} µs mean")):
        if key in m:
            each = [f"{f['metrics'][key]:.0f}" for f in sample.get("flows", ())
                    if key in f["metrics"]]
            return fmt.format(m[key]) + (f" ({' + '.join(each)})" if len(each) > 1 else "")
    return "ok"


# ---------------------------------------------------------------------------
# the run


def _environment(gs: _Guests, suite: Suite, roles: Roles, secs: int) -> dict[str, Any]:
    """The host's environment and what *suite* records about its guests and the run."""
    state = gs.state
    topo = vms.topology_of(state)
    pair, cross = roles["pair"], roles["cross"]
    g = gs[pair[0]]
    facts: dict[str, Callable[[], object]] = {
        "accelerator": lambda: state.accel,
        "lower_path": lambda: accel_mod.lower_path(state.accel, state.vhost_net),
        "topology": lambda: state.topology_source,
        "guest_kernel": lambda: g.run("uname -r", timeout=20).strip(),
        "guest_vcpus": lambda: topo.vm(pair[0]).cpus,
        "guest_memory_mib": lambda: topo.vm(pair[0]).memory,
        "iperf3": lambda: g.run("iperf3 --version 2>&1 | head -n 1", timeout=20).strip(),
        "driver_sha256": lambda: _module_hash(g),
        "pair": lambda: f"{pair[0]} -> {pair[1]} (host {state.vms[pair[0]].host})",
        "cross": lambda: (f"{cross[0]} (host {state.vms[cross[0]].host}) -> {cross[1]} "
                          f"(host {state.vms[cross[1]].host})"),
        "hosts": lambda: {name: state.vms[name].host for name in role_vms(suite, roles)},
        "seconds": lambda: secs,
        "udp_rate": lambda: UDP_RATE,
        "sockperf_sizes": lambda: [SMALL, LARGE],
        "busy_poll_us": lambda: BUSY_POLL_US,
        "ring_poll_us": lambda: _poll_us(g),
    }  # fmt: skip
    env = host_environment(state)
    env.update({key: facts[key]() for key in suite.environment})  # in this order
    return env


def _path_ends(suite: Suite, roles: Roles) -> dict[str, dict[str, Any]]:
    """Each path's client and server, as the classic suite's JSON records them."""
    out: dict[str, dict[str, Any]] = {}
    for path in suite.paths:
        client, server = ends(path, roles)
        out[path] = {"client": client, "server": server, "force_lower": path == "lower"}
    return out


def _native_results(native_json: Path | None, with_native: bool, quick: bool,
                    say: Say) -> dict[str, Any]:
    """The classic suite's native ring results, and when they were measured."""
    if native_json is not None:
        try:
            results = json.loads(native_json.read_text())
        except (OSError, ValueError) as exc:
            raise BenchError(f"{native_json}: no native ring results: {exc}") from exc
        return {"native": results, "native_measured": f"before the run ({native_json.name})"}
    if not with_native:
        return {}
    out: dict[str, Any] = {"native_measured": "during the run, with the VMs up"}
    say("native ring benchmark (tests/ring bench-native)...")
    try:
        out["native"] = native(quick)
        ref = out["native"].get("reference", {})
        say(f"native ring: {ref.get('ring_gbps')} GB/s at 64 KiB records, memcpy "
            f"{ref.get('memcpy_out_of_cache_gbps')} GB/s out of cache / "
            f"{ref.get('memcpy_in_cache_gbps')} GB/s in cache")
    except BenchError as exc:
        log.error("%s", exc)
        out["native_error"] = str(exc)
    return out


def run(sd: StateDir, *, pair: tuple[str, str] = ("vm1", "vm2"),
        cross: tuple[str, str] = ("vm1", "vm3"), reps: int = 5, quick: bool = False,
        out_dir: Path, say: Say | None = None, with_native: bool = True,
        native_json: Path | None = None, suite: str = CLASSIC_SUITE,
        plain: tuple[str, str] = ("vm4", "vm5"),
        more_pairs: tuple[tuple[str, str], ...] = (("vm3", "vm4"), ("vm5", "vm6"),
                                                   ("vm7", "vm8"))) -> Path:
    """Run *suite* on the running topology; write ``out_dir/bench.json`` and return its path.

    The classic suite benchmarks the three paths.  *native_json*: results of
    ``make -C tests/ring bench-native`` taken earlier (e.g. before the VMs
    booted, so that idle guests do not share the cores); otherwise the native
    benchmark runs here unless *with_native* is false.

    *suite* ``"smp"`` runs the 2-vCPU suite instead (*plain* is its no-driver
    pair; the native benchmark is the classic suite's, not run there).
    *suite* ``"pairs"`` runs *pair* and *more_pairs* (its second to fourth
    co-resident pairs) 1, 2 and 4 at once.
    """
    if suite not in SUITES:
        raise BenchError(f"unknown benchmark suite {suite!r} (suites: {', '.join(SUITES)})")
    s = BY_NAME[suite]
    say = say or (lambda text: log.info("%s", text))
    if reps < 1:
        raise BenchError(f"reps must be at least 1, got {reps}")
    workloads = s.run_workloads(quick)
    cells = s.cells_of(workloads)
    secs = 1 if quick else int(os.environ.get("IVLOOP_BENCH_SECONDS", "3"))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench.json"
    roles = {"pair": pair, "cross": cross, "plain": plain,
             **dict(zip(PAIR_ROLES[1:], more_pairs, strict=False))}

    gs = _Guests(sd)
    try:
        topo = vms.topology_of(gs.state)
        _preflight(gs, s, roles, workloads)
        names = role_vms(s, roles)
        # Whatever a suite's JSON may hold; its document picks (and orders) the keys.
        record: dict[str, Any] = {
            "schema": s.schema, "suite": s.name, "reps": reps, "quick": quick, "seconds": secs,
            "environment": _environment(gs, s, roles, secs), "workloads": list(workloads),
            "paths": _path_ends(s, roles),
            "roles": {r: list(roles[r]) for r in s.roles}, "cells": [list(c) for c in cells],
            "samples": [], "native": None, "duration_s": None,
        }  # fmt: skip
        doc = {key: record[key] for key in s.document}
        if "native" in s.document:
            doc.update(_native_results(native_json, with_native, quick, say))
        ips = {name: topo.vm(name).ip for name in names}
        servers = [ends(p, roles)[1] for p, w in cells if w.startswith("sockperf")]
        start = time.monotonic()
        with _sockperf_servers(gs, list(dict.fromkeys(servers)), ips):
            for rep in range(reps):
                for path, w in s.rep_cells(workloads, rep):
                    full = measure(gs, path, w, roles=roles, ips=ips, secs=secs, rep=rep,
                                   suite=s)
                    sample = {key: full[key] for key in s.sample if key in full}
                    doc["samples"].append(sample)
                    say(s.progress.format(rep=rep + 1, reps=reps, workload=w, path=path,
                                          summary=_summary(sample)))
                if "duration_s" in doc:
                    doc["duration_s"] = round(time.monotonic() - start, 1)
                # Partial results survive an interrupted run.
                json_path.write_text(json.dumps(doc, indent=1))
    finally:
        gs.close()
    return json_path
