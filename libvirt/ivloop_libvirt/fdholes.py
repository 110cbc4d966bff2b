"""Which fd numbers to fill after an ivshmem unplug, and when to give up.

No libvirt here: the harness imports this for its raw-QMP parking (see
:mod:`ivloop_libvirt.fdpark` for why the numbers must be filled).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

ROUNDS = 4


def holes(pid: int, numbers: set[int], fds_of: Callable[[int], set[int]]) -> Iterator[None]:
    """Yield once for each eventfd to hand QEMU now, until every free number
    in *numbers* is taken (QEMU's lowest-free allocation fills the holes
    below them first); after ROUNDS passes a warning names those left.
    *fds_of* lists a process's open fd numbers.  The plan of fdpark.park()
    and of the harness, which sends over raw QMP."""
    for _ in range(ROUNDS):
        now = fds_of(pid)
        free = numbers - now
        if not free:
            return
        for _ in [n for n in range(max(free) + 1) if n not in now]:
            yield
    left = numbers - fds_of(pid)
    if left:
        log.warning("QEMU pid %d: fd numbers %s freed by an ivshmem unplug stay free",
                    pid, sorted(left))
