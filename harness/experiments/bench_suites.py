"""The benchmark's suites as data: what each measures, on which VMs, and how its JSON looks.

One runner (:mod:`harness.experiments.bench`) and one validator
(:mod:`harness.experiments.bench_report`) serve every suite; all they need to
know about a suite is its :class:`Suite` here.

* ``paths`` (:data:`CLASSIC`, the default): the shm, lower and wire paths for
  every workload of the run, on any topology with a co-resident pair and a
  cross-host pair; its JSON names no suite.
* ``smp`` (:data:`SMP`, on ``harness/topologies/bench-smp.toml``): 2-vCPU
  guests, fixed cells: 1 against 4 streams on shm and lower, the cross-host
  pair through ivl0 against a pair booted without the driver, and a mixture.
* ``pairs`` (:data:`PAIRS`, on ``harness/topologies/many.toml``): 1, 2 and 4
  co-resident pairs streaming at once, shm against lower at each step; a
  sample is the whole step, its metrics the sums of its pairs'.

Paths: shm and lower are the co-resident pair (lower: ``force-lower`` on both;
in the pairs suite the co-resident pairs of the step, ``force-lower`` on all);
wire is the cross pair through ivl0 (the driver loaded, nothing to
accelerate); nodriver is a second pair placed like the cross pair but booted
without the driver (eth0, counted from eth0's own statistics); mix is the
pair's client streaming to its co-resident peer and across hosts at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

SCHEMA = 1
CLASSIC_SUITE = "paths"  # shm / lower / wire over many workloads; no "suite" key in its JSON
SMP_SUITE = "smp"
PAIRS_SUITE = "pairs"

Cell = tuple[str, str]  # (path, workload): what one sample measures
Measure = tuple[str, str, str]  # (path, workload, metric)
Workloads = Mapping[str, tuple[str, tuple[str, ...]]]  # name -> (description, metrics)

# Which role's pair of VMs (client, server) a path runs between; mix streams
# from the pair's client to its peer and to the cross pair's server at once.
PATH_ROLES = {"shm": "pair", "lower": "pair", "mix": "pair", "wire": "cross",
              "nodriver": "plain"}
# The roles that are co-resident pairs (shm and lower run between their VMs):
# "pair" in every suite, the others the pairs suite's second to fourth pairs.
PAIR_ROLES = ("pair", "pair2", "pair3", "pair4")

# ---------------------------------------------------------------------------
# the classic suite

PATHS = ("shm", "lower", "wire")

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
QUICK_WORKLOADS = ("iperf3_tcp_1", "iperf3_udp", "netperf_tcp_rr", "sockperf_pp_small")

BUSY_POLL_SUFFIX = "_bp"
NO_RING_POLL_SUFFIX = "_irq"
VARIANT_SUFFIXES = (BUSY_POLL_SUFFIX, NO_RING_POLL_SUFFIX)

# ---------------------------------------------------------------------------
# the smp suite: 2-vCPU guests
#
# Three comparisons, every cell interleaved in every repetition: 1 against 4
# iperf3 streams on shm and on the forced-lower path; the cross-host pair
# through ivl0 against a pair placed the same way that booted without the
# driver; and a mixture, the client streaming to its co-resident peer and
# across hosts at once, against each flow alone.  The no-driver pair is a
# second pair of VMs rather than the cross pair rebooted: only two pairs up at
# once can be interleaved, and a reboot between blocks would put minutes of
# this machine's drift between the two sides of a 5 % comparison.

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
SMP_CELLS: tuple[Cell, ...] = (
    ("shm", "iperf3_tcp_1"), ("lower", "iperf3_tcp_1"),
    ("shm", "iperf3_tcp_4"), ("lower", "iperf3_tcp_4"),
    ("wire", "iperf3_tcp_1"), ("nodriver", "iperf3_tcp_1"),
    ("wire", "netperf_tcp_rr"), ("nodriver", "netperf_tcp_rr"),
    ("mix", "iperf3_mix"),
)
SMP_ROLES = ("pair", "cross", "plain")
SMP_MIN_CPUS = 2
SMP_TOPOLOGY_PATH = "harness/topologies/bench-smp.toml"  # from the repository
SCALING_TARGET = 1.5  # shm: 4 streams at least this many times one stream
COST_TOLERANCE = 0.05  # ivl0 within this share of no driver, across hosts


@dataclass(frozen=True)
class Comparison:
    """One ratio of the smp report: num's median over den's, against a goal or none."""

    key: str  # headline key, e.g. "scaling_shm"
    num: Measure
    den: Measure
    goal: str = ""  # "≥ 1.5x"; empty: informative, no target
    at_least: float | None = None  # met when the ratio is >= this
    at_most: float | None = None  # met when the ratio is <= this

    def met(self, value: float | None) -> bool | None:
        """Whether *value* meets the goal; None when there is none or no value."""
        if value is None or (self.at_least is None and self.at_most is None):
            return None
        return ((self.at_least is None or value >= self.at_least)
                and (self.at_most is None or value <= self.at_most))


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

# ---------------------------------------------------------------------------
# the pairs suite: many co-resident pairs at once
#
# The 2013 measurement paper's mixture of local and remote workloads, extended
# to many pairs: at step N the first N pairs of eight one-vCPU guests run one
# iperf3 stream (or one netperf TCP_RR) each, all started together, on shm and
# then on the lower path (force-lower on every guest of the step), every step
# and path in every repetition, the two paths of a step next to each other and
# their order swapped every other repetition.  The aggregate is the sum of the
# pairs' rates; every pair's own counters must show the path.

PAIRS_STEPS = (1, 2, 4)  # pairs at once


class PairsRun(NamedTuple):
    """What each pair of a step runs, and how the report shows the steps' sums."""

    metric: str  # the one metric summed over the pairs
    title: str  # the report's table
    unit: str
    short: str  # in the sentence comparing the last step with the first


# workload each pair runs -> its row of tables (a variant such as
# "netperf_tcp_rr_irq", ring polling off on every guest of the step, is one
# more entry)
PAIRS_RUNS = {
    "iperf3_tcp_1": PairsRun("throughput_mbps",
                             "Aggregate throughput: iperf3 TCP, one stream a pair", "Mbit/s",
                             "throughput"),
    "netperf_tcp_rr": PairsRun("transactions_per_s",
                               "Aggregate TCP_RR: netperf, one connection a pair",
                               "transactions/s", "TCP_RR transactions"),
}
PAIRS_TOPOLOGY_PATH = "harness/topologies/many.toml"  # from the repository


def pairs_workload(base: str, n: int) -> str:
    """The pairs suite's name for *base* run by *n* pairs at once."""
    return f"{base}_x{n}"


def pairs_key(base: str, n: int) -> str:
    """The key of shm / lower for *base* at *n* pairs (``<key>_x`` in the headline)."""
    return f"{base}_{n}pairs"


# workload -> (the workload each pair runs, how many pairs at once)
PAIRS_AT_ONCE = {pairs_workload(w, n): (w, n) for n in PAIRS_STEPS for w in PAIRS_RUNS}
PAIRS_WORKLOADS: dict[str, tuple[str, tuple[str, ...]]] = {
    name: (f"{WORKLOADS[w][0]}, {n} pair{'s' if n > 1 else ''} at once (sum)",
           (PAIRS_RUNS[w].metric,))
    for name, (w, n) in PAIRS_AT_ONCE.items()}
PAIRS_CELLS: tuple[Cell, ...] = tuple(
    (p, name) for name in PAIRS_AT_ONCE for p in ("shm", "lower"))
PAIRS_COMPARISONS = tuple(
    Comparison(pairs_key(w, n), ("shm", pairs_workload(w, n), m),
               ("lower", pairs_workload(w, n), m))
    for w, (m, *_) in PAIRS_RUNS.items() for n in PAIRS_STEPS)

# ---------------------------------------------------------------------------
# the suites


@dataclass(frozen=True)
class Suite:
    """What a suite measures and records: all that its runs and reports do not share."""

    name: str  # `harness bench --suite`, and the JSON's "suite" where it names one
    schema: int
    # Top-level keys of its JSON, in the order written.  What the validator
    # reads follows from it: "suite" (the JSON names its suite), "workloads"
    # (the run's list; its cells are each path of each), "roles", "native"
    # (the native ring benchmark runs with the suite), "duration_s".
    document: tuple[str, ...]
    sample: tuple[str, ...]  # the keys of one sample, in the order written
    environment: tuple[str, ...]  # what the JSON records about the run beyond the host
    workloads: Workloads
    paths: tuple[str, ...]
    roles: tuple[str, ...]  # the pairs of VMs it runs on (see PATH_ROLES)
    # Its cells in measuring order; None: each workload of the run on every path.
    cells: tuple[Cell, ...] | None = None
    quick_workloads: tuple[str, ...] | None = None  # a --quick run's; None: all of them
    topology: str | None = None  # the topology it needs, from the repository; None: any
    min_cpus: int | None = None  # every VM alike, with at least these vCPUs; None: any
    # Ratios are taken within each repetition: one valid sample per cell and repetition.
    paired_reps: bool = False
    charts: bool = False  # the report draws throughput.png and latency.png
    # One sample's progress line, for str.format(rep, reps, workload, path, summary).
    progress: str = ""
    versus: tuple[str, ...] = ()  # per row: how many times better shm is than these paths
    comparisons: tuple[Comparison, ...] = ()  # ratios between cells, with their targets
    # workload -> (the workload each pair runs, how many pairs run it at once:
    # the suite's first co-resident pairs); a workload not here runs on one pair.
    at_once: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    # Odd repetitions measure each two neighbouring cells the other way round.
    alternate: bool = False
    # Environment keys its JSON must have (older runs of the other suites lack some).
    required_environment: tuple[str, ...] = ()

    @property
    def tagged(self) -> bool:
        """Its JSON names it (a JSON without "suite" is the classic suite's)."""
        return "suite" in self.document

    def run_workloads(self, quick: bool) -> tuple[str, ...]:
        """The workloads a run measures."""
        if quick and self.quick_workloads is not None:
            return self.quick_workloads
        return tuple(self.workloads)

    def cells_of(self, workloads: Sequence[str]) -> tuple[Cell, ...]:
        """A run's cells, in the order :meth:`rep_cells` starts from."""
        if self.cells is not None:
            return self.cells
        return tuple((p, w) for w in workloads for p in self.paths)

    def rep_cells(self, workloads: Sequence[str], rep: int) -> tuple[Cell, ...]:
        """The cells in the order repetition *rep* (from 0) measures them."""
        cells = self.cells_of(workloads)
        if not (self.alternate and rep % 2):
            return cells
        return tuple(c for i in range(0, len(cells), 2) for c in reversed(cells[i:i + 2]))

    def flow_roles(self, workload: str) -> tuple[str, ...]:
        """The co-resident pairs (roles) that run *workload* at once; () for one path's ends."""
        return PAIR_ROLES[:self.at_once[workload][1]] if workload in self.at_once else ()


CLASSIC = Suite(
    name=CLASSIC_SUITE, schema=SCHEMA,
    document=("schema", "reps", "quick", "seconds", "environment", "workloads", "paths",
              "samples", "native"),
    sample=("path", "workload", "rep", "client", "valid", "error", "metrics", "counters",
            "cpu"),
    environment=("accelerator", "lower_path", "guest_kernel", "guest_vcpus", "guest_memory_mib",
                 "iperf3", "pair", "cross", "seconds", "udp_rate", "sockperf_sizes",
                 "busy_poll_us", "ring_poll_us"),
    workloads=WORKLOADS, paths=PATHS, roles=("pair", "cross"),
    quick_workloads=QUICK_WORKLOADS, charts=True,
    progress="rep {rep}/{reps} {workload:<18} {path:<5} {summary}",
    versus=("lower", "wire"),
)  # fmt: skip

SMP = Suite(
    name=SMP_SUITE, schema=1,
    document=("schema", "suite", "reps", "quick", "seconds", "environment", "roles", "cells",
              "samples", "duration_s"),
    sample=("path", "workload", "rep", "client", "server", "valid", "error", "metrics",
            "counters", "cpu", "flow_bytes"),
    environment=("accelerator", "lower_path", "topology", "guest_kernel", "guest_vcpus",
                 "guest_memory_mib", "iperf3", "driver_sha256", "ring_poll_us", "hosts",
                 "seconds"),
    workloads=SMP_WORKLOADS, paths=SMP_PATHS, roles=SMP_ROLES, cells=SMP_CELLS,
    topology=SMP_TOPOLOGY_PATH, min_cpus=SMP_MIN_CPUS, paired_reps=True,
    progress="rep {rep}/{reps} {workload:<15} {path:<8} {summary}",
    comparisons=SMP_COMPARISONS,
)  # fmt: skip

PAIRS = Suite(
    name=PAIRS_SUITE, schema=1,
    document=("schema", "suite", "reps", "quick", "seconds", "environment", "roles", "cells",
              "samples", "duration_s"),
    sample=("path", "workload", "rep", "valid", "error", "metrics", "counters", "cpu",
            "flows"),
    environment=("accelerator", "lower_path", "topology", "guest_kernel", "guest_vcpus",
                 "guest_memory_mib", "iperf3", "driver_sha256", "ring_poll_us", "hosts",
                 "seconds"),
    workloads=PAIRS_WORKLOADS, paths=("shm", "lower"), roles=PAIR_ROLES, cells=PAIRS_CELLS,
    topology=PAIRS_TOPOLOGY_PATH, min_cpus=1, paired_reps=True,
    progress="rep {rep}/{reps} {workload:<20} {path:<5} {summary}",
    comparisons=PAIRS_COMPARISONS, at_once=PAIRS_AT_ONCE, alternate=True,
    required_environment=("accelerator", "lower_path"),
)  # fmt: skip

BY_NAME = {s.name: s for s in (CLASSIC, SMP, PAIRS)}
SUITES = tuple(BY_NAME)  # `harness bench --suite` choices, the default first
