"""Debian 12 roots for the package tests: a cached debootstrap, chroot steps, a booted systemd.

Three layers, each owning what it starts:

- :func:`cached_root` debootstraps Debian 12 (minbase plus the packages
  asked for) from the machine's own archive, as ``images/build-debian``
  does, once per debootstrap version, archive and package list; the
  pristine root is kept under ``build/nspawn/`` (git ignores ``build/``),
  so later runs only copy it.
- :func:`fresh_root` gives each test its own copy and removes it on every
  path; :class:`Chroot` runs commands in a copy, each in a private mount
  namespace whose ``/proc`` mount ends with the command, so nothing is ever
  left mounted.
- :func:`booted` boots a copy with ``systemd-nspawn -b`` (systemd as the
  container's PID 1) and yields a :class:`Machine`, whose
  :meth:`Machine.run` executes commands inside through ``nsenter``.  On the
  way out it powers the container off, or kills the nspawn process and the
  container's init it started (by PID, nothing else), and waits for both.

Everything needs root.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from . import debs

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("IVLOOP_NSPAWN_CACHE", REPO / "build" / "nspawn"))
SUITE = "bookworm"
# What a booted root needs beyond minbase: systemd as init and the system
# bus (systemctl show, systemd-analyze security).
BOOT_PACKAGES = ("systemd", "systemd-sysv", "dbus")
# Bump when the way a root is made changes (not its package list: that is
# part of the key already).
RECIPE = 1

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The environment of every command run in a root: nothing of the caller's.
BASE_ENV = {
    "PATH": PATH,
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "DEBIAN_FRONTEND": "noninteractive",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


# -- errors ---------------------------------------------------------------


class NspawnError(Exception):
    """Root of this module's errors.

    NspawnError
     +-- CommandFailed   a command in a root (or debootstrap) exited non-zero
     +-- BootError       the container did not come up, or went away
    """


class CommandFailed(NspawnError):
    """A command exited with a status that was not asked for."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(self.argv)} exited {returncode}\n"
            f"--- stdout\n{stdout[-4000:]}--- stderr\n{stderr[-4000:]}"
        )


class BootError(NspawnError):
    """The container did not reach a running system; carries the console log's tail."""


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    shown: Sequence[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; on failure (with ``check``) raise CommandFailed naming ``shown``."""
    log.debug("run %s", " ".join(shown or argv))
    proc = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandFailed(shown or argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


# -- the archive ----------------------------------------------------------


@dataclass(frozen=True)
class Archive:
    """The machine's Debian archive: debootstrap's mirror and keyring, apt's sources."""

    mirror: str
    keyring: Path
    sources: tuple[str, ...]  # sources.list lines: main, -updates, -security


_DEBIAN_URI = re.compile(r"debian(-security)?/?$")


def _wanted(uri: str, suite_name: str, suite: str) -> bool:
    return (
        bool(_DEBIAN_URI.search(uri))
        and re.fullmatch(rf"{re.escape(suite)}(-updates|-security)?", suite_name) is not None
    )


def _deb822_sources(text: str, suite: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        signed_by = fields.get("signed-by", "")
        option = f"[signed-by={signed_by}] " if signed_by.startswith("/") else ""
        for uri in fields.get("uris", "").split():
            for name in fields.get("suites", "").split():
                if _wanted(uri, name, suite):
                    yield f"deb {option}{uri} {name} main"


def _one_line_sources(text: str, suite: str) -> Iterator[str]:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        option = ""
        rest = words[1:]
        if rest and rest[0].startswith("["):
            # "[opt=a opt=b]" may span words
            opts = [rest.pop(0)]
            while not opts[-1].endswith("]") and rest:
                opts.append(rest.pop(0))
            option = " ".join(opts) + " "
        if len(rest) >= 2 and _wanted(rest[0], rest[1], suite):
            yield f"deb {option}{rest[0]} {rest[1]} main"


def machine_archive(suite: str = SUITE, etc_apt: Path = Path("/etc/apt")) -> Archive:
    """The Debian ``suite`` archive this machine uses (images/build-debian's sources()).

    /etc/apt is only read.  No mirror is hard-coded: the root gets the same
    sources as the machine.
    """
    lines: list[str] = []
    for path in sorted(etc_apt.glob("sources.list.d/*.sources")):
        lines.extend(_deb822_sources(path.read_text(), suite))
    for path in [etc_apt / "sources.list", *sorted(etc_apt.glob("sources.list.d/*.list"))]:
        if path.exists():
            lines.extend(_one_line_sources(path.read_text(), suite))
    sources = tuple(sorted(set(lines)))
    if not sources:
        raise NspawnError(f"no Debian {suite} source found in {etc_apt}")
    mirror = next((ln.split()[-3] for ln in sources if ln.split()[-2] == suite), None)
    if mirror is None:
        raise NspawnError(f"no Debian {suite} main URI in {etc_apt} (found: {sources})")
    keyrings = [m.group(1) for ln in sources if (m := re.search(r"signed-by=([^] ]+)", ln))]
    keyring = Path(keyrings[0] if keyrings else "/usr/share/keyrings/debian-archive-keyring.gpg")
    if not keyring.exists():
        raise NspawnError(f"archive keyring {keyring} not found")
    return Archive(mirror, keyring, sources)


# -- the cached root ------------------------------------------------------


def debootstrap_version() -> str:
    return _run(["dpkg-query", "-W", "-f=${Version}", "debootstrap"]).stdout.strip()


def root_key(packages: Iterable[str], archive: Archive) -> str:
    """What a cached root depends on: debootstrap, the archive, the packages, the recipe."""
    digest = hashlib.sha256()
    for part in (
        f"recipe {RECIPE}",
        f"suite {SUITE}",
        f"debootstrap {debootstrap_version()}",
        *archive.sources,
        *sorted(set(packages)),
    ):
        digest.update(part.encode() + b"\n")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (one root build at a time, across workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def remove_tree(path: Path) -> None:
    """``rm -rf`` a root, refusing if anything is mounted in it (never delete through a mount)."""
    if not path.exists():
        return
    mounted = _mounts_under(path)
    if mounted:
        raise NspawnError(f"refusing to remove {path}: still mounted: {mounted}")
    _run(["rm", "-rf", "--one-file-system", "--", str(path)], timeout=300)


# A cached root nobody copied for this long is removed when another is built.
STALE_AFTER = 24 * 3600.0


def _used(root: Path) -> Path:
    return root.with_name(root.name + ".used")


def cached_root(packages: Iterable[str] = (), cache: Path = CACHE_DIR) -> Path:
    """The pristine root with BOOT_PACKAGES and ``packages``; built if missing.

    Returns a directory nobody may modify: use :func:`fresh_root` for a copy.
    Roots of other keys (another debootstrap, other packages) stay while
    they are in use: one no copy was made of for STALE_AFTER is removed
    when a new one is built.  debootstrap's downloads stay in ``cache/debs``.
    """
    wanted = sorted({*BOOT_PACKAGES, *packages})
    archive = machine_archive()
    key = root_key(wanted, archive)
    root = cache / f"root-{key}"
    with locked(cache / "lock"):
        if (root / "etc" / "os-release").exists():
            log.info("cached root %s (%s)", root, " ".join(wanted))
            return root
        for stale in cache.glob("root-*"):
            if stale.suffix == ".used":
                continue
            used = _used(stale)
            age = time.time() - (used if used.exists() else stale).stat().st_mtime
            if stale.suffix == ".new" or age > STALE_AFTER:
                log.info("removing %s (last used %.0f h ago)", stale, age / 3600)
                remove_tree(stale)
                used.unlink(missing_ok=True)
        started = time.monotonic()
        _bootstrap(cache / f"root-{key}.new", wanted, archive, cache)
        (cache / f"root-{key}.new").rename(root)
        _used(root).touch()
        log.info("built %s in %.0f s", root, time.monotonic() - started)
    return root


def _bootstrap(target: Path, packages: Sequence[str], archive: Archive, cache: Path) -> None:
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    logfile = cache / "debootstrap.log"
    log.info("debootstrap %s (minbase + %s) from %s", SUITE, " ".join(packages), archive.mirror)
    # debootstrap mounts proc and sys in the target: in a private mount
    # namespace they end with it, even if it is killed.
    argv = [
        "unshare", "--mount", "--propagation", "private", "--",
        "debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
        f"--cache-dir={debs}", f"--keyring={archive.keyring}",
        SUITE, str(target), archive.mirror,
    ]  # fmt: skip
    remove_tree(target)
    try:
        proc = _run(argv, check=False, timeout=1800)
        logfile.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, f"(see {logfile})\n", proc.stderr)
        etc = target / "etc"
        (etc / "apt" / "sources.list").write_text("\n".join(archive.sources) + "\n")
        # No documentation, manual pages or translations, as in the guest image.
        (etc / "dpkg" / "dpkg.cfg.d" / "01-ivloop-nodoc").write_text(
            "path-exclude=/usr/share/doc/*\npath-include=/usr/share/doc/*/copyright\n"
            "path-exclude=/usr/share/man/*\npath-exclude=/usr/share/info/*\n"
        )
        (etc / "hostname").write_text("ivloop-test\n")
        # Empty: systemd makes a transient machine ID at each boot.
        (etc / "machine-id").write_text("")
        for leftover in (target / "var" / "cache" / "apt" / "archives").glob("*.deb"):
            leftover.unlink()
    except BaseException:
        remove_tree(target)
        raise


_copies = itertools.count()


@contextlib.contextmanager
def fresh_root(pristine: Path, name: str | None = None) -> Iterator[Path]:
    """A private copy of ``pristine`` (cp -a), removed on the way out."""
    runs = pristine.parent / "run"
    runs.mkdir(exist_ok=True)
    copy = runs / (name or f"root-{os.getpid()}-{next(_copies)}")
    remove_tree(copy)
    started = time.monotonic()
    try:
        # Under the cache's lock: no build removes the root while it is copied.
        with locked(pristine.parent / "lock"):
            if not (pristine / "etc" / "os-release").exists():
                raise NspawnError(f"{pristine} is gone (call cached_root again)")
            _run(["cp", "-a", "--", str(pristine), str(copy)], timeout=600)
            _used(pristine).touch()
        log.info("copied %s to %s in %.1f s", pristine.name, copy, time.monotonic() - started)
        yield copy
    finally:
        remove_tree(copy)


# -- commands in a root: chroot -------------------------------------------


@dataclass(frozen=True)
class Chroot:
    """Commands in an unbooted root: chroot, in a private mount namespace with /proc."""

    root: Path

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        # The proc mount lives in the namespace unshare makes, and dies with
        # it: there is nothing to unmount, on any path.
        wrapper = [
            "unshare", "--mount", "--propagation", "private", "--",
            "chroot", str(self.root), "/bin/sh", "-c",
            'mount -t proc proc /proc && exec "$@"', "sh", *argv,
        ]  # fmt: skip
        return _run(wrapper, check=check, input=input, env=BASE_ENV, timeout=timeout, shown=argv)

    def install_deb(self, deb: Path) -> subprocess.CompletedProcess[str]:
        """``dpkg -i`` a package file (copied into the root's /tmp and removed after)."""
        inside = Path("/tmp") / deb.name
        shutil.copy2(deb, self.root / inside.relative_to("/"))
        try:
            return self.run("dpkg", "-i", str(inside))
        finally:
            (self.root / inside.relative_to("/")).unlink(missing_ok=True)


# -- what is in a root ----------------------------------------------------

# Paths whose contents change with any dpkg run or boot: not the package's.
IGNORED = (
    "/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/log",
    "/var/cache/apt", "/var/cache/debconf", "/var/cache/ldconfig",
    "/var/lib/dpkg", "/var/lib/apt",
)  # fmt: skip


@dataclass(frozen=True)
class Entry:
    kind: str  # "d", "f", "l" (symlink, with its target) or "o"
    mode: int
    owner: tuple[int, int]
    detail: str  # a symlink's target; a file's sha256 under /etc; else ""


@dataclass
class Snapshot:
    """Every path in a root with its type, mode and owner (and /etc's contents)."""

    entries: dict[str, Entry] = field(default_factory=dict)

    @classmethod
    def of(cls, root: Path, ignored: Sequence[str] = IGNORED) -> Self:
        snap = cls()
        for dirpath, dirnames, filenames in os.walk(root):
            rel = "/" if dirpath == str(root) else "/" + os.path.relpath(dirpath, root)
            dirnames[:] = [d for d in dirnames if os.path.join(rel, d) not in ignored]
            for name in itertools.chain(dirnames, filenames):
                path = os.path.join(rel, name)
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                detail = ""
                if stat.S_ISLNK(st.st_mode):
                    kind, detail = "l", os.readlink(full)
                elif stat.S_ISDIR(st.st_mode):
                    kind = "d"
                elif stat.S_ISREG(st.st_mode):
                    kind = "f"
                    if path.startswith("/etc/"):
                        detail = hashlib.sha256(Path(full).read_bytes()).hexdigest()
                else:
                    kind = "o"
                snap.entries[path] = Entry(kind, stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid),
                                           detail)  # fmt: skip
        return snap

    def diff(self, later: Snapshot) -> Diff:
        before, after = self.entries, later.entries
        return Diff(
            added=sorted(after.keys() - before.keys()),
            removed=sorted(before.keys() - after.keys()),
            changed=sorted(p for p in before.keys() & after.keys() if before[p] != after[p]),
        )


@dataclass(frozen=True)
class Diff:
    added: list[str]
    removed: list[str]
    changed: list[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def __str__(self) -> str:
        lines = [f"+ {p}" for p in self.added]
        lines += [f"- {p}" for p in self.removed]
        lines += [f"~ {p}" for p in self.changed]
        return "\n".join(lines) or "(no difference)"


# -- a booted root: systemd-nspawn ----------------------------------------

_machines = itertools.count()


def machine_name(tag: str = "ivl") -> str:
    """A machine name unique on this host (pid and a counter), valid as a hostname."""
    return f"{tag}-{os.getpid()}-{next(_machines)}"[:64]


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _ns_pid(pid: int) -> list[int]:
    """The PID of ``pid`` in each nested PID namespace (NSpid of /proc/PID/status)."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


class Machine:
    """A root booted by ``systemd-nspawn -b``: the nspawn process and the container's init.

    States: created -> started (nspawn running) -> running (systemd says
    running or degraded) -> stopped.  Only :meth:`run` and :meth:`wait_running`
    talk to the inside; :meth:`stop` is safe to call in any state.
    """

    def __init__(self, root: Path, name: str, console_log: Path) -> None:
        self.root = root
        self.name = name
        self.console_log = console_log
        self.log = log.getChild(name)
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None
        self.init_pid: int | None = None
        self.boot_seconds: float | None = None
        self._started = 0.0

    @property
    def nspawn_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        if self._proc is not None:
            raise NspawnError(f"{self.name} already started")
        argv = [
            "systemd-nspawn", "--boot", f"--directory={self.root}",
            f"--machine={self.name}", "--register=no", "--keep-unit",
            "--private-network", "--console=read-only", "--link-journal=no",
            "--resolv-conf=off", "--timezone=off",
        ]  # fmt: skip
        env = {**BASE_ENV, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "0"}
        self._console = self.console_log.open("wb")
        self._started = time.monotonic()
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._console, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip
        self.log.info("systemd-nspawn started, pid %d (console: %s)", self._proc.pid,
                      self.console_log)  # fmt: skip

    def _console_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.console_log.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def _find_init(self) -> int | None:
        """The container's PID 1: the nspawn child that is PID 1 in its own namespace."""
        if self._proc is None:
            return None
        for kid in _children(self._proc.pid):
            ns = _ns_pid(kid)
            if len(ns) >= 2 and ns[-1] == 1:
                return kid
        return None

    def wait_running(self, timeout: float = 90.0) -> str:
        """Wait until ``systemctl is-system-running`` answers running or degraded."""
        if self._proc is None:
            raise NspawnError(f"{self.name} not started")
        deadline = time.monotonic() + timeout
        state = "(no answer)"
        while True:
            if self._proc.poll() is not None:
                raise BootError(f"systemd-nspawn exited {self._proc.returncode} during boot:\n"
                                f"{self._console_tail()}")  # fmt: skip
            if self.init_pid is None:
                self.init_pid = self._find_init()
            if self.init_pid is not None:
                proc = self.run("systemctl", "is-system-running", check=False, timeout=10)
                state = proc.stdout.strip() or proc.stderr.strip()
                if state in ("running", "degraded"):
                    break
            if time.monotonic() > deadline:
                raise BootError(f"{self.name}: no running system after {timeout:.0f} s "
                                f"(last: {state}):\n{self._console_tail()}")  # fmt: skip
            time.sleep(0.2)
        self.boot_seconds = time.monotonic() - self._started
        self.log.info("booted in %.1f s: %s (init pid %d)", self.boot_seconds, state,
                      self.init_pid)  # fmt: skip
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            self.log.warning("degraded; failed units:\n%s", failed)
        return state

    def run(
        self,
        *argv: str,
        check: bool = True,
        user: str | None = None,
        input: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in all the container's namespaces (as ``user``: its uid, gid, groups)."""
        if self.init_pid is None:
            raise NspawnError(f"{self.name}: not booted")
        inner = list(argv)
        if user is not None:
            inner = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                     "--reset-env", "--", *inner]  # fmt: skip
        wrapper = ["nsenter", f"--target={self.init_pid}", "--all", "--",
                   "env", "-i", *(f"{k}={v}" for k, v in BASE_ENV.items()), *inner]  # fmt: skip
        shown = [f"[{self.name}{'/' + user if user else ''}]", *argv]
        return _run(wrapper, check=check, input=input, timeout=timeout, shown=shown)

    def stop(self, timeout: float = 30.0) -> None:
        """Power off; failing that, SIGTERM then SIGKILL our nspawn and the container's init."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None and self.init_pid is not None:
                with contextlib.suppress(NspawnError, subprocess.TimeoutExpired):
                    self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
                    proc.wait(timeout)
            if proc.poll() is None:
                self.log.warning("still up after poweroff; SIGTERM to nspawn %d", proc.pid)
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
            if proc.poll() is None:
                # The container's init first: killing PID 1 of its namespace
                # ends every process in it; then the nspawn we started.
                init = self._find_init()
                if init is not None and init == self.init_pid:
                    self.log.warning("SIGKILL to the container's init %d", init)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(init, signal.SIGKILL)
                self.log.warning("SIGKILL to nspawn %d", proc.pid)
                proc.kill()
                proc.wait(timeout)
            self.log.info("stopped (nspawn exit status %s)", proc.returncode)
        finally:
            if self._console is not None:
                self._console.close()
                self._console = None
            self._proc = None
            self.init_pid = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def booted(root: Path, console_log: Path, name: str | None = None,
           timeout: float = 90.0) -> Iterator[Machine]:  # fmt: skip
    """Boot ``root`` and yield the running machine; stopped on every path."""
    with Machine(root, name or machine_name(), console_log) as machine:
        machine.start()
        machine.wait_running(timeout)
        yield machine


# -- a package's dependencies ---------------------------------------------


def deb_field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()


def parse_depends(*fields: str) -> list[str]:
    """Package names in Depends-style fields: each clause's first alternative, no versions."""
    names: set[str] = set()
    for text in fields:
        for clause in filter(None, (c.strip() for c in text.split(","))):
            first = clause.split("|")[0].strip()
            name = re.split(r"[\s(\[<]", first, maxsplit=1)[0].split(":")[0]
            if name:
                names.add(name)
    return sorted(names)


def deb_depends(deb: Path) -> list[str]:
    """What a .deb's Pre-Depends and Depends name (see :func:`parse_depends`).

    Installed at root-cache time, so that ``dpkg -i`` needs no network.
    """
    return parse_depends(deb_field(deb, "Pre-Depends"), deb_field(deb, "Depends"))


def main() -> int:
    """Build (or find) the pristine root test_host_package.py boots: ``make nspawn-root``.

    The Makefile runs this while the guest images build, so the
    debootstrap's downloads and the images' work overlap instead of the
    first package test waiting for it.
    """
    logging.basicConfig(level=logging.INFO, format="nspawn: %(message)s")
    started = time.monotonic()
    root = cached_root(deb_depends(debs.built().host))
    log.info("root %s ready in %.0f s", root, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
