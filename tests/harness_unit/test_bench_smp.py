"""The smp benchmark suite (2-vCPU guests): its report, its checks and one sample's path.

No guest boots here: the report is rendered from synthetic JSON, the roles
are checked against recorded topologies, and a sample is taken from fake
guests whose counters follow the route each command would take.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from harness.errors import TopologyError
from harness.experiments import bench, bench_report, bench_suites
from harness.experiments.bench_report import BenchReportError, counters_problem, validate_smp
from harness.lab import topology
from harness.lab.state import State, VMState, VMStatus

from .test_bench_report import Mutate, assert_one_quick_rep, assert_rejects, put, report_only

# (path, workload) -> metric -> values for reps 0..4
THROUGHPUT = {
    ("shm", "iperf3_tcp_1"): [1000, 1100, 900, 1050, 950],  # median 1000
    ("shm", "iperf3_tcp_4"): [1600, 1500, 1700, 1450, 1550],  # 1550: 1.55x
    ("lower", "iperf3_tcp_1"): [800, 700, 900, 750, 850],  # 800
    ("lower", "iperf3_tcp_4"): [900, 1000, 800, 950, 850],  # 900: 1.125x
    ("wire", "iperf3_tcp_1"): [768, 800, 740, 790, 760],  # 768
    ("nodriver", "iperf3_tcp_1"): [800, 780, 820, 790, 810],  # 800: 0.96x
}
RR_MEAN = {"wire": [500, 520, 480, 510, 490], "nodriver": [480, 470, 490, 475, 485]}
MIX = {"shm_mbps": [700, 720, 680, 710, 690], "wire_mbps": [500, 520, 480, 510, 490]}


def _counters(path: str, flows: dict[str, int] | None = None) -> dict[str, int]:
    if path == "nodriver":
        return {"eth0_tx_bytes": 10_000}
    if path == "shm":
        return {"shm_tx_bytes": 10_000, "lower_tx_bytes": 100}
    if path == "mix":
        assert flows is not None
        return {"shm_tx_bytes": flows["shm"] + 500, "lower_tx_bytes": flows["wire"] + 500}
    return {"shm_tx_bytes": 0, "lower_tx_bytes": 10_000}


def _metrics(path: str, workload: str, rep: int) -> dict[str, float]:
    if workload == "iperf3_mix":
        return {k: float(v[rep % 5]) for k, v in MIX.items()}
    if workload == "netperf_tcp_rr":
        lat = RR_MEAN[path][rep % 5]
        return {"transactions_per_s": 1e6 / lat, "lat_min_us": lat / 2, "lat_mean_us": lat,
                "lat_p50_us": lat, "lat_p90_us": lat * 1.5, "lat_p99_us": lat * 3}
    return {"throughput_mbps": float(THROUGHPUT[(path, workload)][rep % 5])}


def synthetic(reps: int = 5) -> dict[str, Any]:
    samples = []
    for rep in range(reps):
        for path, workload in bench_suites.SMP_CELLS:
            flows = {"shm": 70_000, "wire": 50_000} if path == "mix" else None
            s: dict[str, Any] = {
                "path": path, "workload": workload, "rep": rep, "client": "vm1",
                "valid": True, "error": None, "metrics": _metrics(path, workload, rep),
                "counters": _counters(path, flows),
                "cpu": {"client_busy_pct": 80.0 + rep, "server_busy_pct": 40.0 + rep}}
            if flows:
                s["flow_bytes"] = flows
            samples.append(s)
    return {"schema": 1, "suite": "smp", "reps": reps, "quick": False, "seconds": 3,
            "duration_s": 250.4,
            "environment": {"accelerator": "tcg", "cpu_model": "Test CPU", "cores": 2,
                            "host_kernel": "6.1.0-test", "qemu_version": "QEMU 7.2",
                            "guest_kernel": "6.1.0-guest", "guest_vcpus": 2,
                            "guest_memory_mib": 256, "commit": "abc1234",
                            "driver_sha256": "0123456789ab", "ring_poll_us": 500,
                            "hosts": {"vm1": "A", "vm2": "A", "vm3": "B", "vm4": "A",
                                      "vm5": "B"}},
            "roles": {"pair": ["vm1", "vm2"], "cross": ["vm1", "vm3"],
                      "plain": ["vm4", "vm5"]},
            "samples": samples}


def _line(md: str, start: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(start))


# ---------------------------------------------------------------------------
# the report


def test_ratios_and_targets_from_medians() -> None:
    b = validate_smp(synthetic())
    h = bench_report.smp_headline(b)
    assert h["scaling_shm_x"] == pytest.approx(1.55) and h["scaling_shm_met"] is True
    assert h["scaling_lower_x"] == pytest.approx(900 / 800)
    assert "scaling_lower_met" not in h  # no target on the lower path
    assert h["cost_throughput_x"] == pytest.approx(0.96) and h["cost_throughput_met"] is True
    assert h["cost_tcp_rr_latency_x"] == pytest.approx(500 / 480)
    assert h["cost_tcp_rr_latency_met"] is True
    assert h["mix_shm_x"] == pytest.approx(0.7)
    assert h["mix_wire_x"] == pytest.approx(500 / 768)
    # repetition by repetition: 1600/1000, 1500/1100, 1700/900, 1450/1050, 1550/950
    c = bench_suites.SMP_COMPARISONS[0]
    spread = bench_report.paired(b, c.num, c.den)
    assert spread is not None
    assert spread.lo == pytest.approx(1500 / 1100)
    assert spread.hi == pytest.approx(1700 / 900)


def test_markdown_rows_and_target_lines() -> None:
    md = bench_report.smp_markdown(validate_smp(synthetic()))
    assert md.startswith("## ivloop benchmark: 2-vCPU guests\n")
    assert "guests: kernel 6.1.0-guest, 2 vCPUs, 256 MiB each" in md and "commit abc1234" in md
    assert "**no driver** = vm4 (host A) -> vm5 (host B)" in md
    assert "250 s of measurement" in md
    assert "Guest ivloop.ko sha256 0123456789ab. Ring poller: a 500 µs window" in md
    assert _line(md, "| shm |") == (
        "| shm | 1000 [900-1100] | 1550 [1450-1700] | 1.55x | 1.36-1.89 |")
    assert _line(md, "| lower |").startswith("| lower | 800 [700-900] | 900 [800-1000] | 1.12x |")
    assert ("- Target shm 4 streams ≥ 1.5x one stream: **1.55x** (target ≥ 1.5x: met; "
            "1.36-1.89 repetition by repetition).") in md
    assert _line(md, "| iperf3 TCP, 1 stream: throughput").startswith(
        "| iperf3 TCP, 1 stream: throughput (Mbit/s) | 768 [740-800] | 800 [780-820] | 0.960x |")
    assert _line(md, "| netperf TCP_RR: mean round trip").startswith(
        "| netperf TCP_RR: mean round trip (µs) | 500 [480-520] | 480 [470-490] | 1.042x |")
    assert ("- Target within 5% of no driver, iperf3 throughput: ivl0 / no driver = "
            "**0.960x** (target ≥ 0.95x: met;") in md
    assert ("TCP_RR mean round trip: ivl0 / no driver = **1.042x** (target ≤ 1.05x: met;"
            in md)
    assert _line(md, "| vm1 -> vm2, shm |") == (
        "| vm1 -> vm2, shm | 1000 [900-1100] | 700 [680-720] | 0.70x | 0.65-0.76 |")
    assert _line(md, "| vm1 -> vm3, wire through ivl0 |").startswith(
        "| vm1 -> vm3, wire through ivl0 | 768 [740-800] | 500 [480-520] | 0.65x |")
    assert "| both flows, sum | - | 1200 [1160-1240] | - | - |" in md
    assert "| shm | iperf3 TCP, 4 streams | 82 / 42 |" in md  # guest CPU, medians


def _scale(data: dict[str, Any], path: str, workload: str, metric: str, f: float) -> None:
    for s in data["samples"]:
        if (s["path"], s["workload"]) == (path, workload):
            s["metrics"][metric] *= f


SHM_4 = ("shm", "iperf3_tcp_4", "throughput_mbps")
WIRE_1 = ("wire", "iperf3_tcp_1", "throughput_mbps")
WIRE_RR = ("wire", "netperf_tcp_rr", "lat_mean_us")


@pytest.mark.parametrize(("cell", "factor", "key", "met"), [
    # shm 4 streams: median 1550 -> exactly 1.5x one stream, then just under
    (SHM_4, 1500 / 1550, "scaling_shm", True),
    (SHM_4, 1499 / 1550, "scaling_shm", False),
    # ivl0 at 95 % of no driver is within 5 %, at 94.9 % not
    (WIRE_1, 760 / 768, "cost_throughput", True),
    (WIRE_1, 759.2 / 768, "cost_throughput", False),
    # a round trip 5 % longer than no driver's is within, 5.2 % not
    (WIRE_RR, 504 / 500, "cost_tcp_rr_latency", True),
    (WIRE_RR, 505 / 500, "cost_tcp_rr_latency", False),
])  # fmt: skip
def test_target_boundaries(cell: tuple[str, str, str], factor: float, key: str,
                           met: bool) -> None:
    data = synthetic()
    _scale(data, *cell, factor)
    b = validate_smp(data)
    assert bench_report.smp_headline(b)[f"{key}_met"] is met
    verdict = "met;" if met else "not met;"
    line = {"scaling_shm": "- Target shm 4 streams",
            "cost_throughput": "- Target within 5% of no driver, iperf3",
            "cost_tcp_rr_latency": "- Target within 5% of no driver, TCP_RR"}[key]
    assert verdict in _line(bench_report.smp_markdown(b), line).split(": ", 2)[-1]


def test_a_zero_median_is_not_measurable_rather_than_a_crash() -> None:
    data = synthetic()
    _scale(data, "nodriver", "iperf3_tcp_1", "throughput_mbps", 0)
    b = validate_smp(data)
    assert bench_report.smp_headline(b)["cost_throughput_x"] is None
    assert bench_report.smp_headline(b)["cost_throughput_met"] is None
    assert "**-** (not measurable: a zero median)" in bench_report.smp_markdown(b)


def test_write_dispatches_on_the_suite(tmp_path: Path) -> None:
    js = tmp_path / "bench.json"
    js.write_text(json.dumps(synthetic()))
    written = bench_report.write(js)
    assert written == [tmp_path / "bench.md"]
    assert "### Parallel streams (iperf3 TCP)" in written[0].read_text()
    js.write_text(json.dumps({**synthetic(), "suite": "numa"}))
    with pytest.raises(BenchReportError,
                       match="unknown suite 'numa' \\(suites: paths, smp, pairs\\)"):
        bench_report.write(js)


def test_classic_validation_refuses_an_smp_document() -> None:
    with pytest.raises(BenchReportError, match="suite 'smp' is not 'paths'"):
        bench_report.validate({**synthetic(), "workloads": ["iperf3_tcp_1"]})


def test_cli_report_only_renders_an_smp_run(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    status, out = report_only(tmp_path, synthetic())
    assert status == 0
    assert "| both flows, sum |" in (out / "bench.md").read_text()
    assert "## ivloop benchmark: 2-vCPU guests" in capsys.readouterr().out


def _sample(data: dict[str, Any], path: str, workload: str, rep: int = 0) -> dict[str, Any]:
    return next(s for s in data["samples"]
                if (s["path"], s["workload"], s["rep"]) == (path, workload, rep))


def _mutate(path: str, workload: str, key: str, value: Any) -> Mutate:
    return put(key, value, lambda data: _sample(data, path, workload))


def _drop(path: str, workload: str) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        data["samples"].remove(_sample(data, path, workload))
    return mutate


def _duplicate(data: dict[str, Any]) -> None:
    data["samples"].append(copy.deepcopy(_sample(data, "wire", "iperf3_tcp_1")))


def _top(key: str, value: Any) -> Mutate:
    return put(key, value)


@pytest.mark.parametrize(("mutate", "message"), [
    (_drop("mix", "iperf3_mix"), "mix/iperf3_mix: 4 valid sample(s), need 5"),
    (_mutate("nodriver", "iperf3_tcp_1", "valid", False),
     "nodriver/iperf3_tcp_1: 4 valid sample(s), need 5"),
    (_mutate("shm", "iperf3_tcp_4", "counters", {"shm_tx_bytes": 0, "lower_tx_bytes": 9000}),
     "samples[2] (shm/iperf3_tcp_4 rep 0): marked valid but the sender's counters "
     "contradict path 'shm' (shm_tx_bytes +0, lower_tx_bytes +9000)"),
    (_mutate("lower", "iperf3_tcp_1", "counters", {"shm_tx_bytes": 9000, "lower_tx_bytes": 0}),
     "contradict path 'lower'"),
    (_mutate("nodriver", "netperf_tcp_rr", "counters", {"eth0_tx_bytes": 0}),
     "marked valid but eth0_tx_bytes +0: no traffic left the client"),
    (_mutate("nodriver", "netperf_tcp_rr", "counters", {"shm_tx_bytes": 0}),
     "counter eth0_tx_bytes missing or not a non-negative integer"),
    # the co-resident flow went (mostly) through the lower NIC: no mixture
    (_mutate("mix", "iperf3_mix", "counters", {"shm_tx_bytes": 1000, "lower_tx_bytes": 120_000}),
     "the sender's counters do not carry both flows (shm_tx_bytes +1000 for 70000 bytes"),
    (_mutate("mix", "iperf3_mix", "flow_bytes", KeyError),
     "'flow_bytes' must give positive byte counts for shm and wire, got None"),
    (_mutate("mix", "iperf3_mix", "flow_bytes", {"shm": 70_000, "wire": 0}),
     "'flow_bytes' must give positive byte counts"),
    (_mutate("mix", "iperf3_mix", "metrics", {"shm_mbps": 700.0}),
     "samples[8] (mix/iperf3_mix rep 0): missing metric 'wire_mbps'"),
    (_mutate("wire", "netperf_tcp_rr", "metrics", {**_metrics("wire", "netperf_tcp_rr", 0),
                                                   "lat_mean_us": float("nan")}),
     "metric 'lat_mean_us' is not finite (nan)"),
    (_mutate("wire", "iperf3_tcp_1", "workload", "iperf3_tcp_4"),
     "(wire/iperf3_tcp_4 rep 0): not a cell of the smp suite (cells: shm/iperf3_tcp_1,"),
    (_mutate("shm", "iperf3_tcp_1", "rep", 5), "rep must be in 0..4"),
    (_duplicate, "a second valid sample for this cell and rep"),
    (_mutate("shm", "iperf3_tcp_1", "cpu", {"client_busy_pct": 150, "server_busy_pct": 1}),
     "cpu 'client_busy_pct' must be a percentage (0-100), got 150"),
    (_top("roles", {"pair": ["vm1", "vm2"], "cross": ["vm1"], "plain": ["vm4", "vm5"]}),
     "roles 'cross' must be a list of two VM names, got ['vm1']"),
    (_top("roles", KeyError), "benchmark: missing key 'roles'"),
    (_top("suite", "paths"), "benchmark: suite 'paths' is not 'smp'"),
    (_top("schema", 2), "benchmark: schema 2 is not 1"),
    (_top("reps", 2), "too few repetitions: reps is 2, a full run needs >= 5"),
    (_top("duration_s", -1), "'duration_s' must be a non-negative number, got -1"),
])  # fmt: skip
def test_rejects(mutate: Mutate, message: str) -> None:
    assert_rejects(synthetic(), mutate, message, bench_suites.SMP)


def test_quick_run_with_one_rep_is_accepted() -> None:
    b = assert_one_quick_rep(synthetic(reps=1), bench_suites.SMP)
    assert b.reps == 1 and len(b.samples) == len(bench_suites.SMP_CELLS)


def test_counter_checks() -> None:
    assert counters_problem("wire", {"shm_tx_bytes": 0, "lower_tx_bytes": 5}) is None
    assert counters_problem("nodriver", {"eth0_tx_bytes": 5}) is None
    assert "eth0_tx_bytes missing" in str(counters_problem("nodriver", {"eth0_tx_bytes": True}))
    flows = {"shm": 1000, "wire": 1000}
    assert counters_problem("mix", {"shm_tx_bytes": 900, "lower_tx_bytes": 900}, flows) is None
    assert counters_problem("mix", {"shm_tx_bytes": 899, "lower_tx_bytes": 2000}, flows)
    assert counters_problem("mix", {"shm_tx_bytes": 2000, "lower_tx_bytes": 899}, flows)


# ---------------------------------------------------------------------------
# the roles against the recorded topology


def recorded(data: dict[str, Any], driver: bool = True) -> tuple[topology.Topology, State]:
    topo = topology.parse(data, "test")
    state = State(instance="t", topology=data, topology_source="test", accel="tcg",
                  driver=driver)
    for vm in topo.vms.values():
        state.vms[vm.name] = VMState(name=vm.name, host=vm.host, status=VMStatus.RUNNING)
    return topo, state


def smp_data() -> dict[str, Any]:
    return topology.load(bench.SMP_TOPOLOGY).raw


ROLES = {"pair": ("vm1", "vm2"), "cross": ("vm1", "vm3"), "plain": ("vm4", "vm5")}


def test_the_shipped_topology_fits_the_suite() -> None:
    topo, state = recorded(copy.deepcopy(smp_data()))
    bench.check_roles(bench_suites.SMP, topo, state, ROLES)  # no exception
    assert {vm.cpus for vm in topo.vms.values()} == {2}
    assert bench.SMP_TOPOLOGY.name.startswith("bench-")


def _vm(name: str, **kv: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        data["vms"][name].update(kv)
    return mutate


def _all_cpus(n: int) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        for vm in data["vms"].values():
            vm["cpus"] = n
    return mutate


@pytest.mark.parametrize(("mutate", "roles", "message"), [
    (_all_cpus(1), {}, "the smp suite needs guests with cpus >= 2, the topology gives 1"),
    (_vm("vm5", memory=512), {}, "every VM it uses needs the same cpus and memory, got "
                                 "vm1 2 vCPU/256 MiB"),
    (_vm("vm5", host="A"), {}, "must be placed like the cross pair (A -> B)"),
    (_vm("vm2", host="B"), {}, "the pair vm1, vm2 is not co-resident (hosts A, B)"),
    (_vm("vm4", driver=True), {}, "vm4 loads the driver; the no-driver pair needs "
                                  "'driver = false'"),
    (_vm("vm3", driver=False), {}, "vm3 runs without the driver"),
    (lambda d: None, {"plain": ("vm4", "vm3")}, "the no-driver pair vm4, vm3 must be two VMs"),
    (lambda d: None, {"cross": ("vm2", "vm3")}, "the cross pair must start at the pair's "
                                                "client vm1"),
    (lambda d: None, {"cross": ("vm1", "vm2")}, "shares host A; it must span two hosts"),
])  # fmt: skip
def test_roles_that_do_not_fit_are_refused(mutate: Any, roles: dict[str, tuple[str, str]],
                                           message: str) -> None:
    data = copy.deepcopy(smp_data())
    mutate(data)
    topo, state = recorded(data)
    with pytest.raises(bench.BenchError, match=re.escape(message)):
        bench.check_roles(bench_suites.SMP, topo, state, {**ROLES, **roles})


def test_the_default_topology_has_no_no_driver_pair() -> None:
    data = copy.deepcopy(topology.load().raw)
    topo, state = recorded(data)
    with pytest.raises(TopologyError, match="unknown VM 'vm4'"):
        bench.check_roles(bench_suites.SMP, topo, state, ROLES)
    topo, state = recorded(copy.deepcopy(smp_data()), driver=False)
    with pytest.raises(bench.BenchError, match="started with --no-driver"):
        bench.check_roles(bench_suites.SMP, topo, state, ROLES)
    topo, state = recorded(copy.deepcopy(smp_data()))
    del state.vms["vm5"]  # in the topology, but not started
    with pytest.raises(bench.BenchError, match=re.escape(
            "VM vm5 is not running; 'harness up --topology harness/topologies/bench-smp.toml'")):
        bench.check_roles(bench_suites.SMP, topo, state, ROLES)


def test_unknown_suite_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(bench.BenchError, match="unknown benchmark suite 'numa'"):
        bench.run(None, out_dir=tmp_path, suite="numa")  # type: ignore[arg-type]
    assert not (tmp_path / "bench.json").exists()


# ---------------------------------------------------------------------------
# one sample, from fake guests


def iperf3_json(mbps: float, nbytes: int) -> str:
    return json.dumps({"start": {}, "end": {"sum_received": {
        "bits_per_second": mbps * 1e6, "bytes": nbytes}}})


def test_parse_mix() -> None:
    text = iperf3_json(900, 3000) + f"\n{bench.MIX_SEP}\n" + iperf3_json(400, 2000)
    assert bench.parse_mix(text) == ({"shm_mbps": 900.0, "wire_mbps": 400.0},
                                     {"shm": 3000, "wire": 2000})
    with pytest.raises(ValueError, match="no '--- ivl-mix ---' between"):
        bench.parse_mix(iperf3_json(900, 3000))
    failed = json.dumps({"error": "unable to connect to server: Connection refused"})
    with pytest.raises(ValueError, match="wire flow: iperf3: unable to connect"):
        bench.parse_mix(iperf3_json(900, 3000) + bench.MIX_SEP + failed)


IPS = {"vm2": "10.77.0.2", "vm3": "10.77.0.3", "vm5": "10.77.0.5"}
SHM_PEERS = {"10.77.0.2"}  # co-resident with vm1


class FakeGuest:
    """A guest whose driver counters move where each command's traffic would go."""

    def __init__(self, vm: str, driver: bool = True) -> None:
        self.vm = vm
        self.driver = driver
        self.force_lower = False
        self.honour_force_lower = True
        self.tx = {"shm_tx_bytes": 0, "lower_tx_bytes": 0, "eth0_tx_bytes": 0}
        self.jiffies = 0
        self.commands: list[str] = []

    def _send(self, ip: str, nbytes: int) -> None:
        shm = ip in SHM_PEERS and not (self.force_lower and self.honour_force_lower)
        self.tx["shm_tx_bytes" if shm else "lower_tx_bytes"] += nbytes
        self.tx["eth0_tx_bytes"] += 0 if shm else nbytes

    def run(self, command: str, timeout: float | None = 0) -> str:
        self.commands.append(command)
        if command == "ethtool -S ivl0":
            assert self.driver, "no ivl0 in a guest without the driver"
            return "".join(f"     {k}: {v}\n" for k, v in self.tx.items()
                           if k != "eth0_tx_bytes")
        if command == "cat /sys/class/net/eth0/statistics/tx_bytes":
            return f"{self.tx['eth0_tx_bytes']}\n"
        if command == "head -n 1 /proc/stat":
            self.jiffies += 100
            return f"cpu  {self.jiffies} 0 0 {self.jiffies} 0 0 0 0 0 0\n"
        if command.startswith("ethtool --set-priv-flags ivl0 force-lower"):
            self.force_lower = command.endswith(" on")
            return ""
        if "ivl-mix" in command:
            shm_ip, wire_ip = re.findall(r"iperf3 -c (\S+)", command)
            self._send(shm_ip, 3_000_000)
            self._send(wire_ip, 2_000_000)
            return iperf3_json(900, 3_000_000) + f"\n{bench.MIX_SEP}\n" + iperf3_json(
                400, 2_000_000)
        if command.startswith("iperf3 -c "):
            self._send(command.split()[2], 1_000_000)
            return iperf3_json(800, 1_000_000)
        if command.startswith("netperf "):
            self._send(command.split()[4], 10_000)
            return "1000,300,500,480,700,900\n"
        raise AssertionError(f"unexpected command {command!r}")


class FakeGuests(dict[str, FakeGuest]):
    pass


def fakes() -> FakeGuests:
    gs = FakeGuests()
    for name in ("vm1", "vm2", "vm3"):
        gs[name] = FakeGuest(name)
    for name in ("vm4", "vm5"):
        gs[name] = FakeGuest(name, driver=False)
    return gs


def measure(gs: FakeGuests, path: str, workload: str) -> dict[str, Any]:
    return bench.measure(gs, path, workload, roles=ROLES, ips=IPS, secs=1,  # type: ignore[arg-type]
                         rep=0)


def test_lower_sample_sets_force_lower_on_both_and_clears_it() -> None:
    gs = fakes()
    s = measure(gs, "lower", "iperf3_tcp_4")
    assert s["valid"], s["error"]
    assert s["counters"] == {"shm_tx_bytes": 0, "lower_tx_bytes": 1_000_000}
    assert s["metrics"] == {"throughput_mbps": 800.0}
    assert any("-P 4" in c for c in gs["vm1"].commands)
    for name in ("vm1", "vm2"):
        assert gs[name].commands[0].endswith("force-lower on")
        assert gs[name].commands[-1].endswith("force-lower off")
        assert not gs[name].force_lower
    assert s["cpu"] == {"client_busy_pct": 50.0, "server_busy_pct": 50.0}


def test_a_lower_sample_that_stayed_on_shm_is_invalid() -> None:
    gs = fakes()
    gs["vm1"].honour_force_lower = False
    s = measure(gs, "lower", "iperf3_tcp_1")
    assert not s["valid"]
    assert s["error"] == ("the sender's counters contradict path 'lower' "
                          "(shm_tx_bytes +1000000, lower_tx_bytes +0)")


def test_nodriver_sample_counts_eth0_of_its_own_client() -> None:
    gs = fakes()
    s = measure(gs, "nodriver", "netperf_tcp_rr")
    assert s["valid"], s["error"]
    assert (s["client"], s["server"]) == ("vm4", "vm5")
    assert s["counters"] == {"eth0_tx_bytes": 10_000}
    assert s["metrics"]["lat_mean_us"] == 500.0
    assert gs["vm1"].commands == []  # the driver's guests are not involved
    assert "ethtool -S ivl0" not in gs["vm4"].commands


def test_mix_sample_carries_both_flows_and_their_bytes() -> None:
    gs = fakes()
    s = measure(gs, "mix", "iperf3_mix")
    assert s["valid"], s["error"]
    assert s["metrics"] == {"shm_mbps": 900.0, "wire_mbps": 400.0}
    assert s["flow_bytes"] == {"shm": 3_000_000, "wire": 2_000_000}
    assert s["counters"] == {"shm_tx_bytes": 3_000_000, "lower_tx_bytes": 2_000_000}
    mix = next(c for c in gs["vm1"].commands if "ivl-mix" in c)
    assert "iperf3 -c 10.77.0.2 " in mix and "iperf3 -c 10.77.0.3 " in mix and "& wait;" in mix
    # and a mixture whose co-resident flow went to the lower NIC is refused
    gs = fakes()
    gs["vm1"].force_lower = True  # e.g. left on by someone else
    s = measure(gs, "mix", "iperf3_mix")
    assert not s["valid"] and "do not carry both flows" in s["error"]


def test_every_cell_measures() -> None:
    gs = fakes()
    for path, workload in bench_suites.SMP_CELLS:
        s = measure(gs, path, workload)
        assert s["valid"], (path, workload, s["error"])
        assert set(s["metrics"]) >= set(bench_suites.SMP_WORKLOADS[workload][1])


class _StatusGuest:
    vm = "vm1"

    def __init__(self, code: int, out: str) -> None:
        self.code, self.out = code, out

    def status(self, command: str, timeout: float = 0) -> tuple[int, str]:
        assert command == "sha256sum /lib/modules/ivl/ivloop.ko"
        return self.code, self.out


def test_module_hash_names_the_driver_or_nothing() -> None:
    digest = "ab" * 32
    g: Any = _StatusGuest(0, f"{digest}  /lib/modules/ivl/ivloop.ko\n")
    assert bench._module_hash(g) == "ab" * 6
    g = _StatusGuest(1, "sha256sum: /lib/modules/ivl/ivloop.ko: No such file or directory\n")
    assert bench._module_hash(g) is None  # an error message is not a driver's name
    assert bench._module_hash(_StatusGuest(0, "")) is None  # type: ignore[arg-type]
