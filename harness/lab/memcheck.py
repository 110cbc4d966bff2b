"""ivl-memcheck in a guest: does its memory keep every write across moves?

The writer (``images/ivl-memcheck.c``) sweeps locked memory, checking that
each page still holds the previous sweep's store.  Start it before the
migrations, stop it after: a store the migration lost, or a guest that died
on arrival, shows here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.errors import GuestError
from harness.lab.guest import Guest

OUT = "/tmp/ivl-memcheck.out"
SUMMARY = re.compile(r"^ivl-memcheck: sweeps (\d+) pages (\d+) lost (\d+) stray (\d+)$",
                     re.MULTILINE)


@dataclass(frozen=True)
class Result:
    sweeps: int
    pages: int
    lost: int
    stray: int
    detail: str  # the writer's report, bad pages first

    @property
    def ok(self) -> bool:
        return not self.lost and not self.stray


def parse(text: str) -> Result | None:
    """The writer's summary in *text*, or None if it has not printed one."""
    m = SUMMARY.search(text)
    if m is None:
        return None
    sweeps, pages, lost, stray = (int(x) for x in m.groups())
    return Result(sweeps, pages, lost, stray, text.strip())


def start(g: Guest, mib: int = 16, pause_ms: int = 10) -> int:
    """Start the writer in *g*; return its PID there."""
    return int(g.run(f"ivl-memcheck -m {mib} -p {pause_ms} >{OUT} 2>&1 </dev/null & echo $!"))


def stop(g: Guest, pid: int) -> Result:
    """Stop the writer *pid* in *g* and read its verdict.

    Raises :class:`GuestError` if it is gone: its guest rebooted (a panic)
    or something killed it, and the writes it made cannot be checked.
    """
    status, text = g.status(f"kill {pid}")
    if status != 0:
        # its own last words if it failed to start; none if the guest rebooted
        _, said = g.status(f"cat {OUT}")
        raise GuestError(g.vm, f"kill {pid}", status,
                         f"ivl-memcheck is not running (did the guest reboot?): {text} {said}")
    text = g.run(f"for i in $(seq 50); do grep -q sweeps {OUT} && break; sleep 0.1; done; "
                 f"cat {OUT}")
    result = parse(text)
    if result is None:
        raise GuestError(g.vm, f"cat {OUT}", None, "ivl-memcheck printed no summary: " + text)
    return result
