"""The benchmark report: right numbers from good samples, a clear refusal otherwise.

Also runs the native ring benchmark (tests/ring bench-native) with a tiny
budget and checks the shape of its JSON.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import cli
from harness.experiments import bench, bench_report, bench_suites
from harness.experiments.bench_report import Bench, BenchReportError, validate
from harness.experiments.bench_suites import Suite
from harness.lab import paths

REPO = Path(__file__).resolve().parents[2]

# Per path: (iperf3 TCP Mbit/s, TCP_RR mean latency µs) for reps 0..4.
TPUT = {"shm": [900, 1000, 1100, 950, 1050], "lower": [300, 250, 200, 350, 310],
        "wire": [200, 180, 220, 210, 190]}
LAT = {"shm": [100, 120, 90, 110, 105], "lower": [400, 390, 410, 380, 420],
       "wire": [500, 510, 490, 505, 495]}


def _sample(path: str, workload: str, rep: int, metrics: dict[str, Any]) -> dict[str, Any]:
    shm, lower = (10_000, 100) if path == "shm" else (0, 10_000)
    return {"path": path, "workload": workload, "rep": rep, "client": "vm1", "valid": True,
            "error": None, "metrics": metrics,
            "counters": {"shm_tx_bytes": shm, "lower_tx_bytes": lower}}


def synthetic(reps: int = 5) -> dict[str, Any]:
    samples = []
    for rep in range(reps):
        for path in ("shm", "lower", "wire"):
            samples.append(_sample(path, "iperf3_tcp_1", rep,
                                   {"throughput_mbps": TPUT[path][rep % 5]}))
            lat = LAT[path][rep % 5]
            samples.append(_sample(path, "netperf_tcp_rr", rep, {
                "transactions_per_s": 1e6 / lat, "lat_min_us": lat / 2, "lat_mean_us": lat,
                "lat_p50_us": lat, "lat_p90_us": lat * 1.5, "lat_p99_us": lat * 3}))
    return {"schema": 1, "reps": reps, "quick": False, "seconds": 3,
            "environment": {"accelerator": "tcg", "cpu_model": "Test CPU", "cores": 2,
                            "host_kernel": "6.1.0-test", "qemu_version": "QEMU 7.2",
                            "guest_kernel": "6.1.0-guest", "guest_vcpus": 1},
            "workloads": ["iperf3_tcp_1", "netperf_tcp_rr"], "samples": samples,
            "native": None}


# ---------------------------------------------------------------------------
# refusals, shared with test_bench_smp: every suite's validator is bench_report.check

Doc = dict[str, Any]
Mutate = Callable[[Doc], None]


def rejected(data: object, suite: Suite = bench_suites.CLASSIC) -> str:
    """The message with which *data* is refused as a run of *suite*."""
    with pytest.raises(BenchReportError) as info:
        bench_report.check(data, suite)
    return str(info.value)


def put(key: str, value: Any, at: Callable[[Doc], Doc] = lambda data: data) -> Mutate:
    """A mutation: *key* of the object *at* picks set to *value* (KeyError: deleted)."""
    def mutate(data: Doc) -> None:
        obj = at(data)
        if value is KeyError:
            del obj[key]
        else:
            obj[key] = value
    return mutate


def assert_rejects(data: Doc, mutate: Mutate, message: str,
                   suite: Suite = bench_suites.CLASSIC) -> None:
    mutate(data)
    assert message in rejected(data, suite)


def assert_one_quick_rep(data: Doc, suite: Suite = bench_suites.CLASSIC) -> Bench:
    """*data* (one repetition) passes as a --quick run, not as a full one; as it passed."""
    data["quick"] = True
    b = bench_report.check(data, suite)
    assert b.reps == 1
    data["quick"] = False
    assert "too few repetitions" in rejected(data, suite)
    return b


# ---------------------------------------------------------------------------
# the classic suite's report


def test_valid_synthetic_renders_medians_and_ratios() -> None:
    b = validate(synthetic())
    s = bench_report.summarise(b)
    tput = s[("iperf3_tcp_1", "throughput_mbps")]
    assert (tput["shm"].median, tput["shm"].lo, tput["shm"].hi) == (1000, 900, 1100)
    assert tput["lower"].median == 300
    assert tput["wire"].median == 200
    lat = s[("netperf_tcp_rr", "lat_mean_us")]
    assert (lat["shm"].median, lat["lower"].median) == (105, 400)
    h = bench_report.headline(b)
    assert h["tcp_throughput_x"] == pytest.approx(1000 / 300)
    assert h["tcp_rr_latency_x"] == pytest.approx(400 / 105)  # latency: lower/shm
    md = bench_report.markdown(b)
    row = next(line for line in md.splitlines() if line.startswith("| iperf3 TCP, 1 stream"))
    assert "| 1000 [900-1100] | 300 [200-350] | 200 [180-220] | 3.33x | 5.00x |" in row
    row = next(line for line in md.splitlines()
               if line.startswith("| netperf TCP_RR | mean latency"))
    assert "| 105 [90-120] | 400 [380-420] |" in row and "| 3.81x | 4.76x |" in row
    assert "Test CPU, 2 cores" in md and "accelerator tcg" in md
    assert "3.33x** (met)" in md


def with_rr_variant(suffix: str, shm_latency_factor: float) -> dict[str, Any]:
    """synthetic() plus netperf_tcp_rr<suffix>: its samples, shm's latency scaled."""
    data = synthetic()
    for s in list(data["samples"]):
        if s["workload"] == "netperf_tcp_rr":
            v = {**s, "workload": f"netperf_tcp_rr{suffix}", "metrics": dict(s["metrics"])}
            if s["path"] == "shm":
                v["metrics"]["lat_mean_us"] *= shm_latency_factor
            data["samples"].append(v)
    data["workloads"].append(f"netperf_tcp_rr{suffix}")
    return data


@pytest.mark.parametrize(
    ("suffix", "factor", "env", "key", "line"),
    [
        ("_bp", 0.1, {"busy_poll_us": 200}, "busy_poll",
         "busy polling (200 µs) on both guests: lower/shm = **38.10x** (met)"),
        ("_irq", 2, {"ring_poll_us": 500}, "no_ring_poll",
         "ring polling off (rx-usecs 0, doorbells only): lower/shm = **1.90x** (not met)"),
    ],
)
def test_variant_workloads_get_their_own_target_lines(
    suffix: str, factor: float, env: dict[str, int], key: str, line: str
) -> None:
    data = with_rr_variant(suffix, factor)
    data["environment"].update(env)
    b = validate(data)
    h = bench_report.headline(b)
    assert h[f"tcp_rr_latency_{key}_x"] == pytest.approx(400 / (105 * factor))
    assert f"tcp_throughput_{key}_x" not in h  # that variant's iperf3 did not run
    md = bench_report.markdown(b)
    row = bench_suites.WORKLOADS[f"netperf_tcp_rr{suffix}"][0]
    assert row.startswith("netperf TCP_RR, ")
    assert f"| {row} | mean latency" in md
    assert line in md
    assert "default settings: lower/shm = **3.81x** (met)" in md


def test_report_names_the_ring_poll_setting_of_the_run() -> None:
    data = synthetic()
    assert "ring poller" not in bench_report.markdown(validate(data))  # older runs
    data["environment"]["ring_poll_us"] = 500
    md = bench_report.markdown(validate(data))
    assert ("The driver's ring poller runs with a 500 µs window (ethtool rx-usecs; the "
            "module's poll_us before) except in rows marked 'ring polling off'") in md


def test_guest_cpu_table() -> None:
    data = synthetic()
    for s in data["samples"]:
        busy = {"shm": 90.0, "lower": 70.0, "wire": 60.0}[s["path"]] + s["rep"]
        s["cpu"] = {"client_busy_pct": busy, "server_busy_pct": busy - 10}
    b = validate(data)
    assert bench_report.cpu_busy(b)[("iperf3_tcp_1", "shm")] == (92.0, 82.0)
    md = bench_report.markdown(b)
    assert "| iperf3 TCP, 1 stream | 92 / 82 | 72 / 62 | 62 / 52 |" in md


def test_report_without_cpu_data_has_no_cpu_section() -> None:
    md = bench_report.markdown(validate(synthetic()))
    assert "### Guest CPU" not in md


class _FakeGuest:
    vm = "vm1"

    def __init__(self, out: str) -> None:
        self.out = out

    def run(self, command: str, timeout: float = 0) -> str:
        return self.out


def test_guest_cpu_parsing() -> None:
    g: Any = _FakeGuest("cpu  100 0 50 800 50 0 0 0 0 0\n")
    assert bench.cpu_jiffies(g) == (1000, 850)
    assert bench.busy_percent((1000, 850), (2000, 1100)) == pytest.approx(75.0)
    assert bench.busy_percent((1000, 850), (1000, 850)) == 0.0
    with pytest.raises(bench.BenchError, match="does not start with a cpu line"):
        bench.cpu_jiffies(_FakeGuest("intr 12 13\n"))  # type: ignore[arg-type]


def test_write_produces_markdown_and_pngs(tmp_path: Path) -> None:
    data = synthetic()
    data["native"] = native_fixture()
    js = tmp_path / "bench.json"
    js.write_text(json.dumps(data))
    written = bench_report.write(js)
    assert [p.name for p in written] == ["bench.md", "throughput.png", "latency.png"]
    for p in written[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = written[0].read_text()
    assert "### Native ring" in md and "| 65536 B | 8.00 |" in md
    assert "67% of single-core memcpy out of cache" in md


def native_fixture() -> dict[str, Any]:
    sizes = [64, 256, 1024, 4096, 16384, 65536]
    lat = {"n": 10, "mean": 50.0, "min": 10.0, "p50": 45.0, "p90": 60.0, "p99": 90.0}
    return {"tool": "ring_bench", "ring_size": 1 << 20, "reps": 5, "cpus": 2, "pinned": True,
            "cpu_model": "Test CPU",
            "throughput": [{"record_bytes": s, "gbps": s / 8192, "records_per_s": 1e5,
                            "gbps_samples": [s / 8192]} for s in sizes],
            "memcpy": [{"bytes": s, "in_cache_gbps": 50.0, "out_of_cache_gbps": 12.0}
                       for s in sizes],
            "reference": {"record_bytes": 65536, "ring_gbps": 8.0, "memcpy_in_cache_gbps": 50.0,
                          "memcpy_out_of_cache_gbps": 12.0, "ratio_in_cache": 0.16,
                          "ratio_out_of_cache": 8 / 12},
            "latency_us": {"message_bytes": 64, "ring": lat, "eventfd": lat,
                           "tcp_loopback": lat}}


def with_ring_footprint(n: dict[str, Any], gbps: float) -> dict[str, Any]:
    """native_fixture() as ring_bench prints it now: memcpy through the ring's footprint."""
    for m in n["memcpy"]:
        m["ring_footprint_gbps"] = gbps
    n["reference"].update(memcpy_ring_footprint_gbps=gbps,
                          ratio_ring_footprint=n["reference"]["ring_gbps"] / gbps)
    return n


FOOTPRINT_HEADER = ("| record | ring GB/s | records/s | memcpy GB/s in cache | memcpy GB/s, "
                    "ring's footprint (1024 KiB) | memcpy GB/s out of cache |")


def test_native_reference_is_memcpy_through_the_ring_footprint() -> None:
    md = "\n".join(bench_report.native_markdown(with_ring_footprint(native_fixture(), 20.0)))
    assert FOOTPRINT_HEADER in md
    assert "| 65536 B | 8.00 | 100000 | 50.0 | 20.0 | 12.0 |" in md
    assert ("At 64 KiB records the ring moves 8.00 GB/s = **40%** of single-core memcpy "
            "streaming through the ring's footprint (1024 KiB: 20.0 GB/s); target ≥ 50% "
            "(not met). For scale, memcpy of one record in cache: 50.0 GB/s; out of cache: "
            "12.0 GB/s.") in md
    assert "% of single-core memcpy out of cache" not in md  # not the flattering one
    md = "\n".join(bench_report.native_markdown(with_ring_footprint(native_fixture(), 12.5)))
    assert "= **64%** of single-core memcpy streaming" in md and "≥ 50% (met)" in md


def test_native_report_of_json_without_ring_footprint() -> None:
    md = "\n".join(bench_report.native_markdown(native_fixture()))  # older ring_bench
    assert "malformed" not in md and FOOTPRINT_HEADER in md
    assert "| 65536 B | 8.00 | 100000 | 50.0 | n/a | 12.0 |" in md
    assert ("At 64 KiB records the ring moves 8.00 GB/s = 67% of single-core memcpy out of "
            "cache (12.0 GB/s) and 16% of memcpy in cache (50.0 GB/s); target ≥ 50%.") in md


def test_report_only_does_not_write_from_bad_json(tmp_path: Path) -> None:
    js = tmp_path / "bench.json"
    js.write_text("{not json")
    with pytest.raises(BenchReportError, match="not readable JSON"):
        bench_report.write(js)
    with pytest.raises(BenchReportError, match="no such file"):
        bench_report.write(tmp_path / "missing.json")
    assert not (tmp_path / "bench.md").exists()


def _drop_sample(data: dict[str, Any]) -> None:
    del data["samples"][3]  # lower/netperf_tcp_rr rep 0


def _set_metric(value: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        data["samples"][0]["metrics"]["throughput_mbps"] = value
    return mutate


def _del_key(key: str) -> Mutate:
    return put(key, KeyError)


def _sample_key(key: str, value: Any) -> Mutate:
    return put(key, value, lambda data: data["samples"][0])


def _invalid_path(data: dict[str, Any]) -> None:
    # shm sample whose counters say the lower NIC carried the traffic
    data["samples"][0]["counters"] = {"shm_tx_bytes": 0, "lower_tx_bytes": 5000}


def _marked_invalid(data: dict[str, Any]) -> None:
    data["samples"][0]["valid"] = False
    data["samples"][0]["error"] = "counters contradict path shm"


def _few_reps(data: dict[str, Any]) -> None:
    data["reps"] = 3


def _no_metric(data: dict[str, Any]) -> None:
    del data["samples"][1]["metrics"]["lat_p99_us"]


@pytest.mark.parametrize(("mutate", "message"), [
    (_drop_sample, "lower/netperf_tcp_rr: 4 valid sample(s), need 5"),
    (_del_key("samples"), "benchmark: missing key 'samples'"),
    (_del_key("environment"), "benchmark: missing key 'environment'"),
    (_sample_key("rep", KeyError), "samples[0]: missing key 'rep'"),
    (_sample_key("rep", "0"), "samples[0]: 'rep' must be int, got str"),
    (_sample_key("valid", 1), "samples[0]: 'valid' must be bool, got int"),
    (_sample_key("path", "fast"), "samples[0] (fast/iperf3_tcp_1 rep 0): unknown path 'fast'"),
    (_set_metric("fast"), "metric 'throughput_mbps' must be a number, got str"),
    (_set_metric(True), "metric 'throughput_mbps' must be a number, got bool"),
    (_set_metric(math.nan), "samples[0] (shm/iperf3_tcp_1 rep 0): metric 'throughput_mbps' "
                            "is not finite (nan)"),
    (_set_metric(math.inf), "is not finite (inf)"),
    (_set_metric(-1.0), "metric 'throughput_mbps' is negative (-1.0)"),
    (_no_metric, "samples[1] (shm/netperf_tcp_rr rep 0): missing metric 'lat_p99_us'"),
    (_few_reps, "too few repetitions: reps is 3, a full run needs >= 5"),
    (_invalid_path, "marked valid but the sender's counters contradict path 'shm' "
                    "(shm_tx_bytes +0, lower_tx_bytes +5000)"),
    (_marked_invalid, "shm/iperf3_tcp_1: 4 valid sample(s), need 5"),
    (_sample_key("cpu", [50, 50]), "samples[0] (shm/iperf3_tcp_1 rep 0): 'cpu' must be an "
                                   "object, got list"),
    (_sample_key("cpu", {"client_busy_pct": 101, "server_busy_pct": 5}),
     "cpu 'client_busy_pct' must be a percentage (0-100), got 101"),
    (_sample_key("cpu", {"client_busy_pct": 50}),
     "cpu 'server_busy_pct' must be a percentage (0-100), got None"),
])  # fmt: skip
def test_rejects(mutate: Mutate, message: str) -> None:
    assert_rejects(synthetic(), mutate, message)


def test_rejects_wrong_top_level_types() -> None:
    assert "benchmark: expected an object, got list" in rejected([])
    data = synthetic()
    data["samples"] = {"0": {}}
    assert "'samples' must be list, got dict" in rejected(data)
    data = synthetic()
    data["workloads"].append("ping")
    assert "workloads[2] is not a known workload: 'ping'" in rejected(data)


def test_nan_from_json_text_is_rejected(tmp_path: Path) -> None:
    """Python's json writes and reads NaN; the loader must still refuse it."""
    data = synthetic()
    data["samples"][5]["metrics"]["lat_mean_us"] = float("nan")
    js = tmp_path / "bench.json"
    js.write_text(json.dumps(data))
    with pytest.raises(BenchReportError, match=r"lat_mean_us' is not finite"):
        bench_report.load(js)


def test_quick_run_with_one_rep_is_accepted() -> None:
    assert_one_quick_rep(synthetic(reps=1))


def test_path_check() -> None:
    assert bench_report.path_matches("shm", 1_000_000, 2_000)
    assert not bench_report.path_matches("shm", 1_000, 1_000_000)
    assert bench_report.path_matches("lower", 0, 1_000_000)
    assert not bench_report.path_matches("lower", 500_000, 500_000)
    assert not bench_report.path_matches("wire", 0, 0)  # no traffic proves nothing


def test_tool_parsers() -> None:
    netperf_out = ("Throughput,Minimum Latency Microseconds,Mean Latency Microseconds\n"
                   "1234.56,400,800.25\n")
    got = bench.parse_netperf(netperf_out, ["transactions_per_s", "lat_min_us", "lat_mean_us"])
    assert got == {"transactions_per_s": 1234.56, "lat_min_us": 400.0, "lat_mean_us": 800.25}
    with pytest.raises(ValueError, match="no line of 2 numbers"):
        bench.parse_netperf("netperf: send_omni: connection refused\n", ["a", "b"])
    sockperf_out = """sockperf: == version #3.10-0 ==
sockperf: ====> avg-latency=512.345 (std-dev=40.123, mean-ad=20.1, median-ad=15.2)
sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Latency is 512.345 usec
sockperf: Total 1800 observations; each percentile contains 18.00 observations
sockperf: ---> <MAX> observation =  900.111
sockperf: ---> percentile 99.999 =  900.111
sockperf: ---> percentile 99.000 =  800.500
sockperf: ---> percentile 90.000 =  600.250
sockperf: ---> percentile 50.000 =  500.125
sockperf: ---> <MIN> observation =  300.000
"""
    assert bench.parse_sockperf(sockperf_out) == {
        "lat_mean_us": 512.345, "lat_p50_us": 500.125, "lat_p90_us": 600.25,
        "lat_p99_us": 800.5, "lat_min_us": 300.0}


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("gcc") is None,
                    reason="needs make and gcc")
def test_native_ring_bench_json_shape(tmp_path: Path) -> None:
    env = dict(os.environ, IVL_BENCH_SECONDS="0.02", IVL_BENCH_REPS="1", IVL_BENCH_RTTS="200")
    res = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(REPO / "tests" / "ring"),
         "bench-native", f"BUILD={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)  # one JSON object, nothing else on stdout
    assert data["tool"] == "ring_bench" and data["reps"] == 1
    assert isinstance(data["pinned"], bool) and data["cpus"] >= 1
    sizes = [64, 256, 1024, 4096, 16384, 65536]
    assert [r["record_bytes"] for r in data["throughput"]] == sizes
    assert [r["bytes"] for r in data["memcpy"]] == sizes
    for r in data["throughput"]:
        assert r["gbps"] > 0 and r["records_per_s"] > 0
    for r in data["memcpy"]:
        assert r["in_cache_gbps"] > 0 and r["out_of_cache_gbps"] > 0
        assert r["ring_footprint_gbps"] > 0
    ref = data["reference"]
    assert ref["record_bytes"] == 65536
    for name in ("in_cache", "ring_footprint", "out_of_cache"):  # ratio = ring / memcpy
        assert ref[f"ratio_{name}"] == pytest.approx(
            ref["ring_gbps"] / ref[f"memcpy_{name}_gbps"], rel=1e-2, abs=1e-3)
    for key in ("ring", "eventfd", "tcp_loopback"):
        lat = data["latency_us"][key]
        assert lat["n"] == 200
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
    # and the report renders it
    md = bench_report.native_markdown(data)
    assert md[0].startswith("### Native ring") and "malformed" not in "\n".join(md)
    assert "of single-core memcpy streaming through the ring's footprint" in "\n".join(md)



def report_only(tmp_path: Path, data: object) -> tuple[int, Path]:
    """`harness bench --report-only` on *data*: its exit status, and where the report goes."""
    js = tmp_path / "bench.json"
    js.write_text(json.dumps(data))
    out = tmp_path / "report"
    return cli.main(["--state-dir", str(tmp_path / "state"), "bench", "--report-only", str(js),
                     "--out", str(out)]), out


def test_cli_report_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = report_only(tmp_path, synthetic())
    assert status == 0
    assert "| iperf3 TCP, 1 stream |" in (out / "bench.md").read_text()
    capsys.readouterr()
    bad = synthetic()
    bad["samples"][0]["metrics"]["throughput_mbps"] = -5
    (out / "bench.md").unlink()
    status, out = report_only(tmp_path, bad)
    assert status == 1
    err = capsys.readouterr().err
    assert "harness: error: benchmark results rejected (1 problem(s)):" in err
    assert "samples[0] (shm/iperf3_tcp_1 rep 0): metric 'throughput_mbps' is negative" in err
    assert not (out / "bench.md").exists()


def test_every_variant_workload_runs_its_plain_workloads_runner() -> None:
    for w in bench_suites.WORKLOADS:
        for sfx in bench_suites.VARIANT_SUFFIXES:
            if w.endswith(sfx):
                assert bench.RUNNERS[w] is bench.RUNNERS[w.removesuffix(sfx)], w


class _PollGuest:
    """Answers the driver's rx-usecs knob (paths.GET_POLL_US / SET_POLL_US)."""

    def __init__(self, vm: str, usecs: str) -> None:
        self.vm, self.usecs = vm, usecs
        self.commands: list[str] = []

    def run(self, command: str, timeout: float = 0) -> str:
        self.commands.append(command)
        if command == paths.GET_POLL_US:
            return f"{self.usecs}\n"
        assert command.startswith(f"{paths.SET_POLL_US} "), command
        self.usecs = command.rsplit(maxsplit=1)[-1]
        return ""


def test_ring_polling_off_sets_rx_usecs_0_and_restores_each_guests_own() -> None:
    gs: Any = {"vm1": _PollGuest("vm1", "500"), "vm2": _PollGuest("vm2", "250")}
    with bench._ring_poll_off(gs, ("vm1", "vm2")):
        assert (gs["vm1"].usecs, gs["vm2"].usecs) == ("0", "0")
    assert (gs["vm1"].usecs, gs["vm2"].usecs) == ("500", "250")
    with pytest.raises(bench.BenchError, match="vm1: ivl0 reports no rx-usecs"):
        bench._poll_us(_PollGuest("vm1", "ethtool: bad command line argument(s)"))  # type: ignore[arg-type]
