"""One real libvirtd per simulated host, as a cloud host runs one.

Each host's libvirtd runs inside the host's network namespace and in a mount
namespace of its own, where private directories of the state directory are
bind-mounted over libvirt's fixed paths::

    <state>/libvirt-HOST/run    -> /run/libvirt        (sockets, pidfiles)
    <state>/libvirt-HOST/lib    -> /var/lib/libvirt    (domain runtime files)
    <state>/libvirt-HOST/etc    -> /etc/libvirt        (libvirtd.conf, qemu.conf)
    <state>/libvirt-HOST/cache  -> /var/cache/libvirt  (QEMU capabilities)
    <state>/logs/libvirt-HOST   -> /var/log/libvirt    (kept after `harness down`)

so its domains, sockets and ``host_uuid`` are its own: libvirt refuses to
migrate to a destination that reports the source's host UUID.  No systemd
runs here, so the harness starts libvirtd itself (detached, like QEMU) and
configures QEMU the way these machines allow: as root, no security driver,
no cgroups, console files written by QEMU itself (``stdio_handler =
"file"``: no virtlogd).

The mounts exist only in libvirtd's namespace (and in those of the QEMUs it
starts), so nothing is left in the host's mount table when they end.
Clients reach a daemon through :attr:`Daemon.uri`.

Records, for ``harness down`` after a crash: the private directory exists
before the daemon starts, and the daemon's command line names its
configuration file in it, so :func:`daemons_of` finds it (by PID file, by
record and by a scan of ``/proc``) even if the harness was killed before it
wrote anything else.  QEMUs started by libvirtd are found by the PID files
libvirt writes in the private run directory, and only signalled if they
still are that QEMU in the host's network namespace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from harness.errors import HarnessError, LaunchError, StateError
from harness.lab import procs, qemu
from harness.lab.state import ProcRecord, StateDir
from ivloop_libvirt import lv
from ivloop_libvirt.errors import ConnectError

log = logging.getLogger(__name__)

LIBVIRTD = "/usr/sbin/libvirtd"
START_TIMEOUT = float(os.environ.get("IVLOOP_LIBVIRTD_TIMEOUT", "90"))
STOP_TIMEOUT = 20.0
#: Where libvirt looks, and which private directory is mounted there.
MOUNTS = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "etc": "/etc/libvirt",
          "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1
_UUID_NS = uuid.UUID("6f6b0c2e-8a43-4d2e-9b1e-1f0e5a7c1d10")  # ivloop's, for uuid5

#: qemu.conf for machines without systemd, cgroups or AppArmor.  Ownership is
#: left alone (root runs QEMU), so libvirt writes no xattrs on the guest
#: image or the state directory.
QEMU_CONF = """\
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
stdio_handler = "file"
"""


class LibvirtError(HarnessError):
    """A libvirtd of a simulated host refused a request or is unreachable."""


@dataclass(frozen=True)
class Daemon:
    """Where one host's libvirtd lives; every path is outside its namespace."""

    host: str
    root: Path  # run, lib, etc, cache: removed by stop()
    logdir: Path  # mounted over /var/log/libvirt: kept

    def dir(self, key: str) -> Path:
        return self.logdir if key == "log" else self.root / key

    @property
    def socket(self) -> Path:
        return self.dir("run") / "libvirt-sock"

    @property
    def pidfile(self) -> Path:
        return self.dir("run") / "libvirtd.pid"

    @property
    def config(self) -> Path:
        return self.dir("etc") / "libvirtd.conf"

    @property
    def record(self) -> Path:
        return self.root / "libvirtd.json"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        """libvirtd's own log (its stdout and stderr go to ``<state>/logs``)."""
        return self.logdir / "libvirtd.log"

    def domain_log(self, name: str) -> Path:
        """What libvirt and QEMU said about domain *name* (its start-up errors)."""
        return self.logdir / "qemu" / f"{name}.log"

    def qemu_pidfiles(self) -> list[Path]:
        return sorted((self.dir("run") / "qemu").glob("*.pid"))


def daemon(sd: StateDir, host: str) -> Daemon:
    return Daemon(host=host, root=sd.file(f"libvirt-{host}"),
                  logdir=sd.file("logs", f"libvirt-{host}"))


def daemons_in(sd: StateDir) -> list[Daemon]:
    """Every host daemon directory in *sd*, whatever the state file says."""
    return [daemon(sd, p.name.removeprefix("libvirt-"))
            for p in sorted(sd.path.glob("libvirt-*")) if p.is_dir()]


def host_uuid(instance: str, host: str) -> str:
    """A stable host UUID per state directory and host, unique between hosts."""
    return str(uuid.uuid5(_UUID_NS, f"{instance}/{host}"))


def libvirtd_conf(d: Daemon, host_uuid_: str) -> str:
    return "\n".join([
        f'host_uuid = "{host_uuid_}"',
        # root only: the sockets are 0700 and need no further authentication
        'auth_unix_rw = "none"', 'auth_unix_ro = "none"',
        'unix_sock_rw_perms = "0700"', 'unix_sock_ro_perms = "0700"',
        'unix_sock_admin_perms = "0700"',
        f'log_outputs = "3:file:{d.log}"',
        "",
    ])  # fmt: skip


def prepare(d: Daemon, host_uuid_: str) -> None:
    """Create the private directories and configuration of *d*."""
    if len(str(d.socket)) > SUN_PATH_MAX:
        raise StateError(f"libvirt's socket path {d.socket} is longer than a UNIX socket "
                         f"path may be ({SUN_PATH_MAX}); use a shorter --state-dir")
    for key in MOUNTS:
        d.dir(key).mkdir(parents=True, exist_ok=True, mode=0o700)
    d.config.write_text(libvirtd_conf(d, host_uuid_))
    (d.dir("etc") / "qemu.conf").write_text(QEMU_CONF)


def command(d: Daemon, netns: str) -> list[str]:
    """The argv that runs *d*'s libvirtd: ip netns exec, unshare -m, mounts, exec.

    Each step execs the next, so the PID spawned is libvirtd's.  The mount
    points are created if missing (Debian creates /run/libvirt at boot only
    through systemd-tmpfiles): empty directories, in the host's file system.
    """
    script = ["set -e"]
    for key, target in MOUNTS.items():
        script.append(f"mkdir -p {target}")
        script.append(f"mount --bind {shlex.quote(str(d.dir(key)))} {target}")
    script.append(f"exec {LIBVIRTD} -f {shlex.quote(str(d.config))} "
                  f"-p {shlex.quote(str(d.pidfile))}")
    return ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private",
            "sh", "-c", "\n".join(script)]


def spawn(d: Daemon, netns: str, logfile: Path) -> ProcRecord:
    """Start *d*'s libvirtd (prepared) and record its PID; does not wait."""
    if not Path(LIBVIRTD).exists():
        raise LaunchError(f"{LIBVIRTD} is not installed (Debian's libvirt-daemon-system; "
                          "run 'make deps')", [LIBVIRTD], None, "")
    for stale in (d.socket, d.pidfile):
        stale.unlink(missing_ok=True)
    pid = procs.spawn_detached(command(d, netns), logfile)
    rec = ProcRecord.of(pid)
    d.record.write_text(json.dumps({"pid": rec.pid, "start_time": rec.start_time}))
    log.info("libvirtd for %s: pid %d in %s", d.host, pid, netns)
    return rec


def open_connection(uri: str) -> Any:  # libvirt.virConnect (libvirt-python is untyped)
    """A read-write connection to *uri*; :class:`LibvirtError` if it cannot be opened."""
    try:
        return lv.connect(uri)
    except ConnectError as exc:
        raise LibvirtError(str(exc)) from exc


@contextlib.contextmanager
def connection(d: Daemon) -> Iterator[Any]:
    conn = open_connection(d.uri)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def wait_ready(d: Daemon, proc: ProcRecord, logfile: Path,
               timeout: float = START_TIMEOUT) -> float:
    """Wait until *d* answers a connection; the seconds it took.

    libvirtd accepts connections only once its drivers are up, which here
    includes probing every QEMU binary (about 8 s: the host's CPUID changes
    between runs, so libvirt's capability cache never stays valid).
    """
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        code = procs.exit_status(proc.pid)
        if code is not None or not proc.alive():
            raise LaunchError(f"libvirtd for {d.host} exited during start-up", [LIBVIRTD],
                              code, _tail(logfile) + "\n" + _tail(d.log))
        if d.socket.exists():
            try:
                with connection(d) as conn:
                    # the RPC server answers before the drivers are up; a
                    # QEMU driver call waits for them
                    conn.getVersion()
                    return time.monotonic() - t0
            except LibvirtError as exc:
                last = str(exc)
        time.sleep(0.1)
    raise LaunchError(f"libvirtd for {d.host} did not answer within {timeout:.0f} s"
                      + (f" ({last})" if last else ""), [LIBVIRTD], None,
                      _tail(logfile) + "\n" + _tail(d.log))


def start(d: Daemon, netns: str, host_uuid_: str, logfile: Path,
          timeout: float = START_TIMEOUT) -> ProcRecord:
    """Prepare, spawn and wait for *d*'s libvirtd; on failure nothing of it is left."""
    prepare(d, host_uuid_)
    rec = spawn(d, netns, logfile)
    try:
        took = wait_ready(d, rec, logfile, timeout)
    except BaseException:
        stop(d, netns)
        raise
    log.info("libvirtd for %s answers on %s after %.1f s", d.host, d.socket, took)
    return rec


# ---------------------------------------------------------------------------
# finding and stopping


def recorded(d: Daemon) -> ProcRecord | None:
    try:
        raw = json.loads(d.record.read_text())
        return ProcRecord(pid=int(raw["pid"]), start_time=int(raw["start_time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


_LAUNCH_CHAIN = {b"libvirtd", b"ip", b"unshare", b"sh"}  # each execs the next (see command)


def _is_daemon_of(pid: int, d: Daemon) -> bool:
    """Whether *pid* is a libvirtd (or its launcher) started with *d*'s configuration."""
    args = _cmdline(pid)
    return (bool(args) and os.path.basename(args[0]) in _LAUNCH_CHAIN
            and str(d.config).encode() in b" ".join(args))


def daemons_of(d: Daemon) -> list[ProcRecord]:
    """The live processes that are *d*'s libvirtd: its record, PID file, or a /proc scan."""
    found: dict[int, ProcRecord] = {}
    rec = recorded(d)
    if rec is not None and rec.alive() and _is_daemon_of(rec.pid, d):
        found[rec.pid] = rec
    with contextlib.suppress(OSError, ValueError):
        pid = int(d.pidfile.read_text().strip())
        if _is_daemon_of(pid, d):
            found.setdefault(pid, ProcRecord.of(pid))
    for entry in Path("/proc").iterdir():  # the harness died before it wrote anything
        if entry.name.isdigit() and int(entry.name) not in found \
                and _is_daemon_of(int(entry.name), d):
            found[int(entry.name)] = ProcRecord.of(int(entry.name))
    return [r for r in found.values() if r.alive()]


def _netns_inode(netns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return None


def qemu_of(d: Daemon, netns: str | None) -> list[tuple[str, ProcRecord]]:
    """(domain, process) of every live QEMU *d*'s libvirtd started, by libvirt's PID files.

    A PID counts only if it still is that domain's QEMU (``guest=NAME`` on its
    command line) and, when *netns* is given and exists, runs in it.
    """
    ino = _netns_inode(netns) if netns else None
    found = []
    for pidfile in d.qemu_pidfiles():
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        args = _cmdline(pid)
        if f"guest={pidfile.stem}".encode() not in b",".join(args):
            continue
        if not os.path.basename(args[0]).startswith(b"qemu-system"):
            continue
        if ino is not None:
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino != ino:
                    continue
            except OSError:
                continue
        rec = ProcRecord.of(pid)
        if rec.alive():
            found.append((pidfile.stem, rec))
    return found


def destroy_domains(d: Daemon) -> list[str]:
    """Ask *d* to destroy (and undefine) each of its domains; the names it destroyed."""
    gone: list[str] = []
    try:
        with connection(d) as conn:
            for dom in conn.listAllDomains(0):
                name = dom.name()
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                        gone.append(name)
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isPersistent():
                        dom.undefine()
    except (LibvirtError, libvirt.libvirtError) as exc:
        log.warning("libvirtd for %s did not destroy its domains (%s); "
                    "stopping their QEMUs by PID", d.host, exc)
    return gone


def stop(d: Daemon, netns: str | None, timeout: float = STOP_TIMEOUT) -> list[str]:
    """Stop *d*: its domains, its libvirtd, stray QEMUs; remove its private files.

    Safe to call on a daemon that never started or is already gone.  Returns
    what it stopped or removed, for ``harness down`` to print.
    """
    removed: list[str] = []
    daemons = daemons_of(d)
    if daemons and d.socket.exists():
        removed += [f"libvirt domain {name} ({d.host})" for name in destroy_domains(d)]
    for rec in daemons:
        if qemu.terminate(rec, timeout):
            removed.append(f"libvirtd {d.host} (pid {rec.pid})")
    for name, rec in qemu_of(d, netns):  # libvirtd was gone, or did not destroy them
        if qemu.terminate(rec, timeout):
            removed.append(f"QEMU {name} of libvirtd {d.host} (pid {rec.pid})")
    if d.root.exists():
        shutil.rmtree(d.root, ignore_errors=True)
        removed.append(f"libvirt files {d.root}")
    return removed


def mounts_of(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Mount points in *mountinfo* whose source or target lies under *path*.

    The host's mount table must never show one (the mounts live only in
    libvirtd's namespace); the tests check it.
    """
    prefix = str(path)
    hits = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        # 3: root of the mount within its file system, 4: mount point
        if any(f == prefix or f.startswith(prefix + "/") for f in fields[3:5]):
            hits.append(fields[4])
    return hits


# ---------------------------------------------------------------------------
# helpers


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
