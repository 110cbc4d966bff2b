"""server-restart: unplug every user of the socket, run the command, plug them all back."""

from __future__ import annotations

import socket as socketlib
import sys
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from ivloop_libvirt import restart, shmem
from ivloop_libvirt.errors import ServerRestartError

from .conftest import SOCK_A, SOCK_B, shmem_xml
from .lvfakes import FakeHost, lv_error


def _domains(host: FakeHost, sock: str) -> None:
    host.start(host.domain_xml("web", devices=shmem_xml(sock, slot=5)))
    host.start(host.domain_xml("db", devices=shmem_xml(sock, slot=9)), persistent=False)
    host.start(host.domain_xml("other", devices=shmem_xml(SOCK_B)))  # another trust group
    host.start(host.domain_xml("plain"))  # no device
    host.wrap(host.real.defineXML(host.domain_xml("off", devices=shmem_xml(sock))))


def _calls(host: FakeHost, name: str) -> list[str]:
    return [c[0] for c in host.conn.lookupByName(name).calls]


def test_users_of_picks_running_domains_on_that_socket(host_a: FakeHost) -> None:
    _domains(host_a, SOCK_A)
    users = restart.users_of(host_a.conn, SOCK_A + "/.")  # normalised path
    assert [d.name() for d, _ in users] == ["db", "web"]


def test_restart_order_and_same_addresses(host_a: FakeHost) -> None:
    _domains(host_a, SOCK_A)
    steps: list[str] = []
    report = restart.server_restart(
        host_a.conn, SOCK_A, command=[sys.executable, "-c", "print('restarted')"],
        socket_wait=0, progress=lambda what, info: steps.append(
            f"{what} {info.get('domain', '')}".strip()))
    assert report.ok and report.command_status == 0 and report.command_output == "restarted"
    assert steps == ["unplug db", "unplug web", "restart", "plug db", "plug web"]
    assert [(r.domain, r.unplugged, r.plugged, r.error) for r in report.domains] == [
        ("db", True, True, ""), ("web", True, True, "")]
    for name, slot in (("web", 5), ("db", 9)):
        assert _calls(host_a, name) == ["detach", "attach"]
        found = shmem.find_shmem(host_a.conn.lookupByName(name).XMLDesc(0))
        assert found is not None and found.device.address is not None
        assert found.device.address.slot == slot and found.device.socket == SOCK_A
    assert _calls(host_a, "other") == [] and _calls(host_a, "plain") == []


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "ivloop.sock"
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    s.bind(str(path))
    yield path
    s.close()


def test_waits_for_the_new_socket(host_a: FakeHost, listening: Path) -> None:
    _domains(host_a, str(listening))
    # a "server" that takes a moment, then replaces the socket (new inode)
    script = ("import os, socket, time; time.sleep(0.3); p = os.environ['P']; os.unlink(p); "
              "socket.socket(socket.AF_UNIX).bind(p)")
    old = listening.stat().st_ino
    report = restart.server_restart(host_a.conn, str(listening),
                                    command=["env", f"P={listening}", sys.executable, "-c",
                                             script], socket_wait=5)
    assert report.ok and listening.stat().st_ino != old


def test_failing_command_is_reported_and_domains_replugged(host_a: FakeHost) -> None:
    _domains(host_a, SOCK_A)
    cmd = [sys.executable, "-c", "import sys; sys.exit('Unit ivloop-server.service not found.')"]
    with pytest.raises(ServerRestartError, match=r"restart command failed \(1\): "
                       "Unit ivloop-server.service not found") as info:
        restart.server_restart(host_a.conn, SOCK_A, command=cmd, socket_wait=0)
    r = info.value.report
    assert not r.ok and r.command_status == 1
    assert all(d.plugged for d in r.domains)


def test_missing_command_binary(host_a: FakeHost) -> None:
    with pytest.raises(ServerRestartError, match="restart command failed"):
        restart.server_restart(host_a.conn, SOCK_A, command=["/nonexistent/ivloop-restart"])


def test_one_domain_failing_does_not_stop_the_others(host_a: FakeHost) -> None:
    _domains(host_a, SOCK_A)
    host_a.conn.lookupByName("db").attach_error = lv_error(
        libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: server sent version -1")
    host_a.conn.lookupByName("web").detach_error = lv_error(
        libvirt.VIR_ERR_OPERATION_FAILED, "operation failed: detach timed out")
    with pytest.raises(ServerRestartError, match=r"not re-plugged: db \(plug: .*refused.*\), "
                       r"web \(unplug: .*detach timed out\)") as info:
        restart.server_restart(host_a.conn, SOCK_A)
    got = {d.domain: (d.unplugged, d.plugged) for d in info.value.report.domains}
    assert got == {"db": (True, False), "web": (False, False)}
    assert _calls(host_a, "web") == ["detach"]  # never unplugged: not plugged twice


def test_no_users(host_a: FakeHost) -> None:
    report = restart.server_restart(host_a.conn, SOCK_A)
    assert report.ok and report.domains == []
