"""QEMU's contrib ivshmem-server command line, run by ivloop-server.

Every ivshmem-server option (-h -v -F -p -S -m -M -l -n) is accepted with
its meaning or refused with one line; none is silently different.  With -S
the server daemonizes unless -F, as ivshmem-server does; with --socket it
stays in the foreground (what the harness and the systemd unit use).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import server_command, wait_until
from .fakeclient import FakeQemu

STARTUP = 15.0


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(server_command(*args), capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    assert result.returncode == status, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ivloop-server: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


@contextlib.contextmanager
def foreground(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A server started with ivshmem-server's options plus -F; waits until READY."""
    rfd, wfd = os.pipe()
    err = (tmp_path / "server.stderr").open("w")
    proc = subprocess.Popen(server_command(*args, "--ready-fd", str(wfd)), pass_fds=(wfd,),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                            text=True)  # fmt: skip
    os.close(wfd)
    try:
        readable, _, _ = select.select([rfd], [], [], STARTUP)
        ready = os.read(rfd, 16) if readable else b""
        assert ready == b"READY\n", (tmp_path / "server.stderr").read_text()
        yield proc
    finally:
        os.close(rfd)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        err.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[int]]:
    """PIDs of daemons a test started; each is killed if still running, and so is
    any daemon named by a pidfile in tmp_path (one a failed test never saw)."""
    pids: list[int] = []
    yield pids
    for pidfile in tmp_path.rglob("*pid"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(pidfile.read_text()))
    for pid in set(pids):
        with contextlib.suppress(OSError):
            if pid != os.getpid() and b"ivloop_server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def test_every_option_keeps_its_meaning_in_the_foreground(
    tmp_path: Path, clients: list[FakeQemu]
) -> None:
    sock, pidfile = tmp_path / "ivshmem_socket", tmp_path / "ivshmem-server.pid"
    with foreground(tmp_path, "-F", "-S", str(sock), "-l", "4M", "-n", "3", "-p", str(pidfile),
                    "-v", "--max-peers", "2") as proc:  # fmt: skip
        assert pidfile.read_text() == f"{proc.pid}\n"  # -F: this very process serves
        a = FakeQemu.join(sock, vectors=3)
        b = FakeQemu.join(sock, vectors=3)
        clients += [a, b]
        a.expect_join(1)
        assert len(b.own_vectors) == 3 and len(b.peers[0]) == 3  # -n: vectors per peer
        dump = json.loads(run("--dump", str(proc.pid)).stdout)
        assert dump["header"]["region_size"] == 4 << 20  # -l: the region's size
        wait_until(lambda: " DEBUG " in (tmp_path / "server.stderr").read_text(),
                   what="debug lines (-v)")  # fmt: skip
    assert proc.returncode == 0
    assert not pidfile.exists() and not sock.exists()


def test_long_options_mean_the_same(tmp_path: Path, clients: list[FakeQemu]) -> None:
    sock = tmp_path / "s"
    with (foreground(tmp_path, "--foreground", "--socket", str(sock), "--size", "4M",
                     "--vectors", "3", "--max-peers", "2"),
          FakeQemu.join(sock, vectors=3) as a):  # fmt: skip
        assert len(a.own_vectors) == 3


def test_dash_S_daemonizes_like_ivshmem_server(
    tmp_path: Path, daemons: list[int], clients: list[FakeQemu]
) -> None:
    sock, pidfile = tmp_path / "ivshmem_socket", tmp_path / "pid"
    started = time.monotonic()
    result = run("-S", str(sock), "-l", "32M", "-n", "2", "-p", str(pidfile))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < STARTUP
    pid = int(pidfile.read_text())
    daemons.append(pid)
    assert alive(pid)
    assert os.getsid(pid) != os.getsid(0), "the daemon has a session of its own"
    assert os.getsid(pid) != pid, "and is not its leader (no controlling terminal, ever)"
    assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")
    # The starting process returned only once the daemon accepted connections.
    client = FakeQemu.join(sock)
    clients.append(client)
    assert client.own_id == 0
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), what="the daemon to stop")
    assert not sock.exists() and not pidfile.exists()
    assert client.at_eof()


def test_relative_paths_survive_the_daemon_chdir(tmp_path: Path, daemons: list[int]) -> None:
    result = subprocess.run(
        server_command("-S", "rel.sock", "-p", "rel.pid"), cwd=tmp_path, capture_output=True,
        text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "rel.pid").read_text())
    daemons.append(pid)
    assert (tmp_path / "rel.sock").is_socket()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), what="the daemon to stop")
    assert not (tmp_path / "rel.pid").exists()


def test_long_socket_option_stays_in_the_foreground_unless_daemon(
    tmp_path: Path, daemons: list[int]
) -> None:
    with foreground(tmp_path, "--socket", str(tmp_path / "a"), "--pidfile",
                    str(tmp_path / "a.pid")) as proc:  # fmt: skip
        assert (tmp_path / "a.pid").read_text() == f"{proc.pid}\n"
    result = run("--socket", str(tmp_path / "b"), "--daemon", "--pidfile", str(tmp_path / "b.pid"))
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "b.pid").read_text())
    daemons.append(pid)
    assert alive(pid) and (tmp_path / "b").is_socket()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), what="the daemon to stop")


def test_daemon_that_cannot_start_fails_its_parent_with_one_line(tmp_path: Path) -> None:
    sock = tmp_path / "ivshmem_socket"
    sock.write_text("precious\n")
    line = one_line_error(run("-S", str(sock), "-p", str(tmp_path / "pid")), status=1)
    assert "is not a socket" in line
    assert sock.read_text() == "precious\n"
    assert not (tmp_path / "pid").exists()


def test_pidfile_of_a_running_server_is_not_taken(tmp_path: Path, daemons: list[int]) -> None:
    pidfile = tmp_path / "pid"
    assert run("-S", str(tmp_path / "a"), "-p", str(pidfile)).returncode == 0
    first = int(pidfile.read_text())
    daemons.append(first)
    line = one_line_error(run("-S", str(tmp_path / "b"), "-p", str(pidfile)), status=1)
    assert f"names ivloop-server process {first}, still running" in line
    assert int(pidfile.read_text()) == first and alive(first)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # ivshmem-server's default of one vector cannot carry ivloop's two doorbells.
        (["-n", "1"], "1 vectors is too few for ivloop, which needs 2 (0: membership, 1: data)"),
        (["-n", "0"], "too few for ivloop"),
        (["-n", "65"], "outside 2..64"),
        (["-n", "eight"], "is not an integer"),
        # ivshmem-server rounds -l up to a power of two; ivloop-server says so instead.
        (["-l", "3M"], "not a power of two (try 4M)"),
        (["-l", "1.5M"], "not a power of two"),
        (["-l", "0.3"], "not a whole number of bytes"),
        (["-M", "ivshmem"], "-M ivshmem: ivloop-server does not put its region in a named"),
        (["-m", "/tmp"], "-m /tmp: not a hugetlbfs mount"),
        (["-m", "/nonexistent-ivl"], "-m /nonexistent-ivl: No such file or directory"),
        (["-F", "--daemon"], "not allowed with argument"),
        (["--socket", "/tmp/other-ivl.sock"], "give the socket once: -S or --socket"),
        (["-d"], "unrecognized arguments: -d"),
    ],
)
def test_differing_short_options_are_refused_with_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    sock = tmp_path / "ivshmem_socket"
    line = one_line_error(run("-S", str(sock), "-F", *args) if args[0] != "-F"
                          else run("-S", str(sock), *args))  # fmt: skip
    assert message in line
    assert not sock.exists()


def test_max_peers_lost_its_short_option() -> None:
    # "-n 8" used to mean eight peer slots here; it is eight vectors now, as in
    # ivshmem-server, and --max-peers is the only spelling of the slots.
    help_text = run("--help").stdout
    assert "-n N, --vectors N" in help_text
    assert "  --max-peers N" in help_text and "-n N, --max-peers" not in help_text


def test_help_is_dash_h_as_in_ivshmem_server() -> None:
    result = run("-h")
    assert result.returncode == 0 and result.stdout.startswith("usage: ivloop-server")
    for option in ("-S", "-l", "-n", "-F", "-p", "-v", "-m", "-M"):
        assert f"{option} " in result.stdout or f"{option}," in result.stdout


def test_dash_m_on_hugetlbfs_asks_for_huge_pages(tmp_path: Path) -> None:
    """-m DIR on a hugetlbfs mount makes a huge-page memfd of that mount's page size."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare(1) to mount a private hugetlbfs")
    if not Path("/sys/kernel/mm/hugepages").is_dir():
        pytest.skip("this kernel has no huge pages")
    mnt = tmp_path / "huge"
    mnt.mkdir()
    sock = tmp_path / "s"
    # The mount lives and dies with a private mount namespace.
    script = f'mount -t hugetlbfs none "{mnt}" && exec "$@"'
    proc = subprocess.Popen(
        [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh",
         *server_command("-F", "-S", str(sock), "-m", str(mnt), "--ready-fd", "1")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready = proc.stdout.readline()  # "READY" once serving, "" when it exits
        if ready:
            assert ready == "READY\n"
            with FakeQemu.join(sock) as client:
                st = os.fstat(client.shm_fd or -1)
                assert st.st_size == 32 << 20
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        else:
            # No huge pages reserved on this host: the server tried, and says what it needs.
            assert proc.wait(10) == 1
            err = proc.stderr.read()
            assert "huge pages of 2M free?" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_daemon_without_dash_p_writes_the_default_pidfile(
    tmp_path: Path, daemons: list[int]
) -> None:
    # ivshmem-server's daemon writes /var/run/ivshmem-server.pid unless -p; ours
    # /run/ivloop-server.pid (moved into tmp_path here, to leave /run alone).
    default = tmp_path / "default.pid"
    code = ("import sys, pathlib, ivloop_server.cli as m; "
            f"m.DAEMON_PIDFILE = pathlib.Path({str(default)!r}); sys.exit(m.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "-S", str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=30, check=False,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, result.stderr
    pid = int(default.read_text())
    daemons.append(pid)
    assert alive(pid)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), what="the daemon to stop")
    assert not default.exists()
