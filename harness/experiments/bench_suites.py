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

Paths: shm and lower are the co-resident pair (lower: ``force-lower`` on both);
wire is the cross pair through ivl0 (the driver loaded, nothing to
accelerate); nodriver is a second pair placed like the cross pair but booted
without the driver (eth0, counted from eth0's own statistics); mix is the
pair's client streaming to its co-resident peer and across hosts at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SCHEMA = 1
CLASSIC_SUITE = "paths"  # shm / lower / wire over many workloads; no "suite" key in its JSON
SMP_SUITE = "smp"

Cell = tuple[str, str]  # (path, workload): what one sample measures
Measure = tuple[str, str, str]  # (path, workload, metric)
Workloads = Mapping[str, tuple[str, tuple[str, ...]]]  # name -> (description, metrics)

# Which role's pair of VMs (client, server) a path runs between; mix streams
# from the pair's client to its peer and to the cross pair's server at once.
PATH_ROLES = {"shm": "pair", "lower": "pair", "mix": "pair", "wire": "cross",
              "nodriver": "plain"}

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
        """A run's cells, in the order each repetition measures them."""
        if self.cells is not None:
            return self.cells
        return tuple((p, w) for w in workloads for p in self.paths)


CLASSIC = Suite(
    name=CLASSIC_SUITE, schema=SCHEMA,
    document=("schema", "reps", "quick", "seconds", "environment", "workloads", "paths",
              "samples", "native"),
    sample=("path", "workload", "rep", "client", "valid", "error", "metrics", "counters",
            "cpu"),
    environment=("accelerator", "guest_kernel", "guest_vcpus", "guest_memory_mib", "iperf3",
                 "pair", "cross", "seconds", "udp_rate", "sockperf_sizes", "busy_poll_us",
                 "ring_poll_us"),
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
    environment=("accelerator", "topology", "guest_kernel", "guest_vcpus", "guest_memory_mib",
                 "iperf3", "driver_sha256", "ring_poll_us", "hosts", "seconds"),
    workloads=SMP_WORKLOADS, paths=SMP_PATHS, roles=SMP_ROLES, cells=SMP_CELLS,
    topology=SMP_TOPOLOGY_PATH, min_cpus=SMP_MIN_CPUS, paired_reps=True,
    progress="rep {rep}/{reps} {workload:<15} {path:<8} {summary}",
    comparisons=SMP_COMPARISONS,
)  # fmt: skip

BY_NAME = {s.name: s for s in (CLASSIC, SMP)}
SUITES = tuple(BY_NAME)  # `harness bench --suite` choices, the default first
