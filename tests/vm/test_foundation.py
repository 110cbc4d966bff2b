"""Foundation: VMs on simulated hosts reach each other over the data network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import cli
from harness.lab.state import StateDir

from .conftest import leftovers, recorded_pids
from .lab import Lab, mbps, received_bytes


def test_coresident_vms_ping_and_stream(lab: Lab) -> None:
    assert lab.ping("vm1", lab.ip("vm2")) == 0
    result = lab.iperf3("vm1", "vm2", seconds=3)
    assert received_bytes(result) > 1_000_000, result["end"]
    assert mbps(result) > 1


def test_vms_on_different_hosts_talk_across_the_wire(lab: Lab) -> None:
    assert lab.ping("vm1", lab.ip("vm3")) == 0
    result = lab.iperf3("vm1", "vm3", seconds=3)
    assert received_bytes(result) > 1_000_000, result["end"]


def test_ipv6_between_vms(lab: Lab) -> None:
    assert lab.ping("vm1", lab.topo.vm("vm2").ip6) == 0
    assert lab.ping("vm2", lab.topo.vm("vm3").ip6) == 0


def test_status_reports_every_vm_running(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--state-dir", str(lab.sd.path), "status", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count('"status": "running"') == 3
    assert out.count('"ivshmem": "attached"') == 3


def test_ssh_runs_a_command_and_returns_its_status(lab: Lab) -> None:
    assert lab.guest("vm3").run("hostname").strip() == "vm3"
    code, _ = lab.guest("vm3").status("exit 7")
    assert code == 7


def test_down_after_kill_9_of_the_harness_leaves_nothing(tmp_path: Path) -> None:
    topo = tmp_path / "one.toml"
    topo.write_text('[hosts.A]\n[vms.solo]\nhost = "A"\n')
    sd = StateDir(tmp_path / "state")
    env = {**os.environ, "IVLOOP_STATE_DIR": str(sd.path)}
    with subprocess.Popen([sys.executable, "-m", "harness", "up", "--topology", str(topo)],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as up:
        deadline = time.monotonic() + 60
        while not list(sd.path.glob("qemu-*.pid")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(sd.path.glob("qemu-*.pid")), "QEMU never started"
        up.send_signal(signal.SIGKILL)  # mid-boot: SSH not yet up
    pids = recorded_pids(sd)
    assert pids, "nothing recorded before the crash"
    assert any(Path(f"/proc/{p}").exists() for p in pids), "the crash should leave QEMU running"
    down = subprocess.run([sys.executable, "-m", "harness", "down"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert down.returncode == 0, down.stderr
    assert "removed QEMU" in down.stdout and "removed namespace" in down.stdout
    assert leftovers(sd, pids) == []
