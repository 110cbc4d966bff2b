"""QEMU processes: command lines from a template, launch, QMP.

:func:`render` turns a :class:`LaunchSpec` into a command line from
``templates/qemu.j2``, :func:`launch` starts QEMU inside its host's
namespace (detached, so VMs outlive the CLI call that booted them), and
:class:`Monitor` and :func:`qmp_run` talk QMP through ``qemu.qmp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from qemu.qmp import EventListener, QMPClient
from qemu.qmp import QMPError as _QMPLibError

from . import procs
from .errors import LaunchError, QMPError
from .state import ProcRecord
from .topology import VMSpec

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


def render(spec: LaunchSpec) -> list[str]:
    """The QEMU argv for *spec*; every argument on its own template line."""
    text = _env.get_template("qemu.j2").render(
        vm=spec.vm, kernel=spec.kernel, initrd=spec.initrd, accel_args=spec.accel_args,
        memory=spec.memory, console=spec.console, qmp=spec.qmp, pidfile=spec.pidfile, tap=spec.tap,
        ssh_port=spec.ssh_port, ssh_key=spec.ssh_key.replace(" ", ":"),
        ivshmem_socket=spec.ivshmem_socket, incoming=spec.incoming,
        lower_only=spec.lower_only,
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

    def __init__(self, path: Path, name: str = "harness") -> None:
        self.path = path
        self.client = QMPClient(name)

    async def __aenter__(self) -> Monitor:
        try:
            await asyncio.wait_for(self.client.connect(str(self.path)), timeout=10)
        except (OSError, TimeoutError, _QMPLibError) as exc:
            raise QMPError(f"cannot connect to QMP at {self.path}: {exc}") from exc
        return self

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
