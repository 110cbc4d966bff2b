"""Per-host libvirtd: configuration, launch command, and finding what to stop.

No daemon runs here (tests/vm/test_libvirt.py starts real ones); the
processes stood in for libvirtd and its QEMUs are plain shells whose command
lines look like theirs, which is all :mod:`harness.backends.libvirtd` goes by.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.backends import libvirtd
from harness.errors import StateError
from harness.lab.state import StateDir


@pytest.fixture
def d(tmp_path: Path) -> libvirtd.Daemon:
    sd = StateDir(tmp_path / "state")
    sd.path.mkdir()
    return libvirtd.daemon(sd, "A")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def _wait_gone(p: subprocess.Popen[bytes]) -> bool:
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_paths_live_in_the_state_directory(d: libvirtd.Daemon, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert d.root == state / "libvirt-A" and d.logdir == state / "logs" / "libvirt-A"
    assert d.socket == state / "libvirt-A" / "run" / "libvirt-sock"
    assert d.uri == f"qemu+unix:///system?socket={d.socket}"
    assert d.domain_log("vm1") == state / "logs" / "libvirt-A" / "qemu" / "vm1.log"


def test_prepare_writes_a_config_of_its_own(d: libvirtd.Daemon) -> None:
    uuid = libvirtd.host_uuid("abc", "A")
    libvirtd.prepare(d, uuid)
    for key in libvirtd.MOUNTS:
        assert d.dir(key).is_dir()
    conf = d.config.read_text()
    assert f'host_uuid = "{uuid}"' in conf
    assert f'log_outputs = "3:file:{d.log}"' in conf
    assert 'auth_unix_rw = "none"' in conf and 'unix_sock_rw_perms = "0700"' in conf
    qemu_conf = (d.dir("etc") / "qemu.conf").read_text().splitlines()
    for line in ('user = "root"', 'group = "root"', 'security_driver = "none"',
                 "cgroup_controllers = [ ]", 'stdio_handler = "file"'):
        assert line in qemu_conf


def test_host_uuids_differ_between_hosts_and_topologies() -> None:
    uuids = {libvirtd.host_uuid(i, h) for i in ("abc", "def") for h in ("A", "B")}
    assert len(uuids) == 4
    assert libvirtd.host_uuid("abc", "A") == libvirtd.host_uuid("abc", "A")


def test_a_socket_path_too_long_is_refused(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / ("x" * 90))
    with pytest.raises(StateError, match="shorter --state-dir"):
        libvirtd.prepare(libvirtd.daemon(sd, "A"), libvirtd.host_uuid("x", "A"))


def test_command_enters_the_netns_and_a_mount_namespace(d: libvirtd.Daemon) -> None:
    argv = libvirtd.command(d, "ivl-abc-A")
    assert argv[:8] == ["ip", "netns", "exec", "ivl-abc-A", "unshare", "--mount",
                        "--propagation", "private"]
    assert argv[8:10] == ["sh", "-c"]
    script = argv[10].splitlines()
    for key, target in libvirtd.MOUNTS.items():
        assert f"mount --bind {d.dir(key)} {target}" in script
    # every step execs the next: the PID spawned is libvirtd's
    assert script[-1] == f"exec {libvirtd.LIBVIRTD} -f {d.config} -p {d.pidfile}"
    assert script[0] == "set -e"


def test_an_unrecorded_daemon_is_found_and_stopped(d: libvirtd.Daemon,
                                                   procs: list[subprocess.Popen[bytes]]) -> None:
    """A harness killed right after spawning: no record, no PID file, yet found."""
    libvirtd.prepare(d, libvirtd.host_uuid("x", "A"))
    ours = subprocess.Popen(["sh", "-c", "sleep 30; true", "libvirtd", "-f", str(d.config)])
    other = subprocess.Popen(["sh", "-c", "sleep 30; true", "libvirtd", "-f", "/etc/x.conf"])
    procs += [ours, other]
    time.sleep(0.1)
    assert [r.pid for r in libvirtd.daemons_of(d)] == [ours.pid]
    removed = libvirtd.stop(d, None, timeout=5)
    assert _wait_gone(ours)
    assert other.poll() is None  # not ours: untouched
    assert f"libvirtd A (pid {ours.pid})" in removed
    assert not d.root.exists() and f"libvirt files {d.root}" in removed


def test_stray_qemus_are_found_by_libvirts_pid_files(d: libvirtd.Daemon, tmp_path: Path,
                                                     procs: list[subprocess.Popen[bytes]]) -> None:
    """libvirtd gone, its QEMUs still running: stopped only if they are that QEMU."""
    libvirtd.prepare(d, libvirtd.host_uuid("x", "A"))
    fake = tmp_path / "qemu-system-x86_64"
    fake.symlink_to("/bin/sh")
    vm1 = subprocess.Popen([str(fake), "-c", "sleep 30; true", "-name", "guest=vm1,x=y"])
    stranger = subprocess.Popen(["sh", "-c", "sleep 30; true", "guest=vm2"])
    procs += [vm1, stranger]
    run = d.dir("run") / "qemu"
    run.mkdir()
    (run / "vm1.pid").write_text(f"{vm1.pid}\n")
    (run / "vm2.pid").write_text(f"{stranger.pid}\n")  # a reused PID: not a QEMU
    (run / "vm3.pid").write_text(f"{vm1.pid}\n")  # a QEMU, but of another domain
    time.sleep(0.1)
    assert [(n, r.pid) for n, r in libvirtd.qemu_of(d, None)] == [("vm1", vm1.pid)]
    # a namespace it does not run in: not counted
    netns = next(Path("/run/netns").iterdir(), None) if Path("/run/netns").exists() else None
    if netns is not None and os.stat(netns).st_ino != os.stat("/proc/self/ns/net").st_ino:
        assert libvirtd.qemu_of(d, netns.name) == []
    removed = libvirtd.stop(d, None, timeout=5)
    assert _wait_gone(vm1) and stranger.poll() is None
    assert f"QEMU vm1 of libvirtd A (pid {vm1.pid})" in removed


def test_stop_of_nothing_is_harmless(d: libvirtd.Daemon) -> None:
    assert libvirtd.stop(d, None) == []


def test_daemons_in_finds_every_host_directory(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "state")
    for host in ("B", "A"):
        (sd.path / f"libvirt-{host}").mkdir(parents=True)
    (sd.path / "libvirt-notadir").write_text("")
    assert [d.host for d in libvirtd.daemons_in(sd)] == ["A", "B"]


def test_mounts_of_reads_sources_and_targets(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n"
        f"90 29 254:1 {tmp_path}/state/libvirt-A/run /run/libvirt rw - ext4 /dev/vda1 rw\n"
        f"91 29 254:1 / {tmp_path}/state/x rw - ext4 /dev/vda1 rw\n"
        f"92 29 254:1 / {tmp_path}/statex rw - ext4 /dev/vda1 rw\n")
    assert libvirtd.mounts_of(tmp_path / "state", info) == ["/run/libvirt",
                                                           f"{tmp_path}/state/x"]
    # this machine's own table has none of a fresh directory's
    assert libvirtd.mounts_of(tmp_path / "state") == []
