"""The benchmark's report: validate the raw samples, then summarise them.

Pure functions over the JSON that :mod:`harness.experiments.bench` writes; the
classic suite's::

    {"schema": 1, "reps": 5, "quick": false, "seconds": 3,
     "environment": {...}, "paths": {"shm": {...}, "lower": {...}, "wire": {...}},
     "workloads": ["iperf3_tcp_1", ...],
     "samples": [{"path": "shm", "workload": "iperf3_tcp_1", "rep": 0,
                  "valid": true, "error": null,
                  "counters": {"shm_tx_bytes": N, "lower_tx_bytes": N},
                  "metrics": {"throughput_mbps": 812.5}}, ...],
     "native": {...} | null}

and the smp suite's (2-vCPU guests), one sample per cell and repetition::

    {"schema": 1, "suite": "smp", "reps": 5, "quick": false, "seconds": 3,
     "environment": {...}, "duration_s": 260.5,
     "roles": {"pair": ["vm1", "vm2"], "cross": ["vm1", "vm3"], "plain": ["vm4", "vm5"]},
     "samples": [{"path": "mix", "workload": "iperf3_mix", "rep": 0, "valid": true,
                  "error": null, "metrics": {"shm_mbps": 900.0, "wire_mbps": 700.0},
                  "counters": {"shm_tx_bytes": N, "lower_tx_bytes": N},
                  "flow_bytes": {"shm": N, "wire": N}, "cpu": {...}}, ...]}

and the pairs suite's (1, 2 and 4 co-resident pairs at once), whose sample is
a whole step: its metrics the sums of its pairs', each pair's own in ``flows``::

    {"schema": 1, "suite": "pairs", ..., "environment": {"lower_path":
     "virtio-net, user-space (TCG)", ...},
     "roles": {"pair": ["vm1", "vm2"], "pair2": ["vm3", "vm4"], ...},
     "samples": [{"path": "lower", "workload": "iperf3_tcp_1_x2", "rep": 0,
                  "valid": true, "error": null, "metrics": {"throughput_mbps": 1500.0},
                  "counters": {...the pairs' sums...}, "cpu": {...},
                  "flows": [{"client": "vm1", "server": "vm2",
                             "metrics": {"throughput_mbps": 800.0},
                             "counters": {"shm_tx_bytes": 0, "lower_tx_bytes": N},
                             "cpu": {...}}, {"client": "vm3", ...}]}, ...]}

Every suite's environment says which lower path was measured
(``lower_path``: virtio-net with vhost-net on KVM, user-space under TCG);
the pairs suite requires it, the others show "not recorded" for older runs.

Nothing is printed from data that fails validation: :func:`check` (for the
suite of :mod:`harness.experiments.bench_suites` the JSON names;
:func:`validate`, :func:`validate_smp` and :func:`validate_pairs` for one
suite) raises :class:`BenchReportError` naming every sample and field that is
wrong.  Each suite has its report (:func:`markdown` with :func:`charts`,
:func:`smp_markdown`, :func:`pairs_markdown`); :func:`write` picks by the suite.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from harness.errors import HarnessError
from harness.experiments import bench_suites
from harness.experiments.bench_suites import (
    BUSY_POLL_SUFFIX,
    BY_NAME,
    CLASSIC,
    COST_TOLERANCE,
    NO_RING_POLL_SUFFIX,
    PAIR_ROLES,
    PAIRS,
    PAIRS_RUNS,
    PAIRS_STEPS,
    SCALING_TARGET,
    SMP,
    Cell,
    Comparison,
    Measure,
    Suite,
)

# The suites' names, where harness.cli reads its --suite choices.
CLASSIC_SUITE, SMP_SUITE = bench_suites.CLASSIC_SUITE, bench_suites.SMP_SUITE
PAIRS_SUITE = bench_suites.PAIRS_SUITE
SUITES = bench_suites.SUITES

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


def counters_problem(path: str, counters: Mapping[str, Any],
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


# ---------------------------------------------------------------------------
# validation


@dataclass(frozen=True)
class Sample:
    """A valid sample: what one cell gave in one repetition."""

    path: str
    workload: str
    rep: int
    metrics: dict[str, float]
    cpu: dict[str, float] | None = None  # guest CPU busy %, client and server


@dataclass(frozen=True)
class Bench:
    """A validated run of one suite: its valid samples and what its report shows.

    What only one suite's JSON records (roles; native results) is empty for the other.
    """

    suite: Suite
    reps: int
    quick: bool
    environment: dict[str, Any]
    workloads: list[str]
    cells: tuple[Cell, ...]  # the suite's cells for these workloads
    samples: list[Sample]  # valid ones only
    invalid: int
    roles: dict[str, tuple[str, str]] = field(default_factory=dict)  # the smp suite's
    native: dict[str, Any] | None = None  # the classic suite's native ring results
    native_measured: str = ""  # when the native benchmark ran (e.g. "with the VMs up")
    duration_s: float | None = None  # the measurements' wall time (the smp suite's)


# The top-level keys the validator reads, where the suite's document has them.
TOP_KEYS: dict[str, type] = {"schema": int, "suite": str, "reps": int, "quick": bool,
                             "environment": dict, "workloads": list, "roles": dict,
                             "samples": list}
SAMPLE_KEYS: dict[str, type] = {"path": str, "workload": str, "rep": int, "valid": bool,
                                "metrics": dict, "counters": dict}


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
    """Check a classic-suite document (parsed JSON); its valid samples, or raise."""
    return check(data, CLASSIC)


def validate_smp(data: object) -> Bench:
    """Check an smp-suite document (parsed JSON); its valid samples, or raise."""
    return check(data, SMP)


def validate_pairs(data: object) -> Bench:
    """Check a pairs-suite document (parsed JSON); its valid samples, or raise."""
    return check(data, PAIRS)


def check(data: object, suite: Suite) -> Bench:
    """Check *data* (parsed JSON) as a run of *suite*; return its valid samples, or raise."""
    problems: list[str] = []
    top = {key: TOP_KEYS[key] for key in suite.document if key in TOP_KEYS}
    if not _check_keys(data, "benchmark", top, problems):
        raise _error(problems)
    assert isinstance(data, dict)
    named = data.get("suite", CLASSIC_SUITE)
    if named != suite.name:
        problems.append(f"benchmark: suite {named!r} is not {suite.name!r}" + (
            "" if suite.tagged else " (the report reads it with validate_smp)"))
    if data["schema"] != suite.schema:
        problems.append(f"benchmark: schema {data['schema']} is not {suite.schema}")
    reps: int = data["reps"]
    quick: bool = data["quick"]
    _check_reps(reps, quick, problems)
    workloads = (_check_workloads(data["workloads"], suite, problems)
                 if "workloads" in suite.document else list(suite.workloads))
    roles = _check_roles(data["roles"], suite, problems) if "roles" in suite.document else {}
    for key in suite.required_environment:
        v = data["environment"].get(key)
        if not isinstance(v, str) or not v:
            problems.append(f"benchmark: environment '{key}' must be a non-empty string, "
                            f"got {v!r}")
    duration = data.get("duration_s") if "duration_s" in suite.document else None
    if duration is not None and (not _is_number(duration) or not math.isfinite(duration)
                                 or duration < 0):
        problems.append(f"benchmark: 'duration_s' must be a non-negative number, "
                        f"got {duration!r}")
    cells = suite.cells_of(workloads)
    samples, invalid = _check_samples(data["samples"], suite, cells, reps, problems,
                                      roles=roles)
    if not problems:
        for p, w in cells:
            n = sum(1 for s in samples if s.path == p and s.workload == w)
            if n < reps:
                problems.append(f"{p}/{w}: {n} valid sample(s), need {reps}")
    native = data.get("native") if "native" in suite.document else None
    if native is not None and not isinstance(native, dict):
        problems.append(f"benchmark: 'native' must be an object or null, "
                        f"got {type(native).__name__}")
    if problems:
        raise _error(problems)
    return Bench(suite=suite, reps=reps, quick=quick, environment=data["environment"],
                 workloads=workloads, cells=cells, samples=samples, invalid=invalid,
                 roles=roles, native=native if isinstance(native, dict) else None,
                 native_measured=(str(data.get("native_measured") or "")
                                  if "native" in suite.document else ""),
                 duration_s=float(duration) if _is_number(duration) else None)


def _check_reps(reps: int, quick: bool, problems: list[str]) -> None:
    if reps < 1:
        problems.append(f"benchmark: reps must be >= 1, got {reps}")
    elif not quick and reps < MIN_REPS:
        problems.append(f"benchmark: too few repetitions: reps is {reps}, a full run needs "
                        f">= {MIN_REPS} (or 'quick': true)")


def _check_workloads(listed: list[Any], suite: Suite, problems: list[str]) -> list[str]:
    """The run's workloads as the JSON lists them (a suite whose cells follow them)."""
    workloads: list[str] = []
    for i, w in enumerate(listed):
        if not isinstance(w, str) or w not in suite.workloads:
            problems.append(f"benchmark: workloads[{i}] is not a known workload: {w!r}")
        else:
            workloads.append(w)
    if not workloads and not problems:
        problems.append("benchmark: no workloads")
    return workloads


def _check_roles(given: dict[str, Any], suite: Suite,
                 problems: list[str]) -> dict[str, tuple[str, str]]:
    """The pairs of VMs the run used, as the JSON records them."""
    roles: dict[str, tuple[str, str]] = {}
    for role in suite.roles:
        v = given.get(role)
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(n, str) and n for n in v)):
            problems.append(f"benchmark: roles '{role}' must be a list of two VM names, "
                            f"got {v!r}")
        else:
            roles[role] = (v[0], v[1])
    return roles


def _check_samples(raw: list[Any], suite: Suite, cells: tuple[Cell, ...], reps: int,
                   problems: list[str], *,
                   roles: Mapping[str, tuple[str, str]]) -> tuple[list[Sample], int]:
    """The valid samples, and how many the runner marked invalid."""
    samples: list[Sample] = []
    seen: set[tuple[str, str, int]] = set()
    invalid = 0
    for i, s in enumerate(raw):
        where = f"samples[{i}]"
        if not _check_keys(s, where, SAMPLE_KEYS, problems):
            continue
        assert isinstance(s, dict)
        where += f" ({s['path']}/{s['workload']} rep {s['rep']})"
        problem = (_cell_problem(s["path"], s["workload"], suite, cells)
                   or _rep_problem(s["rep"], reps, suite))
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        if not s["valid"]:
            invalid += 1
            continue
        problem = counters_problem(s["path"], s["counters"], s.get("flow_bytes"))
        if problem is None and s["workload"] in suite.at_once:
            problem = _flows_problem(s, suite, roles)
        if problem:
            problems.append(f"{where}: marked valid but {problem}")
            continue
        key = (s["path"], s["workload"], s["rep"])
        if suite.paired_reps and key in seen:
            problems.append(f"{where}: a second valid sample for this cell and rep")
            continue
        names = suite.workloads[s["workload"]][1]
        metrics = _check_metrics(s["metrics"], names, where, problems)
        cpu = _check_cpu(s.get("cpu"), where, problems)
        if len(metrics) == len(names):
            seen.add(key)
            samples.append(Sample(s["path"], s["workload"], s["rep"], metrics, cpu))
    return samples, invalid


def _flows_problem(s: dict[str, Any], suite: Suite,
                   roles: Mapping[str, tuple[str, str]]) -> str | None:
    """Why a sample of several pairs at once does not add up (None: it does).

    Its ``flows`` must be the suite's first N pairs, in order, each with
    counters that show the sample's path on its own and the workload's
    metrics; the sample's metrics must be their sums.
    """
    n = suite.at_once[s["workload"]][1]
    flows = s.get("flows")
    if not isinstance(flows, list) or len(flows) != n:
        return f"'flows' must list the {n} pair(s) measured at once, got {flows!r:.200}"
    names = suite.workloads[s["workload"]][1]
    for i, (f, role) in enumerate(zip(flows, PAIR_ROLES, strict=False)):
        if not isinstance(f, dict):
            return f"flows[{i}] must be an object, got {type(f).__name__}"
        got = (f.get("client"), f.get("server"))
        if role in roles and got != roles[role]:
            return (f"flows[{i}] is {got[0]} -> {got[1]}, not the pair {role} "
                    f"({roles[role][0]} -> {roles[role][1]})")
        counters = f.get("counters")
        problem = (counters_problem(s["path"], counters) if isinstance(counters, dict)
                   else "no 'counters' object")
        if problem:
            return f"flows[{i}] ({got[0]}): {problem}"
        metrics = f.get("metrics")
        bad = [m for m in names if not isinstance(metrics, dict)
               or not _is_number(metrics.get(m)) or not math.isfinite(metrics[m])
               or metrics[m] < 0]
        if bad:
            return f"flows[{i}] ({got[0]}): metric(s) {', '.join(bad)} missing or not a number"
    for m in names:
        total = sum(f["metrics"][m] for f in flows)
        v = s["metrics"].get(m)
        if not _is_number(v) or not math.isclose(v, total, rel_tol=1e-6, abs_tol=1e-6):
            return f"metric '{m}' is {v!r}, not the sum of its pairs' ({total:g})"
    return None


def _cell_problem(path: str, workload: str, suite: Suite, cells: tuple[Cell, ...]) -> str | None:
    """Why (path, workload) is not one of the run's cells (None: it is)."""
    if (path, workload) in cells:
        return None
    if suite.cells is not None:
        return (f"not a cell of the {suite.name} suite (cells: "
                + ", ".join(f"{p}/{w}" for p, w in cells) + ")")
    # the run's cells: each workload the JSON lists, on every path
    if path not in suite.paths:
        return f"unknown path {path!r} (paths: {', '.join(suite.paths)})"
    return f"workload {workload!r} is not in 'workloads'"


def _rep_problem(rep: int, reps: int, suite: Suite) -> str | None:
    """Why *rep* is not a repetition of the run (None: it is)."""
    if suite.paired_reps:  # one sample per repetition: each of them names its own
        return None if 0 <= rep < reps else f"rep must be in 0..{reps - 1}"
    return None if rep >= 0 else "rep must be >= 0"


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
        for m in b.suite.workloads[w][1]:
            out[(w, m)] = {p: stat([s.metrics[m] for s in b.samples
                                    if s.workload == w and s.path == p]) for p in b.suite.paths}
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


def lower_path_line(env: Mapping[str, Any]) -> str:
    """Which lower path a run measured (every suite's report says it)."""
    lower = env.get("lower_path")
    if not lower:
        return "Lower path: not recorded by this run (the harness before vhost-net support)."
    return (f"Lower path: **{lower}** (the data NIC under ivl0 and behind `force-lower`: "
            "vhost-net where the accelerator is KVM and /dev/vhost-net opens, QEMU's own "
            "virtio-net otherwise).")


def markdown(b: Bench) -> str:
    """The classic suite's report: every workload's metrics on every path."""
    env = b.environment
    paths, versus = b.suite.paths, b.suite.versus
    lines = [
        "## ivloop benchmark",
        "",
        f"Machine: {env.get('cpu_model', '?')}, {env.get('cores', '?')} cores, "
        f"host kernel {env.get('host_kernel', '?')}, {env.get('qemu_version', '?')}, "
        f"accelerator {env.get('accelerator', '?')}; guests: kernel "
        f"{env.get('guest_kernel', '?')}, {env.get('guest_vcpus', '?')} vCPU. "
        f"Run {env.get('date', '?')}.",
        lower_path_line(env),
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
        "| workload | metric | " + " | ".join([*paths, *(f"shm vs {o}" for o in versus)]) + " |",
        "|---|---|" + "---:|" * (len(paths) + len(versus)),
    ]
    for (w, m), cells in summarise(b).items():
        row = [b.suite.workloads[w][0], _metric_label(m)]
        for p in paths:
            c = cells[p]
            row.append(f"{_fmt(c.median)} [{_fmt(c.lo)}-{_fmt(c.hi)}]")
        for other in versus:
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


def cell_cpu_busy(b: Bench) -> dict[Cell, tuple[float, float]]:
    """(path, workload) -> median busy % of the client and the server guest, in cell order."""
    out: dict[Cell, tuple[float, float]] = {}
    for p, w in b.cells:
        loads = [s.cpu for s in b.samples if s.workload == w and s.path == p and s.cpu]
        if loads:
            out[(p, w)] = (statistics.median(c["client_busy_pct"] for c in loads),
                           statistics.median(c["server_busy_pct"] for c in loads))
    return out


def cpu_busy(b: Bench) -> dict[tuple[str, str], tuple[float, float]]:
    """(workload, path) -> median busy % of the client and the server guest."""
    return {(w, p): busy for (p, w), busy in cell_cpu_busy(b).items()}


def cpu_markdown(b: Bench) -> list[str]:
    """How busy the guests' vCPUs were on each path."""
    busy = cpu_busy(b)
    paths = b.suite.paths
    lines: list[str] = []
    if busy:
        lines += ["", "### Guest CPU", "",
                  "Busy % of the client / server guest's vCPU during each sample "
                  "(/proc/stat), median.", "",
                  "| workload | " + " | ".join(paths) + " |", "|---|" + "---:|" * len(paths)]
        for w in b.workloads:
            cells = [f"{busy[(w, p)][0]:.0f} / {busy[(w, p)][1]:.0f}" if (w, p) in busy
                     else "-" for p in paths]
            lines.append(f"| {b.suite.workloads[w][0]} | " + " | ".join(cells) + " |")
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
    paths, table = b.suite.paths, b.suite.workloads
    colours = {"shm": "tab:green", "lower": "tab:orange", "wire": "tab:blue"}
    written: list[Path] = []
    env = b.environment
    subtitle = (f"{env.get('accelerator', '?')} guests, {env.get('cpu_model', '?')}, "
                f"median of {b.reps}")

    tput = [k for k in s if k[1] == "throughput_mbps"]
    if tput:
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(tput)), 4.5))
        width = 0.27
        for i, p in enumerate(paths):
            xs = [j + (i - 1) * width for j in range(len(tput))]
            med = [s[k][p].median for k in tput]
            err = [[s[k][p].median - s[k][p].lo for k in tput],
                   [s[k][p].hi - s[k][p].median for k in tput]]
            ax.bar(xs, med, width, yerr=err, capsize=3, color=colours[p], label=p)
        ax.set_xticks(range(len(tput)), [table[w][0] for w, _ in tput], fontsize=8)
        ax.set_ylabel("Mbit/s")
        ax.set_title(f"Throughput by path\n{subtitle}, bars = min-max", fontsize=9)
        ax.legend()
        fig.tight_layout()
        path = out_dir / "throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    lat_w = [w for w in b.workloads if "lat_p50_us" in table[w][1]]
    if lat_w:
        fig, axes = plt.subplots(1, len(lat_w), figsize=(3.2 * len(lat_w), 4), squeeze=False)
        pct = ("lat_p50_us", "lat_p90_us", "lat_p99_us")
        for ax, w in zip(axes[0], lat_w, strict=True):
            for p in paths:
                ax.plot(["p50", "p90", "p99"], [s[(w, m)][p].median for m in pct],
                        marker="o", color=colours[p], label=p)
            ax.set_title(table[w][0], fontsize=8)
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
# the smp suite's report: ratios between its cells (bench_suites.SMP_COMPARISONS)


def smp_values(b: Bench, path: str, workload: str, metric: str) -> dict[int, float]:
    """rep -> the cell's value of *metric* (``sum_mbps``: both mix flows added)."""
    if metric == "sum_mbps":
        return {s.rep: s.metrics["shm_mbps"] + s.metrics["wire_mbps"] for s in b.samples
                if s.path == path and s.workload == workload}
    return {s.rep: s.metrics[metric] for s in b.samples
            if s.path == path and s.workload == workload}


def smp_stat(b: Bench, path: str, workload: str, metric: str) -> Stat:
    return stat(list(smp_values(b, path, workload, metric).values()))


def _div(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def paired(b: Bench, num: Measure, den: Measure) -> Stat | None:
    """num / den repetition by repetition (the two were measured next to each other)."""
    a, d = smp_values(b, *num), smp_values(b, *den)
    ratios = [r for rep in sorted(a.keys() & d.keys())
              if (r := _div(a[rep], d[rep])) is not None]
    return stat(ratios) if ratios else None


def comparison_value(b: Bench, c: Comparison) -> float | None:
    """The ratio of the two cells' medians; None when the denominator's is zero."""
    return _div(smp_stat(b, *c.num).median, smp_stat(b, *c.den).median)


def _comparisons(b: Bench) -> dict[str, Comparison]:
    return {c.key: c for c in b.suite.comparisons}


def smp_headline(b: Bench) -> dict[str, float | bool | None]:
    """Every ratio (``<key>_x``) and, where there is a target, whether it is met."""
    out: dict[str, float | bool | None] = {}
    for c in b.suite.comparisons:
        out[f"{c.key}_x"] = v = comparison_value(b, c)
        if c.goal:
            out[f"{c.key}_met"] = c.met(v)
    return out


def _cell(s: Stat) -> str:
    return f"{_fmt(s.median)} [{_fmt(s.lo)}-{_fmt(s.hi)}]"


def _ratio_text(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def _spread(s: Stat | None, digits: int = 2) -> str:
    return "-" if s is None else f"{s.lo:.{digits}f}-{s.hi:.{digits}f}"


def _verdict(c: Comparison, b: Bench, digits: int = 2) -> str:
    v = comparison_value(b, c)
    met = c.met(v)
    if v is None:
        return "**-** (not measurable: a zero median)"
    return (f"**{v:.{digits}f}x** (target {c.goal}: {'met' if met else 'not met'}; "
            f"{_spread(paired(b, c.num, c.den), digits)} repetition by repetition)")


def _row(b: Bench, label: str, c: Comparison, shown: tuple[Measure, Measure],
         digits: int = 2) -> str:
    """A table row of comparison *c*: its two cells in the order *shown*, ratio, spread."""
    first, second = (_cell(smp_stat(b, *m)) for m in shown)
    return (f"| {label} | {first} | {second} | {_ratio_text(comparison_value(b, c), digits)} "
            f"| {_spread(paired(b, c.num, c.den), digits)} |")


def _machine_line(env: Mapping[str, Any]) -> str:
    """The host, its QEMU and accelerator, the guests' kernel and size, when and what."""
    cpus = env.get("guest_vcpus", "?")
    return (f"Machine: {env.get('cpu_model', '?')}, {env.get('cores', '?')} cores, "
            f"host kernel {env.get('host_kernel', '?')}, {env.get('qemu_version', '?')}, "
            f"accelerator {env.get('accelerator', '?')}; guests: kernel "
            f"{env.get('guest_kernel', '?')}, {cpus} vCPU{'' if cpus == 1 else 's'}, "
            f"{env.get('guest_memory_mib', '?')} MiB each. Run {env.get('date', '?')}"
            + (f", commit {env['commit']}" if env.get("commit") else "") + ".")


def _run_facts(b: Bench) -> str:
    """Medians and sample length, what was discarded, how long it took, which driver."""
    env = b.environment
    return (f"median [min-max]; {env.get('seconds', '?')} s per sample"
            + (f"; {b.invalid} sample(s) discarded as invalid" if b.invalid else "")
            + (f"; {b.duration_s:.0f} s of measurement" if b.duration_s is not None else "")
            + "." + (f" Guest ivloop.ko sha256 {env['driver_sha256']}."
                     if env.get("driver_sha256") else "")
            + (f" Ring poller: a {env['ring_poll_us']} µs window (ethtool rx-usecs)."
               if "ring_poll_us" in env else ""))


def smp_markdown(b: Bench) -> str:
    """The smp suite's report: its comparisons, each a table row and maybe a target."""
    env = b.environment
    pair, cross, plain = (b.roles[r] for r in b.suite.roles)
    compare = _comparisons(b)
    hosts = env.get("hosts", {})

    def at(vm: str) -> str:
        return f"{vm} (host {hosts[vm]})" if vm in hosts else vm

    lines = [
        "## ivloop benchmark: 2-vCPU guests",
        "",
        _machine_line(env),
        lower_path_line(env),
        "",
        f"Paths: **shm** = {at(pair[0])} -> {at(pair[1])} over the shared ring; **lower** = "
        "the same pair with `force-lower` on both (virtio-net, tap, bridge); **wire** = "
        f"{at(cross[0])} -> {at(cross[1])} through ivl0 (the driver loaded on both, nothing "
        f"to accelerate); **no driver** = {at(plain[0])} -> {at(plain[1])}, placed and sized "
        "like the wire pair but booted with the driver off (`driver = false`: IP on eth0); "
        f"**mix** = {pair[0]} streaming to {pair[1]} (shm) and to {cross[1]} (wire) at once. "
        f"Every cell is measured once per repetition, in the same order, {b.reps} "
        f"repetition(s); " + _run_facts(b),
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
        c = compare[f"scaling_{path}"]
        lines.append(_row(b, path, c, (c.den, c.num)))
    lines += [
        "",
        f"- Target shm 4 streams ≥ {SCALING_TARGET}x one stream: "
        f"{_verdict(compare['scaling_shm'], b)}.",
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
        c = compare[key]
        lines.append(_row(b, label, c, (c.num, c.den), 3))
    lines += [
        "",
        f"- Target within {100 * COST_TOLERANCE:.0f}% of no driver, iperf3 throughput: "
        f"ivl0 / no driver = {_verdict(compare['cost_throughput'], b, 3)}.",
        f"- Target within {100 * COST_TOLERANCE:.0f}% of no driver, TCP_RR mean round "
        f"trip: ivl0 / no driver = {_verdict(compare['cost_tcp_rr_latency'], b, 3)}.",
        "",
        f"### Mixture: {pair[0]} -> {pair[1]} (shm) and {pair[0]} -> {cross[1]} (wire) at once",
        "",
        "| flow | alone (Mbit/s) | together (Mbit/s) | together / alone | per repetition |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in (("mix_shm", f"{pair[0]} -> {pair[1]}, shm"),
                       ("mix_wire", f"{pair[0]} -> {cross[1]}, wire through ivl0")):
        c = compare[key]
        lines.append(_row(b, label, c, (c.den, c.num)))
    lines += [
        f"| both flows, sum | - | {_cell(smp_stat(b, 'mix', 'iperf3_mix', 'sum_mbps'))} "
        "| - | - |",
        "",
        "Alone: the same run's 1-stream shm and wire cells. No target is set for the "
        "mixture; it shows what each flow keeps when both share the sender.",
    ]
    lines += smp_cpu_markdown(b)
    return "\n".join(lines) + "\n"


def smp_cpu_markdown(b: Bench, whose: str = "for mix the server is the co-resident "
                                               "receiver") -> list[str]:
    busy = cell_cpu_busy(b)
    if not busy:
        return []
    lines = ["", "### Guest CPU", "",
             "Busy % of the client / server guest (all its vCPUs, /proc/stat) during each "
             f"sample, median; {whose}.", "",
             "| path | workload | client / server busy % |", "|---|---|---:|"]
    for (p, w), (client, server) in busy.items():
        lines.append(f"| {p} | {b.suite.workloads[w][0]} | {client:.0f} / {server:.0f} |")
    return lines


# ---------------------------------------------------------------------------
# the pairs suite's report: shm against lower at each step (bench_suites.PAIRS_COMPARISONS)


def pairs_markdown(b: Bench) -> str:
    """The pairs suite's report: per step, both paths' aggregates and their ratio."""
    env = b.environment
    compare = _comparisons(b)
    pairs = [b.roles[r] for r in b.suite.roles if r in PAIR_ROLES]
    hosts = env.get("hosts", {})
    where = {hosts.get(vm) for p in pairs for vm in p}
    lines = [
        "## ivloop benchmark: co-resident pairs at once",
        "",
        _machine_line(env),
        lower_path_line(env),
        "",
        "Pairs: " + ", ".join(f"{a} -> {z}" for a, z in pairs)
        + (f", all on host {next(iter(where))}" if len(where) == 1 and None not in where
           else "") + ". Step N runs the first N pairs at once, every client started "
        "together: each pair one iperf3 TCP stream, or one netperf TCP_RR connection; a "
        "step's aggregate is the sum of its pairs' rates. **shm** = over the shared rings; "
        "**lower** = the same pairs with `force-lower` on every guest of the step. Every "
        "pair's own counters must show the path. Each cell is measured once per "
        "repetition, the two paths of a step next to each other (lower first in every "
        f"other repetition), {b.reps} repetition(s); " + _run_facts(b),
        "shm / lower: the ratio of the medians (above 1: shm ahead); *per repetition*: "
        "the min-max of the same ratio within each repetition.",
    ]
    for w, run in PAIRS_RUNS.items():
        lines += ["", f"### {run.title} ({run.unit})", "",
                  "| pairs at once | shm | lower | shm / lower | per repetition |",
                  "|---:|---:|---:|---:|---:|"]
        for n in PAIRS_STEPS:
            c = compare[bench_suites.pairs_key(w, n)]
            lines.append(_row(b, str(n), c, (c.num, c.den)))
    first, last = PAIRS_STEPS[0], PAIRS_STEPS[-1]
    growth = []
    for w, run in PAIRS_RUNS.items():
        one, many = bench_suites.pairs_workload(w, first), bench_suites.pairs_workload(w, last)
        x = [comparison_value(b, Comparison("", (p, many, run.metric), (p, one, run.metric)))
             for p in ("shm", "lower")]
        growth.append(f"{run.short} {_ratio_text(x[0])} on shm, {_ratio_text(x[1])} on lower")
    lines += ["", f"The aggregate at {last} pairs at once against {first}: "
              + "; ".join(growth) + "."]
    lines += smp_cpu_markdown(b, "the mean over the step's clients / servers")
    return "\n".join(lines) + "\n"


# Each suite's report: bench.md's text, and whether charts go with it (Suite.charts).
REPORTS: dict[str, Callable[[Bench], str]] = {CLASSIC_SUITE: markdown, SMP_SUITE: smp_markdown,
                                              PAIRS_SUITE: pairs_markdown}


def write(json_path: Path, out_dir: Path | None = None) -> list[Path]:
    """Validate *json_path*, then write bench.md (and the charts) next to it.

    The JSON's ``suite`` says which report: none (or "paths") the classic
    shm / lower / wire table with its charts, "smp" the 2-vCPU rows, "pairs"
    the steps of co-resident pairs at once.
    """
    data = read_json(json_path)
    name = data.get("suite", CLASSIC_SUITE) if isinstance(data, dict) else CLASSIC_SUITE
    if name not in SUITES:
        raise BenchReportError(f"{json_path}: unknown suite {name!r} "
                               f"(suites: {', '.join(SUITES)})")
    suite = BY_NAME[name]
    b = check(data, suite)
    out_dir = out_dir or json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "bench.md"
    md.write_text(REPORTS[suite.name](b))
    return [md, *(charts(b, out_dir) if suite.charts else [])]
