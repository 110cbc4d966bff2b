"""The pairs benchmark suite: 1, 2 and 4 co-resident pairs at once, shm against lower.

No guest boots here: the report is rendered from synthetic JSON, the roles
are checked against the recorded many.toml, and whole steps are measured on
fake guests whose counters follow the route each command would take.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from harness.experiments import bench, bench_report, bench_suites
from harness.experiments.bench_report import BenchReportError, validate_pairs
from harness.experiments.bench_suites import PAIRS, PAIRS_AT_ONCE, pairs_key, pairs_workload
from harness.lab import topology

from .test_bench_report import Mutate, assert_one_quick_rep, assert_rejects, put, report_only
from .test_bench_smp import FakeGuest, recorded

ROLES = {"pair": ("vm1", "vm2"), "pair2": ("vm3", "vm4"), "pair3": ("vm5", "vm6"),
         "pair4": ("vm7", "vm8")}
CLIENTS = ["vm1", "vm3", "vm5", "vm7"]

# (path, workload each pair runs) -> pairs at once -> the step's aggregate (the median of
# the five repetitions; each repetition moves it by SPREAD)
AGGREGATE = {
    ("shm", "iperf3_tcp_1"): {1: 2000.0, 2: 2400.0, 4: 2800.0},
    ("lower", "iperf3_tcp_1"): {1: 1000.0, 2: 1600.0, 4: 2000.0},  # 2.0x, 1.5x, 1.4x
    ("shm", "netperf_tcp_rr"): {1: 8000.0, 2: 10000.0, 4: 12000.0},
    ("lower", "netperf_tcp_rr"): {1: 1600.0, 2: 2500.0, 4: 4000.0},  # 5x, 4x, 3x
}
SPREAD = (1.0, 1.05, 0.95, 1.02, 0.98)


def _counters(path: str) -> dict[str, int]:
    return ({"shm_tx_bytes": 10_000, "lower_tx_bytes": 100} if path == "shm"
            else {"shm_tx_bytes": 0, "lower_tx_bytes": 10_000})


def _sample(path: str, workload: str, rep: int) -> dict[str, Any]:
    base, n = PAIRS_AT_ONCE[workload]
    metric = bench_suites.PAIRS_RUNS[base].metric
    total = AGGREGATE[(path, base)][n] * SPREAD[rep % 5]
    flows = [{"client": c, "server": s, "metrics": {metric: total / n},
              "counters": _counters(path), "cpu": {"client_busy_pct": 90.0,
                                                   "server_busy_pct": 60.0}}
             for c, s in list(ROLES.values())[:n]]
    return {"path": path, "workload": workload, "rep": rep, "valid": True, "error": None,
            "metrics": {metric: total},
            "counters": {k: n * v for k, v in _counters(path).items()},
            "cpu": {"client_busy_pct": 90.0, "server_busy_pct": 60.0}, "flows": flows}


def synthetic(reps: int = 5) -> dict[str, Any]:
    samples = [_sample(p, w, rep) for rep in range(reps)
               for p, w in PAIRS.rep_cells(list(PAIRS.workloads), rep)]
    return {"schema": 1, "suite": "pairs", "reps": reps, "quick": False, "seconds": 3,
            "duration_s": 612.0,
            "environment": {"accelerator": "tcg", "lower_path": "virtio-net, user-space (TCG)",
                            "cpu_model": "Test CPU", "cores": 2, "host_kernel": "6.1.0-test",
                            "qemu_version": "QEMU 7.2", "guest_kernel": "6.1.0-guest",
                            "guest_vcpus": 1, "guest_memory_mib": 160, "commit": "abc1234",
                            "hosts": {f"vm{i}": "A" for i in range(1, 9)}},
            "roles": {r: list(p) for r, p in ROLES.items()},
            "cells": [list(c) for c in PAIRS.cells_of(list(PAIRS.workloads))],
            "samples": samples}


# ---------------------------------------------------------------------------
# the suite as data


def test_each_step_has_both_paths_of_both_workloads_next_to_each_other() -> None:
    cells = PAIRS.cells_of(list(PAIRS.workloads))
    assert len(cells) == 2 * 2 * len(bench_suites.PAIRS_STEPS)
    for i in range(0, len(cells), 2):
        (p1, w1), (p2, w2) = cells[i:i + 2]
        assert (p1, p2) == ("shm", "lower") and w1 == w2
    assert PAIRS.rep_cells(list(PAIRS.workloads), 0) == cells
    odd = PAIRS.rep_cells(list(PAIRS.workloads), 1)
    assert odd[:2] == (("lower", "iperf3_tcp_1_x1"), ("shm", "iperf3_tcp_1_x1"))
    assert sorted(odd) == sorted(cells)
    # the other suites keep one order
    smp = bench_suites.SMP
    assert smp.rep_cells([], 1) == smp.cells_of([])


def test_a_step_runs_the_first_n_pairs() -> None:
    assert PAIRS.flow_roles(pairs_workload("iperf3_tcp_1", 1)) == ("pair",)
    assert PAIRS.flow_roles(pairs_workload("netperf_tcp_rr", 4)) == (
        "pair", "pair2", "pair3", "pair4")
    assert bench.flows_of(PAIRS, "lower", "netperf_tcp_rr_x2", ROLES) == [("vm1", "vm2"),
                                                                          ("vm3", "vm4")]
    # a suite without at_once: the path's two ends
    assert bench.flows_of(bench_suites.CLASSIC, "lower", "iperf3_tcp_1",
                          {"pair": ("vm1", "vm2"), "cross": ("vm1", "vm3")}) == [("vm1", "vm2")]


def test_every_suite_records_the_lower_path() -> None:
    for suite in bench_suites.BY_NAME.values():
        assert "lower_path" in suite.environment, suite.name


# ---------------------------------------------------------------------------
# the report


def test_ratio_at_each_step_from_medians() -> None:
    b = validate_pairs(synthetic())
    h = bench_report.smp_headline(b)
    want = {("iperf3_tcp_1", 1): 2.0, ("iperf3_tcp_1", 2): 1.5, ("iperf3_tcp_1", 4): 1.4,
            ("netperf_tcp_rr", 1): 5.0, ("netperf_tcp_rr", 2): 4.0, ("netperf_tcp_rr", 4): 3.0}
    for (w, n), x in want.items():
        assert h[f"{pairs_key(w, n)}_x"] == pytest.approx(x)
    assert not any(k.endswith("_met") for k in h)  # no target: a measurement


def test_markdown_per_step_rows_and_the_lower_path() -> None:
    md = bench_report.pairs_markdown(validate_pairs(synthetic()))
    assert md.startswith("## ivloop benchmark: co-resident pairs at once\n")
    assert "guests: kernel 6.1.0-guest, 1 vCPU, 160 MiB each" in md
    assert "Lower path: **virtio-net, user-space (TCG)**" in md
    assert "Pairs: vm1 -> vm2, vm3 -> vm4, vm5 -> vm6, vm7 -> vm8, all on host A." in md
    assert "612 s of measurement" in md
    tput = md[md.index("### Aggregate throughput"):md.index("### Aggregate TCP_RR")]
    assert "| 1 | 2000 [1900-2100] | 1000 [950-1050] | 2.00x | 2.00-2.00 |" in tput
    assert "| 4 | 2800 [2660-2940] | 2000 [1900-2100] | 1.40x | 1.40-1.40 |" in tput
    rr = md[md.index("### Aggregate TCP_RR"):]
    assert "| 2 | 10000 [9500-10500] | 2500 [2375-2625] | 4.00x | 4.00-4.00 |" in rr
    assert ("The aggregate at 4 pairs at once against 1: throughput 1.40x on shm, 2.00x "
            "on lower; TCP_RR transactions 1.50x on shm, 2.50x on lower.") in md
    assert "the mean over the step's clients / servers" in md


def test_cli_report_only_renders_a_pairs_run(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out = report_only(tmp_path, synthetic())
    assert code == 0
    assert "### Aggregate TCP_RR: netperf, one connection a pair" in (
        out / "bench.md").read_text()
    assert not (out / "throughput.png").exists()  # the classic suite's charts only
    assert "co-resident pairs at once" in capsys.readouterr().out


def test_one_quick_repetition() -> None:
    assert_one_quick_rep(synthetic(1), PAIRS)


SHM_X2, LOWER_X2 = 4, 5  # rep 0's samples of iperf3 at 2 pairs


def _flow(i: int, key: str, value: Any, sample: int = SHM_X2) -> Mutate:
    """Set *key* of flow *i* of samples[*sample*]."""
    return put(key, value, lambda d: d["samples"][sample]["flows"][i])


def _drop_flow(data: dict[str, Any]) -> None:
    data["samples"][SHM_X2]["flows"].pop()


def _both_on_shm(data: dict[str, Any]) -> None:
    data["samples"][LOWER_X2]["flows"][1]["counters"] = _counters("shm")


@pytest.mark.parametrize(("mutate", "message"), [
    (put("lower_path", KeyError, lambda d: d["environment"]),
     "benchmark: environment 'lower_path' must be a non-empty string, got None"),
    (put("lower_path", "", lambda d: d["environment"]), "environment 'lower_path'"),
    (_drop_flow, "samples[4] (shm/iperf3_tcp_1_x2 rep 0): marked valid but 'flows' must list "
                 "the 2 pair(s) measured at once"),
    (_both_on_shm, "samples[5] (lower/iperf3_tcp_1_x2 rep 0): marked valid but flows[1] "
                   "(vm3): the sender's counters contradict path 'lower' (shm_tx_bytes +10000, "
                   "lower_tx_bytes +100)"),
    (_flow(1, "client", "vm5"), "flows[1] is vm5 -> vm4, not the pair pair2 (vm3 -> vm4)"),
    (_flow(0, "metrics", {}), "flows[0] (vm1): metric(s) throughput_mbps missing"),
    (_flow(0, "counters", None), "flows[0] (vm1): no 'counters' object"),
    (put("throughput_mbps", 1.0, lambda d: d["samples"][SHM_X2]["metrics"]),
     "metric 'throughput_mbps' is 1.0, not the sum of its pairs' (2400)"),
    (put("pair4", ["vm7"], lambda d: d["roles"]),
     "roles 'pair4' must be a list of two VM names"),
    (lambda d: d["samples"].pop(), "lower/netperf_tcp_rr_x4: 4 valid sample(s), need 5"),
    (lambda d: d["samples"].append(copy.deepcopy(d["samples"][0])),
     "a second valid sample for this cell and rep"),
])  # fmt: skip
def test_rejects(mutate: Mutate, message: str) -> None:
    assert_rejects(synthetic(), mutate, message, PAIRS)


def test_a_sample_marked_invalid_is_counted_not_used() -> None:
    data = synthetic()
    bad = copy.deepcopy(data["samples"][LOWER_X2])
    data["samples"].insert(LOWER_X2, {**bad, "valid": False, "error": "vm3: no route"})
    b = validate_pairs(data)
    assert b.invalid == 1 and "1 sample(s) discarded as invalid" in bench_report.pairs_markdown(b)


# ---------------------------------------------------------------------------
# the roles against the recorded topology


def many_data() -> dict[str, Any]:
    return topology.load(bench.vms.REPO / bench_suites.PAIRS_TOPOLOGY_PATH).raw


def test_the_shipped_topology_fits_the_suite() -> None:
    topo, state = recorded(copy.deepcopy(many_data()))
    bench.check_roles(PAIRS, topo, state, ROLES)  # no exception
    assert {(vm.cpus, vm.memory) for vm in topo.vms.values()} == {(1, 160)}


@pytest.mark.parametrize(("mutate", "roles", "message"), [
    (lambda d: d["vms"]["vm6"].update(host="B"), {},
     "the pair vm5, vm6 is not co-resident (hosts A, B)"),
    (lambda d: None, {"pair3": ("vm5", "vm2")},
     "the pairs suite's pairs need 8 VMs, each in one pair; got vm1 -> vm2, vm3 -> vm4, "
     "vm5 -> vm2, vm7 -> vm8"),
    (lambda d: d["vms"]["vm8"].update(memory=256), {},
     "every VM it uses needs the same cpus and memory"),
    (lambda d: d["vms"]["vm4"].update(driver=False), {},
     "vm4 runs without the driver; the pairs suite needs it there"),
])  # fmt: skip
def test_roles_that_do_not_fit_are_refused(mutate: Any, roles: dict[str, tuple[str, str]],
                                           message: str) -> None:
    data = copy.deepcopy(many_data())
    mutate(data)
    topo, state = recorded(data)
    with pytest.raises(bench.BenchError, match=re.escape(message)):
        bench.check_roles(PAIRS, topo, state, {**ROLES, **roles})


def test_missing_pairs_are_named() -> None:
    topo, state = recorded(copy.deepcopy(many_data()))
    with pytest.raises(bench.BenchError, match="the pairs suite needs VMs for pair4"):
        bench.check_roles(PAIRS, topo, state, {k: v for k, v in ROLES.items() if k != "pair4"})
    del state.vms["vm8"]
    with pytest.raises(bench.BenchError, match=re.escape(
            "VM vm8 is not running; 'harness up --topology harness/topologies/many.toml'")):
        bench.check_roles(PAIRS, topo, state, ROLES)


# ---------------------------------------------------------------------------
# a step measured on fake guests


IPS = {f"vm{i}": f"10.77.0.{i}" for i in range(1, 9)}


class PairGuest(FakeGuest):
    """Every peer is co-resident: a frame goes on shm unless force-lower holds."""

    def _send(self, ip: str, nbytes: int) -> None:
        shm = not (self.force_lower and self.honour_force_lower)
        self.tx["shm_tx_bytes" if shm else "lower_tx_bytes"] += nbytes


def fakes() -> dict[str, PairGuest]:
    return {name: PairGuest(name) for name in IPS}


def measure(gs: dict[str, PairGuest], path: str, workload: str, rep: int = 0) -> dict[str, Any]:
    return bench.measure(gs, path, workload, roles=ROLES, ips=IPS, secs=1,  # type: ignore[arg-type]
                         rep=rep, suite=PAIRS)


def test_a_lower_step_forces_every_guest_of_it_and_sums_its_pairs() -> None:
    gs = fakes()
    s = measure(gs, "lower", "iperf3_tcp_1_x4")
    assert s["valid"], s["error"]
    assert s["metrics"] == {"throughput_mbps": 3200.0}
    assert [(f["client"], f["server"]) for f in s["flows"]] == list(ROLES.values())
    assert all(f["metrics"] == {"throughput_mbps": 800.0} for f in s["flows"])
    assert all(f["counters"] == {"shm_tx_bytes": 0, "lower_tx_bytes": 1_000_000}
               for f in s["flows"])
    assert s["counters"] == {"shm_tx_bytes": 0, "lower_tx_bytes": 4_000_000}
    for name, g in gs.items():
        assert g.commands[0].endswith("force-lower on"), name
        assert g.commands[-1].endswith("force-lower off"), name
        assert not g.force_lower
    for client, server in ROLES.values():
        assert [c for c in gs[client].commands if c.startswith("iperf3")] == [
            f"iperf3 -c {IPS[server]} -t 1 -P 1 -J"]
    assert s["cpu"] == {"client_busy_pct": 50.0, "server_busy_pct": 50.0}


def test_a_step_of_two_leaves_the_other_pairs_alone() -> None:
    gs = fakes()
    s = measure(gs, "shm", "netperf_tcp_rr_x2")
    assert s["valid"], s["error"]
    assert s["metrics"] == {"transactions_per_s": 2000.0}
    assert s["flows"][1]["metrics"]["lat_mean_us"] == 500.0  # each pair's own, all of them
    assert all(gs[n].commands == [] for n in ("vm5", "vm6", "vm7", "vm8"))


def test_one_pair_that_stayed_on_shm_spoils_the_lower_step() -> None:
    gs = fakes()
    gs["vm5"].honour_force_lower = False
    s = measure(gs, "lower", "iperf3_tcp_1_x4")
    assert not s["valid"]
    assert s["error"] == ("vm5: the sender's counters contradict path 'lower' "
                          "(shm_tx_bytes +1000000, lower_tx_bytes +0)")


def test_every_cell_of_every_rep_makes_a_valid_run() -> None:
    """What bench.run writes from these samples, the report accepts."""
    gs = fakes()
    samples = []
    for rep in range(5):
        for path, w in PAIRS.rep_cells(list(PAIRS.workloads), rep):
            full = measure(gs, path, w, rep)
            samples.append({k: full[k] for k in PAIRS.sample if k in full})
    assert all("client" not in s for s in samples)  # each flow names its own
    data = {**synthetic(), "samples": samples}
    b = validate_pairs(data)
    assert len(b.samples) == 5 * len(PAIRS.cells_of([]))


def test_pairs_run_at_once_and_every_one_ends_before_a_failure_is_raised() -> None:
    together = threading.Barrier(4, timeout=10)  # passed only if all four run at once
    ended: list[int] = []

    def job(i: int) -> int:
        together.wait()
        ended.append(i)
        if i == 1:
            raise ValueError("iperf3: unable to connect")
        return i

    with pytest.raises(ValueError, match="unable to connect"):
        bench.at_once([lambda i=i: job(i) for i in range(4)])
    assert sorted(ended) == [0, 1, 2, 3]
    together.reset()
    assert bench.at_once([lambda i=i: i * 10 for i in range(4)]) == [0, 10, 20, 30]
    assert bench.at_once([lambda: 7]) == [7]


def test_a_failed_pair_reruns_the_whole_step() -> None:
    gs = fakes()
    real = gs["vm3"].run
    calls = {"n": 0}

    def flaky(command: str, timeout: float | None = 0) -> str:
        if command.startswith("iperf3"):
            calls["n"] += 1
            if calls["n"] == 1:
                raise ValueError("iperf3: the server is busy running a test")
        return real(command, timeout)

    gs["vm3"].run = flaky  # type: ignore[method-assign]
    s = measure(gs, "shm", "iperf3_tcp_1_x2")
    assert s["valid"], s["error"]
    assert len([c for c in gs["vm1"].commands if c.startswith("iperf3")]) == 2  # both again
    assert s["metrics"] == {"throughput_mbps": 1600.0}


def test_an_aggregate_of_a_failed_step_is_empty_and_invalid() -> None:
    gs = fakes()

    def broken(command: str, timeout: float | None = 0) -> str:
        if command.startswith("netperf"):
            raise ValueError("no line of 6 numbers")
        return FakeGuest.run(gs["vm7"], command, timeout)

    gs["vm7"].run = broken  # type: ignore[method-assign]
    s = measure(gs, "shm", "netperf_tcp_rr_x4")
    assert not s["valid"] and s["metrics"] == {} and "no line of 6 numbers" in s["error"]
    with pytest.raises(BenchReportError):
        validate_pairs({**synthetic(), "samples": [
            {k: s[k] for k in PAIRS.sample if k in s}]})


class SysctlGuest(PairGuest):
    def run(self, command: str, timeout: float | None = 0) -> str:
        if command.startswith("sysctl "):
            self.commands.append(command)
            return ""
        return super().run(command, timeout)


def test_a_variant_run_by_many_pairs_sets_its_setting_on_every_guest_of_the_step() -> None:
    """The suite is data: a busy-poll step needs only its name, not runner code."""
    name = pairs_workload("netperf_tcp_rr_bp", 2)
    suite = dataclasses.replace(
        PAIRS, at_once={name: ("netperf_tcp_rr_bp", 2)},
        workloads={name: ("netperf TCP_RR, busy poll, 2 pairs", ("transactions_per_s",))})
    gs = {n: SysctlGuest(n) for n in IPS}
    s = bench.measure(gs, "shm", name, roles=ROLES, ips=IPS, secs=1,  # type: ignore[arg-type]
                      rep=0, suite=suite)
    assert s["valid"], s["error"]
    assert s["metrics"] == {"transactions_per_s": 2000.0}
    for n in ("vm1", "vm2", "vm3", "vm4"):
        sysctls = [c for c in gs[n].commands if c.startswith("sysctl")]
        assert sysctls == [f"sysctl -qw net.core.busy_read={v} net.core.busy_poll={v}"
                           for v in (bench.BUSY_POLL_US, 0)], n
    assert gs["vm5"].commands == []
