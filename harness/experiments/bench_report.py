"""The benchmark's report: validate the raw samples, then summarise them.

Pure functions over the JSON that :mod:`harness.experiments.bench` writes::

    {"schema": 1, "reps": 5, "quick": false, "seconds": 3,
     "environment": {...}, "paths": {"shm": {...}, "lower": {...}, "wire": {...}},
     "workloads": ["iperf3_tcp_1", ...],
     "samples": [{"path": "shm", "workload": "iperf3_tcp_1", "rep": 0,
                  "valid": true, "error": null,
                  "counters": {"shm_tx_bytes": N, "lower_tx_bytes": N},
                  "metrics": {"throughput_mbps": 812.5}}, ...],
     "native": {...} | null}

Nothing is printed from data that fails validation: :func:`validate` raises
:class:`BenchReportError` naming every sample and field that is wrong.  A
document with ``"suite": "smp"`` (2-vCPU guests) has its own cells and report:
:func:`validate_smp`, :func:`smp_markdown`; :func:`write` picks by the suite.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from harness.errors import HarnessError

SCHEMA = 1
CLASSIC_SUITE = "paths"  # shm / lower / wire over many workloads; no "suite" key in its JSON
PATHS = ("shm", "lower", "wire")
MIN_REPS = 5  # a full (not --quick) run needs at least this many per cell
MAX_PROBLEMS = 20  # listed in one error message

# Metric -> True when higher is better.
HIGHER_BETTER = {
    "throughput_mbps": True,
    "transactions_per_s": True,
    "loss_percent": False,
    "jitter_ms": False,
    "lat_min_us": False,
    "lat_mean_us": False,
    "lat_p50_us": False,
    "lat_p90_us": False,
    "lat_p99_us": False,
}

# Workload -> (description, required metrics).
WORKLOADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "iperf3_tcp_1": ("iperf3 TCP, 1 stream", ("throughput_mbps",)),
    "iperf3_tcp_4": ("iperf3 TCP, 4 streams", ("throughput_mbps",)),
    "iperf3_udp": ("iperf3 UDP, fixed offered rate",
                   ("throughput_mbps", "loss_percent", "jitter_ms")),
    "netperf_tcp_rr": ("netperf TCP_RR", ("transactions_per_s", "lat_mean_us", "lat_p50_us",
                                          "lat_p90_us", "lat_p99_us")),
    "netperf_udp_rr": ("netperf UDP_RR", ("transactions_per_s", "lat_mean_us", "lat_p50_us",
                                          "lat_p90_us", "lat_p99_us")),
    "netperf_tcp_stream": ("netperf TCP_STREAM", ("throughput_mbps",)),
    "sockperf_pp_small": ("sockperf UDP ping-pong, 64 B (half RTT)",
                          ("lat_mean_us", "lat_p50_us", "lat_p90_us", "lat_p99_us")),
    "sockperf_pp_large": ("sockperf UDP ping-pong, 16 KiB (half RTT)",
                          ("lat_mean_us", "lat_p50_us", "lat_p90_us", "lat_p99_us")),
    # the same with socket busy polling on both guests (bench.BUSY_POLL_US);
    # the name is the plain workload's plus BUSY_POLL_SUFFIX
    "iperf3_tcp_1_bp": ("iperf3 TCP, 1 stream, busy poll", ("throughput_mbps",)),
    "netperf_tcp_rr_bp": ("netperf TCP_RR, busy poll", ("transactions_per_s", "lat_mean_us",
                                                        "lat_p50_us", "lat_p90_us",
                                                        "lat_p99_us")),
    "sockperf_pp_small_bp": ("sockperf UDP ping-pong, 64 B, busy poll",
                             ("lat_mean_us", "lat_p50_us", "lat_p90_us", "lat_p99_us")),
    # the same with the driver's ring poller off (rx-usecs 0) on both guests:
    # every frame to an idle peer waits for a doorbell
    "iperf3_tcp_1_irq": ("iperf3 TCP, 1 stream, ring polling off", ("throughput_mbps",)),
    "netperf_tcp_rr_irq": ("netperf TCP_RR, ring polling off",
                           ("transactions_per_s", "lat_mean_us", "lat_p50_us", "lat_p90_us",
                            "lat_p99_us")),
    "sockperf_pp_small_irq": ("sockperf UDP ping-pong, 64 B, ring polling off",
                              ("lat_mean_us", "lat_p50_us", "lat_p90_us", "lat_p99_us")),
}

BUSY_POLL_SUFFIX = "_bp"
NO_RING_POLL_SUFFIX = "_irq"
VARIANT_SUFFIXES = (BUSY_POLL_SUFFIX, NO_RING_POLL_SUFFIX)
# (workload-name suffix, headline-key suffix, how the targets' lines say it)
TARGET_VARIANTS = (("", "", "default settings"),
                   (BUSY_POLL_SUFFIX, "_busy_poll", "socket busy polling ({} µs) on both guests"),
                   (NO_RING_POLL_SUFFIX, "_no_ring_poll",
                    "ring polling off (rx-usecs 0, doorbells only)"))

CPU_KEYS = ("client_busy_pct", "server_busy_pct")

UNITS = {"throughput_mbps": "Mbit/s", "transactions_per_s": "trans/s", "loss_percent": "%",
         "jitter_ms": "ms"}

# A sample counts for a path only if the sender's driver counters agree.
SHM_MIN_SHARE = 0.9  # shm: at least this share of the bytes sent went through the ring
LOWER_MAX_SHM_SHARE = 0.01  # lower/wire: at most this share went through a ring


class BenchReportError(HarnessError):
    """The benchmark JSON is missing, malformed or has too few valid samples."""


def path_matches(path: str, shm_bytes: int, lower_bytes: int) -> bool:
    """Do the sender's counter deltas show traffic on *path*?"""
    total = shm_bytes + lower_bytes
    if total <= 0:
        return False
    if path == "shm":
        return shm_bytes >= SHM_MIN_SHARE * total
    return shm_bytes <= LOWER_MAX_SHM_SHARE * total


# ---------------------------------------------------------------------------
# validation


@dataclass(frozen=True)
class Sample:
    path: str
    workload: str
    rep: int
    metrics: dict[str, float]
    cpu: dict[str, float] | None = None  # guest CPU busy %, client and server


@dataclass(frozen=True)
class Bench:
    reps: int
    quick: bool
    environment: dict[str, Any]
    workloads: list[str]
    samples: list[Sample]  # valid ones only
    invalid: int
    native: dict[str, Any] | None
    native_measured: str = ""  # when the native benchmark ran (e.g. "with the VMs up")


def _is_number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_keys(obj: object, where: str, keys: Mapping[str, type | tuple[type, ...]],
                problems: list[str]) -> bool:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object, got {type(obj).__name__}")
        return False
    ok = True
    for key, typ in keys.items():
        if key not in obj:
            problems.append(f"{where}: missing key '{key}'")
            ok = False
        elif (not isinstance(obj[key], typ)
              or (isinstance(obj[key], bool) and bool not in _as_tuple(typ))):
            problems.append(f"{where}: '{key}' must be {_type_name(typ)}, "
                            f"got {type(obj[key]).__name__}")
            ok = False
    return ok


def _as_tuple(typ: type | tuple[type, ...]) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


def _type_name(typ: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(typ))


def validate(data: object) -> Bench:
    """Check *data* (parsed JSON) and return its valid samples, or raise."""
    problems: list[str] = []
    top = {"schema": int, "reps": int, "quick": bool, "environment": dict, "workloads": list,
           "samples": list}
    if not _check_keys(data, "benchmark", top, problems):
        raise _error(problems)
    assert isinstance(data, dict)
    if data["schema"] != SCHEMA:
        problems.append(f"benchmark: schema {data['schema']} is not {SCHEMA}")
    if data.get("suite", CLASSIC_SUITE) != CLASSIC_SUITE:
        problems.append(f"benchmark: suite {data['suite']!r} is not {CLASSIC_SUITE!r} "
                        "(the report reads it with validate_smp)")
    reps: int = data["reps"]
    quick: bool = data["quick"]
    _check_reps(reps, quick, problems)
    workloads: list[str] = []
    for i, w in enumerate(data["workloads"]):
        if not isinstance(w, str) or w not in WORKLOADS:
            problems.append(f"benchmark: workloads[{i}] is not a known workload: {w!r}")
        else:
            workloads.append(w)
    if not workloads and not problems:
        problems.append("benchmark: no workloads")

    samples: list[Sample] = []
    invalid = 0
    skeys = {"path": str, "workload": str, "rep": int, "valid": bool, "metrics": dict,
             "counters": dict}
    for i, s in enumerate(data["samples"]):
        where = f"samples[{i}]"
        if not _check_keys(s, where, skeys, problems):
            continue
        assert isinstance(s, dict)
        where += f" ({s['path']}/{s['workload']} rep {s['rep']})"
        if s["path"] not in PATHS:
            problems.append(f"{where}: unknown path {s['path']!r} (paths: {', '.join(PATHS)})")
            continue
        if s["workload"] not in workloads:
            problems.append(f"{where}: workload {s['workload']!r} is not in 'workloads'")
            continue
        if s["rep"] < 0:
            problems.append(f"{where}: rep must be >= 0")
            continue
        if not s["valid"]:
            invalid += 1
            continue
        counters = s["counters"]
        bad = [k for k in ("shm_tx_bytes", "lower_tx_bytes")
               if not _is_int(counters.get(k)) or counters[k] < 0]
        if bad:
            problems.append(f"{where}: counters {', '.join(bad)} missing or not a "
                            "non-negative integer")
            continue
        if not path_matches(s["path"], counters["shm_tx_bytes"], counters["lower_tx_bytes"]):
            problems.append(
                f"{where}: marked valid but the sender's counters contradict path "
                f"'{s['path']}' (shm_tx_bytes +{counters['shm_tx_bytes']}, "
                f"lower_tx_bytes +{counters['lower_tx_bytes']})")
            continue
        metrics = _check_metrics(s["metrics"], WORKLOADS[s["workload"]][1], where, problems)
        cpu = _check_cpu(s.get("cpu"), where, problems)
        if len(metrics) == len(WORKLOADS[s["workload"]][1]):
            samples.append(Sample(s["path"], s["workload"], s["rep"], metrics, cpu))

    if not problems:
        for w in workloads:
            for p in PATHS:
                n = sum(1 for s in samples if s.path == p and s.workload == w)
                if n < reps:
                    problems.append(f"{p}/{w}: {n} valid sample(s), need {reps}")
    native = data.get("native")
    if native is not None and not isinstance(native, dict):
        problems.append(f"benchmark: 'native' must be an object or null, "
                        f"got {type(native).__name__}")
    if problems:
        raise _error(problems)
    return Bench(reps=reps, quick=quick, environment=data["environment"], workloads=workloads,
                 samples=samples, invalid=invalid,
                 native=native if isinstance(native, dict) else None,
                 native_measured=str(data.get("native_measured") or ""))


def _check_reps(reps: int, quick: bool, problems: list[str]) -> None:
    if reps < 1:
        problems.append(f"benchmark: reps must be >= 1, got {reps}")
    elif not quick and reps < MIN_REPS:
        problems.append(f"benchmark: too few repetitions: reps is {reps}, a full run needs "
                        f">= {MIN_REPS} (or 'quick': true)")


def _check_metrics(got: dict[str, Any], names: tuple[str, ...], where: str,
                   problems: list[str]) -> dict[str, float]:
    """The metrics *names* of a sample, each a finite non-negative number."""
    metrics: dict[str, float] = {}
    for name in names:
        v = got.get(name)
        if name not in got:
            problems.append(f"{where}: missing metric '{name}'")
        elif not _is_number(v):
            problems.append(f"{where}: metric '{name}' must be a number, "
                            f"got {type(v).__name__}")
        elif not math.isfinite(v):
            problems.append(f"{where}: metric '{name}' is not finite ({v})")
        elif v < 0:
            problems.append(f"{where}: metric '{name}' is negative ({v})")
        else:
            metrics[name] = float(v)
    return metrics


def _check_cpu(cpu: object, where: str, problems: list[str]) -> dict[str, float] | None:
    """A sample's optional guest CPU load: busy percentages of client and server."""
    if cpu is None:  # runs before the load was recorded
        return None
    if not isinstance(cpu, dict):
        problems.append(f"{where}: 'cpu' must be an object, got {type(cpu).__name__}")
        return None
    out: dict[str, float] = {}
    for key in CPU_KEYS:
        v = cpu.get(key)
        if not _is_number(v) or not 0 <= v <= 100:
            problems.append(f"{where}: cpu '{key}' must be a percentage (0-100), got {v!r}")
        else:
            out[key] = float(v)
    return out if len(out) == len(CPU_KEYS) else None


def _error(problems: list[str]) -> BenchReportError:
    shown = problems[:MAX_PROBLEMS]
    more = len(problems) - len(shown)
    return BenchReportError(
        f"benchmark results rejected ({len(problems)} problem(s)):\n"
        + "\n".join(shown) + (f"\n... and {more} more" if more else ""))


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchReportError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise BenchReportError(f"{path}: not readable JSON: {exc}") from exc


def load(path: Path) -> Bench:
    return validate(read_json(path))


# ---------------------------------------------------------------------------
# statistics


@dataclass(frozen=True)
class Stat:
    median: float
    lo: float  # min
    hi: float  # max
    n: int


def stat(values: list[float]) -> Stat:
    return Stat(statistics.median(values), min(values), max(values), len(values))


def summarise(b: Bench) -> dict[tuple[str, str], dict[str, Stat]]:
    """(workload, metric) -> path -> median and min-max spread."""
    out: dict[tuple[str, str], dict[str, Stat]] = {}
    for w in b.workloads:
        for m in WORKLOADS[w][1]:
            out[(w, m)] = {p: stat([s.metrics[m] for s in b.samples
                                    if s.workload == w and s.path == p]) for p in PATHS}
    return out


def ratio(metric: str, shm: float, other: float) -> float | None:
    """How many times better shm is than *other* (>1: shm wins); None if undefined."""
    num, den = (shm, other) if HIGHER_BETTER[metric] else (other, shm)
    if den <= 0:
        return None
    return num / den


# ---------------------------------------------------------------------------
# rendering


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _metric_label(m: str) -> str:
    if m in UNITS:
        return f"{m.split('_', maxsplit=1)[0]} ({UNITS[m]})"
    return m.removeprefix("lat_").removesuffix("_us") + " latency (µs)"


def headline(b: Bench) -> dict[str, float | None]:
    """The targets' numbers: shm vs lower TCP throughput and TCP_RR latency."""
    s = summarise(b)
    out: dict[str, float | None] = {}
    for suffix, key, _ in TARGET_VARIANTS:
        if (f"iperf3_tcp_1{suffix}", "throughput_mbps") in s:
            c = s[(f"iperf3_tcp_1{suffix}", "throughput_mbps")]
            out[f"tcp_throughput{key}_x"] = ratio("throughput_mbps", c["shm"].median,
                                                  c["lower"].median)
        if (f"netperf_tcp_rr{suffix}", "lat_mean_us") in s:
            c = s[(f"netperf_tcp_rr{suffix}", "lat_mean_us")]
            out[f"tcp_rr_latency{key}_x"] = ratio("lat_mean_us", c["shm"].median,
                                                  c["lower"].median)
    return out


def markdown(b: Bench) -> str:
    env = b.environment
    lines = [
        "## ivloop benchmark",
        "",
        f"Machine: {env.get('cpu_model', '?')}, {env.get('cores', '?')} cores, "
        f"host kernel {env.get('host_kernel', '?')}, {env.get('qemu_version', '?')}, "
        f"accelerator {env.get('accelerator', '?')}; guests: kernel "
        f"{env.get('guest_kernel', '?')}, {env.get('guest_vcpus', '?')} vCPU. "
        f"Run {env.get('date', '?')}.",
        "",
        f"Paths: **shm** = {env.get('pair', '?')} over the shared ring; **lower** = the same "
        f"pair with `force-lower` (virtio-net, tap, bridge); **wire** = "
        f"{env.get('cross', '?')} across hosts (veth wire). Repetitions interleaved "
        f"(shm, lower, wire, shm, ...); median of {b.reps} per cell, [min-max]; "
        f"{env.get('seconds', '?')} s per sample"
        + (f"; {b.invalid} sample(s) discarded as invalid" if b.invalid else "") + "."
        + (f" The driver's ring poller runs with a {env['ring_poll_us']} µs window (ethtool "
           "rx-usecs; the module's poll_us before) except in rows marked 'ring polling "
           "off' (0: doorbells only)." if "ring_poll_us" in env else ""),
        "Ratios: how many times better shm is (throughput shm/other, latency other/shm).",
        "",
        "| workload | metric | shm | lower | wire | shm vs lower | shm vs wire |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (w, m), cells in summarise(b).items():
        row = [WORKLOADS[w][0], _metric_label(m)]
        for p in PATHS:
            c = cells[p]
            row.append(f"{_fmt(c.median)} [{_fmt(c.lo)}-{_fmt(c.hi)}]")
        for other in ("lower", "wire"):
            r = ratio(m, cells["shm"].median, cells[other].median)
            row.append("-" if r is None or m in ("loss_percent", "jitter_ms")
                       else f"{r:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    h = headline(b)
    lines.append("")
    busy = b.environment.get("busy_poll_us", "?")
    for _, key, how_fmt in TARGET_VARIANTS:
        how = how_fmt.format(busy)
        tx, rr = h.get(f"tcp_throughput{key}_x"), h.get(f"tcp_rr_latency{key}_x")
        if tx is not None:
            lines.append(f"- Target shm ≥ 3x lower iperf3 TCP throughput, {how}: **{tx:.2f}x** "
                         f"({'met' if tx >= 3 else 'not met'}).")
        if rr is not None:
            lines.append(f"- Target shm TCP_RR latency ≤ 1/3 of lower, {how}: lower/shm = "
                         f"**{rr:.2f}x** ({'met' if rr >= 3 else 'not met'}).")
    lines += cpu_markdown(b)
    if b.native:
        lines += ["", *native_markdown(b.native)]
        if b.native_measured:
            lines += ["", f"Native benchmark measured {b.native_measured}."]
    return "\n".join(lines) + "\n"


def cpu_busy(b: Bench) -> dict[tuple[str, str], tuple[float, float]]:
    """(workload, path) -> median busy % of the client and the server guest."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for w in b.workloads:
        for p in PATHS:
            loads = [s.cpu for s in b.samples if s.workload == w and s.path == p and s.cpu]
            if loads:
                out[(w, p)] = (statistics.median(c["client_busy_pct"] for c in loads),
                               statistics.median(c["server_busy_pct"] for c in loads))
    return out


def cpu_markdown(b: Bench) -> list[str]:
    """How busy the guests' vCPUs were on each path."""
    busy = cpu_busy(b)
    lines: list[str] = []
    if busy:
        lines += ["", "### Guest CPU", "",
                  "Busy % of the client / server guest's vCPU during each sample "
                  "(/proc/stat), median.", "",
                  "| workload | shm | lower | wire |", "|---|---:|---:|---:|"]
        for w in b.workloads:
            cells = [f"{busy[(w, p)][0]:.0f} / {busy[(w, p)][1]:.0f}" if (w, p) in busy
                     else "-" for p in PATHS]
            lines.append(f"| {WORKLOADS[w][0]} | " + " | ".join(cells) + " |")
    return lines


def native_markdown(n: dict[str, Any]) -> list[str]:
    """The user-space ring benchmark (tests/ring/ring_bench.c), if it ran."""
    try:
        mc = {int(r["bytes"]): r for r in n["memcpy"]}
        ring_kib = int(n["ring_size"]) // 1024
        lines = [
            "### Native ring (user space, two processes, memfd + eventfds)",
            "",
            f"{n.get('cpu_model', '?')}, {n.get('cpus', '?')} CPUs"
            f"{', processes pinned to separate cores' if n.get('pinned') else ''}; "
            f"ring {ring_kib} KiB; medians of {n['reps']}. "
            "Each record is copied in and out (memcpy each side, like the driver). "
            "memcpy columns: one core copying records of that size, source and "
            "destination each reused (in cache), walked over as many bytes as the ring "
            "(ring's footprint) or over far more than the last-level cache (out of cache).",
            "",
            "| record | ring GB/s | records/s | memcpy GB/s in cache "
            f"| memcpy GB/s, ring's footprint ({ring_kib} KiB) | memcpy GB/s out of cache |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in n["throughput"]:
            size = int(r["record_bytes"])
            m = mc.get(size, {})
            foot = m.get("ring_footprint_gbps")
            lines.append(f"| {size} B | {float(r['gbps']):.2f} | {float(r['records_per_s']):.0f}"
                         f" | {float(m.get('in_cache_gbps', math.nan)):.1f}"
                         f" | {'n/a' if foot is None else f'{float(foot):.1f}'}"
                         f" | {float(m.get('out_of_cache_gbps', math.nan)):.1f} |")
        ref = n["reference"]
        at = (f"At {int(ref['record_bytes']) // 1024} KiB records the ring moves "
              f"{float(ref['ring_gbps']):.2f} GB/s = ")
        if "ratio_ring_footprint" in ref and "memcpy_ring_footprint_gbps" in ref:
            # the reference: memcpy streaming through as many bytes as the ring
            pct = 100 * float(ref["ratio_ring_footprint"])
            sentence = (
                f"{at}**{pct:.0f}%** of single-core memcpy streaming through the ring's "
                f"footprint ({ring_kib} KiB: "
                f"{float(ref['memcpy_ring_footprint_gbps']):.1f} GB/s); target ≥ 50% "
                f"({'met' if pct >= 50 else 'not met'}). For scale, memcpy of one "
                f"record in cache: {float(ref['memcpy_in_cache_gbps']):.1f} GB/s; "
                f"out of cache: {float(ref['memcpy_out_of_cache_gbps']):.1f} GB/s.")
        else:  # JSON from before the ring-footprint reference
            sentence = (
                f"{at}{100 * float(ref['ratio_out_of_cache']):.0f}% of single-core memcpy "
                f"out of cache ({float(ref['memcpy_out_of_cache_gbps']):.1f} GB/s) and "
                f"{100 * float(ref['ratio_in_cache']):.0f}% of memcpy in cache "
                f"({float(ref['memcpy_in_cache_gbps']):.1f} GB/s); target ≥ 50%.")
        lines += [
            "",
            sentence,
            "",
            f"| round trip, {int(n['latency_us']['message_bytes'])} B | p50 µs | p90 µs "
            "| p99 µs | mean µs |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, label in (("ring", "ivloop ring + eventfd doorbells"),
                           ("eventfd", "plain eventfd ping-pong"),
                           ("tcp_loopback", "TCP over 127.0.0.1, TCP_NODELAY")):
            lat = n["latency_us"][key]
            lines.append(f"| {label} | {float(lat['p50']):.1f} | {float(lat['p90']):.1f} | "
                         f"{float(lat['p99']):.1f} | {float(lat['mean']):.1f} |")
    except (KeyError, TypeError, ValueError) as exc:
        return [f"(native ring results malformed: {exc!r})"]
    return lines


def charts(b: Bench, out_dir: Path) -> list[Path]:
    """throughput.png (bars with min-max) and latency.png (percentiles per path)."""
    # Imported here: matplotlib costs a second of start-up that only plots need.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    s = summarise(b)
    colours = {"shm": "tab:green", "lower": "tab:orange", "wire": "tab:blue"}
    written: list[Path] = []
    env = b.environment
    subtitle = (f"{env.get('accelerator', '?')} guests, {env.get('cpu_model', '?')}, "
                f"median of {b.reps}")

    tput = [k for k in s if k[1] == "throughput_mbps"]
    if tput:
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(tput)), 4.5))
        width = 0.27
        for i, p in enumerate(PATHS):
            xs = [j + (i - 1) * width for j in range(len(tput))]
            med = [s[k][p].median for k in tput]
            err = [[s[k][p].median - s[k][p].lo for k in tput],
                   [s[k][p].hi - s[k][p].median for k in tput]]
            ax.bar(xs, med, width, yerr=err, capsize=3, color=colours[p], label=p)
        ax.set_xticks(range(len(tput)), [WORKLOADS[w][0] for w, _ in tput], fontsize=8)
        ax.set_ylabel("Mbit/s")
        ax.set_title(f"Throughput by path\n{subtitle}, bars = min-max", fontsize=9)
        ax.legend()
        fig.tight_layout()
        path = out_dir / "throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    lat_w = [w for w in b.workloads if "lat_p50_us" in WORKLOADS[w][1]]
    if lat_w:
        fig, axes = plt.subplots(1, len(lat_w), figsize=(3.2 * len(lat_w), 4), squeeze=False)
        pct = ("lat_p50_us", "lat_p90_us", "lat_p99_us")
        for ax, w in zip(axes[0], lat_w, strict=True):
            for p in PATHS:
                ax.plot(["p50", "p90", "p99"], [s[(w, m)][p].median for m in pct],
                        marker="o", color=colours[p], label=p)
            ax.set_title(WORKLOADS[w][0], fontsize=8)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("latency (µs, log)")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Latency percentiles by path ({subtitle})", fontsize=9)
        fig.tight_layout()
        path = out_dir / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------
# the SMP suite: 2-vCPU guests (``harness bench --suite smp``)
#
# Its JSON has its own cells, one sample per cell and repetition::
#
#     {"schema": 1, "suite": "smp", "reps": 5, "quick": false, "seconds": 3,
#      "environment": {...}, "duration_s": 260.5,
#      "roles": {"pair": ["vm1", "vm2"], "cross": ["vm1", "vm3"], "plain": ["vm4", "vm5"]},
#      "samples": [{"path": "mix", "workload": "iperf3_mix", "rep": 0, "valid": true,
#                   "error": null, "metrics": {"shm_mbps": 900.0, "wire_mbps": 700.0},
#                   "counters": {"shm_tx_bytes": N, "lower_tx_bytes": N},
#                   "flow_bytes": {"shm": N, "wire": N}, "cpu": {...}}, ...]}
#
# Paths: shm and lower are the co-resident pair (lower: force-lower on both);
# wire is the cross pair through ivl0 (the driver loaded, nothing to
# accelerate); nodriver is a second pair placed like the cross pair but booted
# without the driver (eth0, counted from eth0's own statistics); mix is the
# pair's client streaming to its co-resident peer and across hosts at once.

SMP_SUITE = "smp"
SUITES = (CLASSIC_SUITE, SMP_SUITE)
SMP_SCHEMA = 1
SMP_WORKLOADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "iperf3_tcp_1": WORKLOADS["iperf3_tcp_1"],
    "iperf3_tcp_4": WORKLOADS["iperf3_tcp_4"],
    "netperf_tcp_rr": WORKLOADS["netperf_tcp_rr"],
    "iperf3_mix": ("iperf3 TCP, one stream to each of two peers at once",
                   ("shm_mbps", "wire_mbps")),
}
SMP_PATHS = ("shm", "lower", "wire", "nodriver", "mix")
# Measured in this order in every repetition, so that each comparison's two
# sides run next to each other.
SMP_CELLS: tuple[tuple[str, str], ...] = (
    ("shm", "iperf3_tcp_1"), ("lower", "iperf3_tcp_1"),
    ("shm", "iperf3_tcp_4"), ("lower", "iperf3_tcp_4"),
    ("wire", "iperf3_tcp_1"), ("nodriver", "iperf3_tcp_1"),
    ("wire", "netperf_tcp_rr"), ("nodriver", "netperf_tcp_rr"),
    ("mix", "iperf3_mix"),
)
SMP_ROLES = ("pair", "cross", "plain")
SCALING_TARGET = 1.5  # shm: 4 streams at least this many times one stream
COST_TOLERANCE = 0.05  # ivl0 within this share of no driver, across hosts


def smp_counters_problem(path: str, counters: Mapping[str, Any],
                         flow_bytes: object = None) -> str | None:
    """Why a sample's counter deltas do not show its traffic on *path* (None: they do).

    *flow_bytes* (mix only): bytes each flow delivered, by iperf3's receivers.
    """
    if path == "nodriver":
        v = counters.get("eth0_tx_bytes")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return "counter eth0_tx_bytes missing or not a non-negative integer"
        return None if v > 0 else "eth0_tx_bytes +0: no traffic left the client"
    bad = [k for k in ("shm_tx_bytes", "lower_tx_bytes")
           if not _is_int(counters.get(k)) or counters[k] < 0]
    if bad:
        return f"counters {', '.join(bad)} missing or not a non-negative integer"
    shm, lower = int(counters["shm_tx_bytes"]), int(counters["lower_tx_bytes"])
    if path != "mix":
        if path_matches(path, shm, lower):
            return None
        return (f"the sender's counters contradict path '{path}' (shm_tx_bytes +{shm}, "
                f"lower_tx_bytes +{lower})")
    if not isinstance(flow_bytes, dict) or not all(
            _is_int(flow_bytes.get(f)) and flow_bytes[f] > 0 for f in ("shm", "wire")):
        return f"'flow_bytes' must give positive byte counts for shm and wire, got {flow_bytes!r}"
    # Each flow's frames (payload plus headers) must have left through its own
    # path: a co-resident flow bypassed to the lower NIC would not be a mixture.
    if shm < SHM_MIN_SHARE * flow_bytes["shm"] or lower < SHM_MIN_SHARE * flow_bytes["wire"]:
        return (f"the sender's counters do not carry both flows (shm_tx_bytes +{shm} for "
                f"{flow_bytes['shm']} bytes to the co-resident peer, lower_tx_bytes "
                f"+{lower} for {flow_bytes['wire']} bytes across hosts)")
    return None


@dataclass(frozen=True)
class SmpBench:
    reps: int
    quick: bool
    environment: dict[str, Any]
    roles: dict[str, tuple[str, str]]
    samples: list[Sample]  # valid ones only
    invalid: int
    duration_s: float | None = None  # the measurements' wall time


def validate_smp(data: object) -> SmpBench:
    """Check an smp-suite document (parsed JSON); its valid samples, or raise."""
    problems: list[str] = []
    top = {"schema": int, "suite": str, "reps": int, "quick": bool, "environment": dict,
           "roles": dict, "samples": list}
    if not _check_keys(data, "benchmark", top, problems):
        raise _error(problems)
    assert isinstance(data, dict)
    if data["suite"] != SMP_SUITE:
        problems.append(f"benchmark: suite {data['suite']!r} is not {SMP_SUITE!r}")
    if data["schema"] != SMP_SCHEMA:
        problems.append(f"benchmark: schema {data['schema']} is not {SMP_SCHEMA}")
    reps: int = data["reps"]
    quick: bool = data["quick"]
    _check_reps(reps, quick, problems)
    roles: dict[str, tuple[str, str]] = {}
    for role in SMP_ROLES:
        v = data["roles"].get(role)
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(n, str) and n for n in v)):
            problems.append(f"benchmark: roles '{role}' must be a list of two VM names, "
                            f"got {v!r}")
        else:
            roles[role] = (v[0], v[1])
    duration = data.get("duration_s")
    if duration is not None and (not _is_number(duration) or not math.isfinite(duration)
                                 or duration < 0):
        problems.append(f"benchmark: 'duration_s' must be a non-negative number, "
                        f"got {duration!r}")

    samples: list[Sample] = []
    seen: set[tuple[str, str, int]] = set()
    invalid = 0
    skeys = {"path": str, "workload": str, "rep": int, "valid": bool, "metrics": dict,
             "counters": dict}
    for i, s in enumerate(data["samples"]):
        where = f"samples[{i}]"
        if not _check_keys(s, where, skeys, problems):
            continue
        assert isinstance(s, dict)
        where += f" ({s['path']}/{s['workload']} rep {s['rep']})"
        if (s["path"], s["workload"]) not in SMP_CELLS:
            problems.append(f"{where}: not a cell of the smp suite (cells: "
                            + ", ".join(f"{p}/{w}" for p, w in SMP_CELLS) + ")")
            continue
        if not 0 <= s["rep"] < reps:
            problems.append(f"{where}: rep must be in 0..{reps - 1}")
            continue
        if not s["valid"]:
            invalid += 1
            continue
        problem = smp_counters_problem(s["path"], s["counters"], s.get("flow_bytes"))
        if problem:
            problems.append(f"{where}: marked valid but {problem}")
            continue
        key = (s["path"], s["workload"], s["rep"])
        if key in seen:
            problems.append(f"{where}: a second valid sample for this cell and rep")
            continue
        names = SMP_WORKLOADS[s["workload"]][1]
        metrics = _check_metrics(s["metrics"], names, where, problems)
        cpu = _check_cpu(s.get("cpu"), where, problems)
        if len(metrics) == len(names):
            seen.add(key)
            samples.append(Sample(s["path"], s["workload"], s["rep"], metrics, cpu))
    if not problems:
        for p, w in SMP_CELLS:
            n = sum(1 for s in samples if s.path == p and s.workload == w)
            if n < reps:
                problems.append(f"{p}/{w}: {n} valid sample(s), need {reps}")
    if problems:
        raise _error(problems)
    return SmpBench(reps=reps, quick=quick, environment=data["environment"], roles=roles,
                    samples=samples, invalid=invalid,
                    duration_s=float(duration) if _is_number(duration) else None)


def smp_values(b: SmpBench, path: str, workload: str, metric: str) -> dict[int, float]:
    """rep -> the cell's value of *metric* (``sum_mbps``: both mix flows added)."""
    if metric == "sum_mbps":
        return {s.rep: s.metrics["shm_mbps"] + s.metrics["wire_mbps"] for s in b.samples
                if s.path == path and s.workload == workload}
    return {s.rep: s.metrics[metric] for s in b.samples
            if s.path == path and s.workload == workload}


def smp_stat(b: SmpBench, path: str, workload: str, metric: str) -> Stat:
    return stat(list(smp_values(b, path, workload, metric).values()))


Cell = tuple[str, str, str]  # path, workload, metric


def _div(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def paired(b: SmpBench, num: Cell, den: Cell) -> Stat | None:
    """num / den repetition by repetition (the two were measured next to each other)."""
    a, d = smp_values(b, *num), smp_values(b, *den)
    ratios = [r for rep in sorted(a.keys() & d.keys())
              if (r := _div(a[rep], d[rep])) is not None]
    return stat(ratios) if ratios else None


@dataclass(frozen=True)
class Comparison:
    """One ratio of the smp report: num's median over den's, against a goal or none."""

    key: str  # headline key, e.g. "scaling_shm"
    num: Cell
    den: Cell
    goal: str = ""  # "≥ 1.5x"; empty: informative, no target
    at_least: float | None = None  # met when the ratio is >= this
    at_most: float | None = None  # met when the ratio is <= this

    def value(self, b: SmpBench) -> float | None:
        return _div(smp_stat(b, *self.num).median, smp_stat(b, *self.den).median)

    def met(self, b: SmpBench) -> bool | None:
        """None when there is no target or the ratio is undefined."""
        v = self.value(b)
        if v is None or (self.at_least is None and self.at_most is None):
            return None
        return ((self.at_least is None or v >= self.at_least)
                and (self.at_most is None or v <= self.at_most))


TPUT = "throughput_mbps"
SMP_COMPARISONS = (
    Comparison("scaling_shm", ("shm", "iperf3_tcp_4", TPUT), ("shm", "iperf3_tcp_1", TPUT),
               f"≥ {SCALING_TARGET}x", at_least=SCALING_TARGET),
    Comparison("scaling_lower", ("lower", "iperf3_tcp_4", TPUT),
               ("lower", "iperf3_tcp_1", TPUT)),
    Comparison("cost_throughput", ("wire", "iperf3_tcp_1", TPUT),
               ("nodriver", "iperf3_tcp_1", TPUT), f"≥ {1 - COST_TOLERANCE:.2f}x",
               at_least=1 - COST_TOLERANCE),
    Comparison("cost_tcp_rr_latency", ("wire", "netperf_tcp_rr", "lat_mean_us"),
               ("nodriver", "netperf_tcp_rr", "lat_mean_us"), f"≤ {1 + COST_TOLERANCE:.2f}x",
               at_most=1 + COST_TOLERANCE),
    Comparison("cost_tcp_rr_p99", ("wire", "netperf_tcp_rr", "lat_p99_us"),
               ("nodriver", "netperf_tcp_rr", "lat_p99_us")),
    Comparison("cost_tcp_rr_rate", ("wire", "netperf_tcp_rr", "transactions_per_s"),
               ("nodriver", "netperf_tcp_rr", "transactions_per_s")),
    Comparison("mix_shm", ("mix", "iperf3_mix", "shm_mbps"), ("shm", "iperf3_tcp_1", TPUT)),
    Comparison("mix_wire", ("mix", "iperf3_mix", "wire_mbps"), ("wire", "iperf3_tcp_1", TPUT)),
)
_COMPARE = {c.key: c for c in SMP_COMPARISONS}


def smp_headline(b: SmpBench) -> dict[str, float | bool | None]:
    """Every ratio (``<key>_x``) and, where there is a target, whether it is met."""
    out: dict[str, float | bool | None] = {}
    for c in SMP_COMPARISONS:
        out[f"{c.key}_x"] = c.value(b)
        if c.goal:
            out[f"{c.key}_met"] = c.met(b)
    return out


def _cell(s: Stat) -> str:
    return f"{_fmt(s.median)} [{_fmt(s.lo)}-{_fmt(s.hi)}]"


def _ratio_text(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def _spread(s: Stat | None, digits: int = 2) -> str:
    return "-" if s is None else f"{s.lo:.{digits}f}-{s.hi:.{digits}f}"


def _verdict(c: Comparison, b: SmpBench, digits: int = 2) -> str:
    v, met = c.value(b), c.met(b)
    if v is None:
        return "**-** (not measurable: a zero median)"
    return (f"**{v:.{digits}f}x** (target {c.goal}: {'met' if met else 'not met'}; "
            f"{_spread(paired(b, c.num, c.den), digits)} repetition by repetition)")


def smp_markdown(b: SmpBench) -> str:
    env = b.environment
    pair, cross, plain = (b.roles[r] for r in SMP_ROLES)
    hosts = env.get("hosts", {})

    def at(vm: str) -> str:
        return f"{vm} (host {hosts[vm]})" if vm in hosts else vm

    lines = [
        "## ivloop benchmark: 2-vCPU guests",
        "",
        f"Machine: {env.get('cpu_model', '?')}, {env.get('cores', '?')} cores, "
        f"host kernel {env.get('host_kernel', '?')}, {env.get('qemu_version', '?')}, "
        f"accelerator {env.get('accelerator', '?')}; guests: kernel "
        f"{env.get('guest_kernel', '?')}, {env.get('guest_vcpus', '?')} vCPUs, "
        f"{env.get('guest_memory_mib', '?')} MiB each. Run {env.get('date', '?')}"
        + (f", commit {env['commit']}" if env.get("commit") else "") + ".",
        "",
        f"Paths: **shm** = {at(pair[0])} -> {at(pair[1])} over the shared ring; **lower** = "
        "the same pair with `force-lower` on both (virtio-net, tap, bridge); **wire** = "
        f"{at(cross[0])} -> {at(cross[1])} through ivl0 (the driver loaded on both, nothing "
        f"to accelerate); **no driver** = {at(plain[0])} -> {at(plain[1])}, placed and sized "
        "like the wire pair but booted with the driver off (`driver = false`: IP on eth0); "
        f"**mix** = {pair[0]} streaming to {pair[1]} (shm) and to {cross[1]} (wire) at once. "
        f"Every cell is measured once per repetition, in the same order, {b.reps} "
        f"repetition(s); median [min-max]; {env.get('seconds', '?')} s per sample"
        + (f"; {b.invalid} sample(s) discarded as invalid" if b.invalid else "")
        + (f"; {b.duration_s:.0f} s of measurement" if b.duration_s is not None else "")
        + "." + (f" Guest ivloop.ko sha256 {env['driver_sha256']}."
                 if env.get("driver_sha256") else "")
        + (f" Ring poller: a {env['ring_poll_us']} µs window (ethtool rx-usecs)."
           if "ring_poll_us" in env else ""),
        "Ratios are of the medians; *per repetition* gives the min-max of the same ratio "
        "taken within each repetition, whose two cells ran next to each other.",
        "",
        "### Parallel streams (iperf3 TCP)",
        "",
        "| path | 1 stream (Mbit/s) | 4 streams (Mbit/s) | 4 streams / 1 stream "
        "| per repetition |",
        "|---|---:|---:|---:|---:|",
    ]
    for path in ("shm", "lower"):
        c = _COMPARE[f"scaling_{path}"]
        lines.append(f"| {path} | {_cell(smp_stat(b, *c.den))} | {_cell(smp_stat(b, *c.num))} "
                     f"| {_ratio_text(c.value(b))} | {_spread(paired(b, c.num, c.den))} |")
    lines += [
        "",
        f"- Target shm 4 streams ≥ {SCALING_TARGET}x one stream: "
        f"{_verdict(_COMPARE['scaling_shm'], b)}.",
        "",
        "### Traffic ivloop does not accelerate (across hosts)",
        "",
        "| workload | wire, through ivl0 | no driver, eth0 | ivl0 / no driver "
        "| per repetition |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in (("cost_throughput", "iperf3 TCP, 1 stream: throughput (Mbit/s)"),
                       ("cost_tcp_rr_latency", "netperf TCP_RR: mean round trip (µs)"),
                       ("cost_tcp_rr_p99", "netperf TCP_RR: p99 round trip (µs)"),
                       ("cost_tcp_rr_rate", "netperf TCP_RR: transactions (trans/s)")):
        c = _COMPARE[key]
        lines.append(f"| {label} | {_cell(smp_stat(b, *c.num))} | "
                     f"{_cell(smp_stat(b, *c.den))} | {_ratio_text(c.value(b), 3)} | "
                     f"{_spread(paired(b, c.num, c.den), 3)} |")
    lines += [
        "",
        f"- Target within {100 * COST_TOLERANCE:.0f}% of no driver, iperf3 throughput: "
        f"ivl0 / no driver = {_verdict(_COMPARE['cost_throughput'], b, 3)}.",
        f"- Target within {100 * COST_TOLERANCE:.0f}% of no driver, TCP_RR mean round "
        f"trip: ivl0 / no driver = {_verdict(_COMPARE['cost_tcp_rr_latency'], b, 3)}.",
        "",
        f"### Mixture: {pair[0]} -> {pair[1]} (shm) and {pair[0]} -> {cross[1]} (wire) at once",
        "",
        "| flow | alone (Mbit/s) | together (Mbit/s) | together / alone | per repetition |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in (("mix_shm", f"{pair[0]} -> {pair[1]}, shm"),
                       ("mix_wire", f"{pair[0]} -> {cross[1]}, wire through ivl0")):
        c = _COMPARE[key]
        lines.append(f"| {label} | {_cell(smp_stat(b, *c.den))} | "
                     f"{_cell(smp_stat(b, *c.num))} | {_ratio_text(c.value(b))} | "
                     f"{_spread(paired(b, c.num, c.den))} |")
    lines += [
        f"| both flows, sum | - | {_cell(smp_stat(b, 'mix', 'iperf3_mix', 'sum_mbps'))} "
        "| - | - |",
        "",
        "Alone: the same run's 1-stream shm and wire cells. No target is set for the "
        "mixture; it shows what each flow keeps when both share the sender.",
    ]
    lines += smp_cpu_markdown(b)
    return "\n".join(lines) + "\n"


def smp_cpu_busy(b: SmpBench) -> dict[tuple[str, str], tuple[float, float]]:
    """(path, workload) -> median busy % of the client and the server guest."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for p, w in SMP_CELLS:
        loads = [s.cpu for s in b.samples if s.workload == w and s.path == p and s.cpu]
        if loads:
            out[(p, w)] = (statistics.median(c["client_busy_pct"] for c in loads),
                           statistics.median(c["server_busy_pct"] for c in loads))
    return out


def smp_cpu_markdown(b: SmpBench) -> list[str]:
    busy = smp_cpu_busy(b)
    if not busy:
        return []
    lines = ["", "### Guest CPU", "",
             "Busy % of the client / server guest (all its vCPUs, /proc/stat) during each "
             "sample, median; for mix the server is the co-resident receiver.", "",
             "| path | workload | client / server busy % |", "|---|---|---:|"]
    for p, w in SMP_CELLS:
        if (p, w) in busy:
            client, server = busy[(p, w)]
            lines.append(f"| {p} | {SMP_WORKLOADS[w][0]} | {client:.0f} / {server:.0f} |")
    return lines


def write(json_path: Path, out_dir: Path | None = None) -> list[Path]:
    """Validate *json_path*, then write bench.md (and the charts) next to it.

    The JSON's ``suite`` says which report: none (or "paths") the classic
    shm / lower / wire table with its charts, "smp" the 2-vCPU rows.
    """
    data = read_json(json_path)
    suite = data.get("suite", CLASSIC_SUITE) if isinstance(data, dict) else CLASSIC_SUITE
    if suite not in SUITES:
        raise BenchReportError(f"{json_path}: unknown suite {suite!r} "
                               f"(suites: {', '.join(SUITES)})")
    out_dir = out_dir or json_path.parent
    if suite == SMP_SUITE:
        sb = validate_smp(data)
        out_dir.mkdir(parents=True, exist_ok=True)
        md = out_dir / "bench.md"
        md.write_text(smp_markdown(sb))
        return [md]
    b = validate(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "bench.md"
    md.write_text(markdown(b))
    return [md, *charts(b, out_dir)]
