"""ivloop-libvirt's command line: argument errors, one-line messages, exit codes, --json."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

import ivloop_libvirt
from ivloop_libvirt import cli, lv, shmem

from .conftest import SOCK_A, SOCK_B, shmem_xml
from .lvfakes import FakeHost, lv_error


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    got = capsys.readouterr()
    return code, got.out, got.err


@pytest.mark.parametrize(("argv", "match"), [
    (["migrate", "vm"], "the following arguments are required: --to"),
    (["migrate", "vm", "--to", "host-b"], "'host-b' is not a libvirt URI"),
    (["migrate", "vm", "--to", "qemu+ssh://b/system", "--migrate-uri", "10.0.0.2:4915"],
     "not a migration URI; use tcp://HOST"),
    (["migrate", "vm", "--to", "qemu+ssh://b/system", "--migrate-uri", "tcp://b:port"],
     "bad port"),
    (["migrate", "vm", "--to", "qemu+ssh://b/system", "--timeout", "-1"], "must be positive"),
    (["migrate", "vm", "--to", "qemu+ssh://b/system", "--dest-socket", "b.sock"],
     "must be an absolute path"),
    (["plug", "vm", "--socket", "ivloop.sock"], "must be an absolute path"),
    (["plug", "vm", "--address", "5"], "not BUS:SLOT in hex"),
    (["plug", "vm", "--address", "00:20"], "slot 00-1f"),
    (["plug"], "the following arguments are required: domain"),
    (["frobnicate"], "invalid choice"),
])
def test_argument_errors(capsys: pytest.CaptureFixture[str], argv: list[str],
                         match: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert match in capsys.readouterr().err


def test_xml_q35(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "xml", "--machine", "q35", "--socket", SOCK_B,
                        "--port-index", "12")
    assert code == 0
    port_line, dev_line = out.strip().splitlines()
    assert ET.fromstring(port_line).get("index") == "12"
    found = shmem.find_shmem(f"<domain><devices>{dev_line}</devices></domain>")
    assert found is not None and found.device.socket == SOCK_B
    assert found.device.address == shmem.PciAddress(bus=12, slot=0)


def test_unknown_domain_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "plug", "nosuch", "--connect", "test:///default")
    assert code == 2 and out == ""
    assert err.startswith("ivloop-libvirt: error: no domain named nosuch on test:///default")
    assert len(err.strip().splitlines()) == 1


def test_no_device_to_unplug(capsys: pytest.CaptureFixture[str]) -> None:
    # test:///default comes with one running domain, "test", without the device
    code, _, err = _run(capsys, "unplug", "test", "--connect", "test:///default")
    assert code == 2
    assert err.strip() == "ivloop-libvirt: error: test has no ivloop device ivloop0 to unplug"


def test_unreachable_uri(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "unplug", "vm", "--connect",
                        "qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    assert code == 2
    assert "cannot connect to libvirt at qemu+unix:///system?socket=/nonexistent" in err
    assert "is libvirtd running there" in err


def test_plug_not_hotpluggable_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "plug", "test", "--connect", "test:///default",
                        "--socket", SOCK_A)
    assert code == 2
    assert err.startswith("ivloop-libvirt: error: domain test has no <features><acpi/>")


def test_plug_refused_by_libvirt_exit_1(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    # a node file with a running domain that could take the device; libvirt 9.0's test
    # driver itself has no hot-plug, so its genuine refusal comes back as one line
    node = tmp_path / "node.xml"
    node.write_text("<node><domain type='test'><name>vm1</name><memory>262144</memory>"
                    "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
                    "<features><acpi/></features></domain></node>")
    code, _, err = _run(capsys, "plug", "vm1", "--connect", f"test://{node}",
                        "--socket", SOCK_A)
    assert code == 1
    assert err.startswith("ivloop-libvirt: error: attaching the ivloop device to vm1: this "
                          "function is not supported by the connection driver")
    assert len(err.strip().splitlines()) == 1


@pytest.fixture
def two_hosts(host_a: FakeHost, host_b: FakeHost,
              monkeypatch: pytest.MonkeyPatch) -> tuple[FakeHost, FakeHost]:
    conns: dict[str | None, Any] = {"test:///a": host_a.conn, "test:///b": host_b.conn}
    monkeypatch.setattr(lv, "connect", lambda uri=None: conns[uri])
    host_a.start(host_a.domain_xml("vm2", devices=shmem_xml(SOCK_A)))
    return host_a, host_b


def test_migrate_json_success(capsys: pytest.CaptureFixture[str],
                              two_hosts: tuple[FakeHost, FakeHost]) -> None:
    code, out, err = _run(capsys, "migrate", "vm2", "--connect", "test:///a",
                          "--to", "test:///b", "--dest-socket", SOCK_B, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["ok"] and report["downtime_ms"] == 42 and report["dest_socket"] == SOCK_B
    assert "unplug on source" in err  # progress goes to stderr with --json


def test_migrate_table(capsys: pytest.CaptureFixture[str],
                       two_hosts: tuple[FakeHost, FakeHost]) -> None:
    code, out, _ = _run(capsys, "migrate", "vm2", "-c", "test:///a", "--to", "test:///b")
    assert code == 0
    for row in ("unplug (source)", "migrate", "downtime", "plug (destination)", "0.042"):
        assert row in out
    # plain text (no rich in this package): a title, then the steps with their
    # seconds right-aligned in one column
    lines = out.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("vm2: test://"))
    assert " -> test://" in lines[title]
    table = lines[title + 1:]
    assert table[0].split() == ["step", "seconds"]
    assert len({len(line) for line in table}) == 1, table
    assert any(line.split()[-1] == "0.042" and "downtime" in line for line in table)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"ivloop-libvirt {ivloop_libvirt.__version__}\n"


def test_migrate_rolled_back_exit_1(capsys: pytest.CaptureFixture[str],
                                    two_hosts: tuple[FakeHost, FakeHost]) -> None:
    a, _ = two_hosts
    a.conn.lookupByName("vm2").migrate_error = lv_error(
        libvirt.VIR_ERR_RPC, "End of file while reading data")
    code, out, err = _run(capsys, "migrate", "vm2", "-c", "test:///a", "--to", "test:///b",
                          "--json")
    assert code == 1
    assert json.loads(out)["failed_phase"] == "migrate"
    assert "ivloop-libvirt: error: vm2 stays on test://" in err


def test_migrate_without_shm_exit_3(capsys: pytest.CaptureFixture[str],
                                    two_hosts: tuple[FakeHost, FakeHost]) -> None:
    _, b = two_hosts
    b.attach_error = lv_error(libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: server sent "
                              "version -1")
    code, _, err = _run(capsys, "migrate", "vm2", "-c", "test:///a", "--to", "test:///b",
                        "--dest-socket", SOCK_B)
    assert code == 3
    lines = err.strip().splitlines()
    assert "without shared memory" in lines[-2] or "without shared memory" in err
    assert lines[-1].strip().startswith("once that host's server is fixed: ivloop-libvirt plug")


def test_migrate_to_itself(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "migrate", "vm", "-c", "test:///a", "--to", "test:///a")
    assert code == 2 and "is the source itself" in err


def test_console_script_installed() -> None:
    proc = subprocess.run([sys.executable, "-m", "ivloop_libvirt", "--help"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0
    for command in ("plug", "unplug", "migrate", "server-restart", "xml"):
        assert command in proc.stdout
