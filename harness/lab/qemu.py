"""QEMU processes: which binary, command lines from a template, launch, QMP.

:func:`probe` checks the QEMU binary a topology runs (``harness up --qemu``,
``$IVLOOP_QEMU``, or ``qemu-system-x86_64`` from ``PATH``) and reads its
version, which decides the version-dependent workarounds (see
:class:`Binary`).  :func:`render` turns a :class:`LaunchSpec` into a command
line from ``templates/qemu.j2``, :func:`launch` starts QEMU inside its host's
namespace (detached, so VMs outlive the CLI call that booted them), and
:class:`Monitor` and :func:`qmp_run` talk QMP through ``qemu.qmp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from qemu.qmp import EventListener, QMPClient
from qemu.qmp import QMPError as _QMPLibError

from harness.errors import LaunchError, QemuBinaryError, QMPError
from harness.lab import procs
from harness.lab.state import ProcRecord
from harness.lab.topology import VMSpec

log = logging.getLogger(__name__)

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("harness", "templates"),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,  # renders a command line, not HTML
)

IVSHMEM_ID = "ivshmem0"
IVSHMEM_CHARDEV = "ivsh0"
IVSHMEM_ADDR = "0x5"

DEFAULT_BINARY = "qemu-system-x86_64"  # looked up on PATH
BINARY_ENV = "IVLOOP_QEMU"
PROBE_TIMEOUT = 15.0


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int
    micro: int = 0

    @classmethod
    def parse(cls, text: str) -> Version:
        """``QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)`` -> 10.0.2.

        Raises ValueError when *text* is not QEMU's version banner.
        """
        m = re.match(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?", text.strip())
        if m is None:
            raise ValueError(f"not a QEMU version banner: {text.strip()[:80]!r}")
        return cls(int(m[1]), int(m[2]), int(m[3] or 0))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"


#: The oldest QEMU the harness runs: Debian 12's, the oldest its template,
#: QMP use and workarounds are tested with.  Anything older is refused at
#: ``harness up`` rather than failing half-way through a boot or a migration.
MIN_VERSION = Version(7, 2)
#: Upstream 03bfc2188f ("physmem: Fix migration dirty bitmap coherency with
#: TCG memory access") is in 9.0: from there on TCG guests get their plain
#: RAM size (see accel.Choice.memory_arg).
TCG_DIRTY_SYNC_FIXED = Version(9, 0)

#: What the harness does that needs more than MIN_VERSION, with the version
#: that first has it; checked by :meth:`Binary.require` before anything starts.
FEATURES: dict[str, tuple[Version, str]] = {
    "harness": (MIN_VERSION, "ivloop's harness (its QEMU template and QMP use)"),
}


@dataclass(frozen=True)
class Binary:
    """A QEMU binary the harness runs, as :func:`probe` found it.

    Version-dependent workarounds ask it: the TCG RAM padding applies below
    9.0 only (:attr:`tcg_loses_dirty_writes`).  The ivshmem workarounds apply
    on every version, since the code they avoid is unchanged upstream
    (``hw/misc/ivshmem-pci.c``): "peer left" messages are not sent and a
    departed peer's ID is handed on only with its eventfds (ivloop-server),
    and the fds an unplug frees are parked (harness.backends.qmp.unplug_ivshmem).
    """

    path: str  # absolute, or a bare name found on PATH made absolute
    version: Version
    banner: str  # first line of `PATH --version`

    @property
    def tcg_loses_dirty_writes(self) -> bool:
        """Whether TCG migration may lose writes to RAM of a multiple of 64 pages."""
        return self.version < TCG_DIRTY_SYNC_FIXED

    def require(self, feature: str) -> None:
        """Refuse with one line when this QEMU is older than *feature* needs."""
        need, what = FEATURES[feature]
        if self.version < need:
            raise QemuBinaryError(
                f"QEMU {self.version} ({self.path}) is too old for {what}: it needs QEMU "
                f"{need.major}.{need.minor} or later; give a newer one with --qemu PATH "
                f"or ${BINARY_ENV} (make qemu-10 unpacks QEMU 10.0)")


def selected(path: str | os.PathLike[str] | None = None) -> str:
    """The QEMU to use: *path* if given, else ``$IVLOOP_QEMU``, else the default."""
    if path is not None and str(path):
        return str(path)
    return os.environ.get(BINARY_ENV) or DEFAULT_BINARY


def probe(path: str | os.PathLike[str] | None = None) -> Binary:
    """Check that *path* (see :func:`selected`) is a QEMU this harness can run.

    Runs ``PATH --version`` once.  Anything else (missing, a directory, not
    executable, not a QEMU, older than :data:`MIN_VERSION`) raises
    :class:`QemuBinaryError` with one line saying which and what to do.
    """
    given = selected(path)
    where = "$" + BINARY_ENV if path is None and os.environ.get(BINARY_ENV) else "--qemu"
    if "/" not in given:
        found = shutil.which(given)
        if found is None:
            hint = ("install Debian's qemu-system-x86 (make deps) or give --qemu PATH"
                    if given == DEFAULT_BINARY else f"give a path ({where} {given})")
            raise QemuBinaryError(f"QEMU '{given}' is not on PATH; {hint}")
        given = found
    full = os.path.abspath(given)
    if os.path.isdir(full):
        raise QemuBinaryError(f"{where} {given} is a directory, not a QEMU binary "
                              "(e.g. build/qemu-10/bin/qemu-system-x86_64)")
    if not os.path.exists(full):
        raise QemuBinaryError(f"{where} {given}: no such file"
                              + ("; run 'make qemu-10' first" if "qemu-10" in given else ""))
    if not os.access(full, os.X_OK):
        raise QemuBinaryError(f"{where} {given} is not executable")
    try:
        res = subprocess.run([full, "--version"], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise QemuBinaryError(f"{where} {given} is not a QEMU: '--version' got no answer "
                              f"in {PROBE_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise QemuBinaryError(f"{where} {given} does not run: {exc.strerror}") from exc
    said = (res.stdout.strip() or res.stderr.strip()).splitlines()
    banner = said[0].strip() if said else ""
    try:
        version = Version.parse(banner)
    except ValueError:
        told = f"printed '{banner[:80]}'" if banner else "printed nothing"
        raise QemuBinaryError(f"{where} {given} is not a QEMU: '{given} --version' {told} "
                              f"(exit status {res.returncode})") from None
    binary = Binary(path=full, version=version, banner=banner)
    binary.require("harness")
    return binary


@dataclass(frozen=True)
class LaunchSpec:
    vm: VMSpec
    kernel: Path
    initrd: Path
    accel_args: list[str]
    memory: str  # the -m value (Choice.memory_arg)
    console: Path
    qmp: Path
    pidfile: Path
    tap: str
    ssh_port: int
    ssh_key: str
    ivshmem_socket: Path | None = None
    incoming: bool = False
    lower_only: bool = False
    vhost_net: bool = False  # the data NIC's tap: vhost=on (accel.Choice.vhost_net)
    binary: str = DEFAULT_BINARY  # Binary.path of the topology's QEMU
    # The root disk of a systemd guest (guestdisk): boots from it, not from
    # an initramfs with the harness's ivl.* parameters.
    disk: Path | None = None


def render(spec: LaunchSpec) -> list[str]:
    """The QEMU argv for *spec*; every argument on its own template line."""
    text = _env.get_template("qemu.j2").render(
        binary=spec.binary,
        vm=spec.vm, kernel=spec.kernel, initrd=spec.initrd, accel_args=spec.accel_args,
        memory=spec.memory, console=spec.console, qmp=spec.qmp, pidfile=spec.pidfile, tap=spec.tap,
        ssh_port=spec.ssh_port, ssh_key=spec.ssh_key.replace(" ", ":"),
        ivshmem_socket=spec.ivshmem_socket, incoming=spec.incoming,
        lower_only=spec.lower_only, vhost_net=spec.vhost_net, disk=spec.disk,
    )  # fmt: skip
    return [line.strip() for line in text.splitlines() if line.strip()]


def launch(argv: list[str], netns: str, logfile: Path, pidfile: Path, timeout: float = 30) -> int:
    """Start QEMU in *netns*, detached; return its PID once QMP is listening."""
    full = ["ip", "netns", "exec", netns, *argv]
    pid = procs.spawn_detached(full, logfile)
    qmp = Path(argv[argv.index("-qmp") + 1].split(",")[0].removeprefix("unix:"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = procs.exit_status(pid)
        if code is not None:
            raise LaunchError("QEMU exited during start-up", full, code, _tail(logfile))
        if qmp.exists() and pidfile.exists():
            # `ip netns exec` execs QEMU, so the child's PID is QEMU's.
            return pid
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    procs.reap(pid)
    raise LaunchError(f"QEMU did not open its QMP socket in {timeout:.0f} s", full, None,
                      _tail(logfile))


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def terminate(proc: ProcRecord, timeout: float = 10) -> bool:
    """Stop a recorded process: SIGTERM, then SIGKILL.  Only if it is still ours."""
    if not proc.alive():
        procs.reap(proc.pid)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.reap(proc.pid)
        if not proc.alive():
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    while proc.alive():
        procs.reap(proc.pid)
        time.sleep(0.05)
    return True


class Monitor:
    """An async QMP session: ``async with Monitor(path) as mon: ...``."""

    #: Seconds a fresh QEMU may refuse connections (see __aenter__).
    connect_timeout = 10.0

    def __init__(self, path: Path, name: str = "harness") -> None:
        self.path = path
        self.client = QMPClient(name)

    async def __aenter__(self) -> Monitor:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                await asyncio.wait_for(self.client.connect(str(self.path)),
                                       timeout=max(0.1, deadline - time.monotonic()))
                return self
            except (OSError, TimeoutError, _QMPLibError) as exc:
                # QEMU binds its QMP socket before it listens: on a loaded
                # host a fresh QEMU can refuse for a moment (launch() waits
                # for the file, not the listen).
                refused = isinstance(getattr(exc, "exc", exc), ConnectionRefusedError)
                if not refused or time.monotonic() >= deadline:
                    raise QMPError(f"cannot connect to QMP at {self.path}: {exc}") from exc
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        # A QEMU that died under us makes disconnect() re-raise the reader's
        # EOFError; the caller's own error (if any) is the one that matters.
        with contextlib.suppress(EOFError, OSError, _QMPLibError):
            await self.client.disconnect()

    async def cmd(self, name: str, args: Mapping[str, object] | None = None,
                  timeout: float = 30) -> Any:
        try:
            return await asyncio.wait_for(self.client.execute(name, args), timeout)
        except TimeoutError:
            raise QMPError(f"QMP {name} got no answer in {timeout:.0f} s") from None
        except (_QMPLibError, EOFError, ConnectionError) as exc:
            raise QMPError(f"QMP {name} failed: {exc or 'QEMU closed the monitor'}") from exc

    def listener(self, *names: str) -> AbstractContextManager[EventListener]:
        """Register for events *before* triggering them; use as a context manager."""
        return self.client.listener(names or None)

    async def wait_event(self, listener: EventListener, timeout: float,
                         match: Mapping[str, object] | None = None) -> dict[str, Any]:
        """Wait for the next event from *listener* whose data contains *match*."""
        async def next_match() -> dict[str, Any]:
            while True:
                event = await listener.get()
                raw = event.get("data")
                data: dict[str, Any] = raw if isinstance(raw, dict) else {}
                if not match or all(data.get(k) == v for k, v in match.items()):
                    return dict(event)
        try:
            return await asyncio.wait_for(next_match(), timeout)
        except TimeoutError:
            raise QMPError(f"no {match or 'matching'} event within {timeout:.0f} s") from None


def qmp_run(path: Path, name: str, args: Mapping[str, object] | None = None) -> Any:
    """One synchronous QMP command."""
    async def go() -> Any:
        async with Monitor(path) as mon:
            return await mon.cmd(name, args)
    return asyncio.run(go())
