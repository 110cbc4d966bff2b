"""The kernel-log check matches real trouble only."""

from __future__ import annotations

import pytest

from harness.experiments.soak import KERNEL_TROUBLE

QUIET = [
    "[    0.081234] smpboot: Total of 2 processors activated (7983.42 BogoMIPS)",
    "[    0.000000] Calibrating delay loop (skipped), value calculated using timer "
    "frequency.. 3991.71 BogoMIPS (lpj=7983424)",
    "[    0.052000] x86: Booting SMP configuration: ... loops_per_jiffy",
    "[    0.052101] smp: Brought up 1 node, 2 CPUs; loops_per_jiffy 7983424",
    "[    1.2] ivloop: warning threshold set",
]
TROUBLE = [
    "[   12.3] Oops: general protection fault, probably for non-canonical address",
    "[   12.3] Oops: 0000 [#1] PREEMPT SMP NOPTI",
    "[   12.3] WARNING: CPU: 1 PID: 42 at drivers/net/ivloop/ivl_netdev.c:99 ivl_xmit",
    "[   12.3] BUG: kernel NULL pointer dereference, address: 0000000000000008",
    "[   12.3] Kernel panic - not syncing: Fatal exception",
    "[   12.3] Call Trace:",
    "[   12.3] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!",
    "[   12.3] INFO: task ivl-poll:99 blocked for more than 120 seconds.",
    "[   12.3] refcount_t: underflow; use-after-free.",
]


@pytest.mark.parametrize("line", QUIET)
def test_boot_lines_are_not_trouble(line: str) -> None:
    assert not KERNEL_TROUBLE.search(line)


@pytest.mark.parametrize("line", TROUBLE)
def test_trouble_lines_are_trouble(line: str) -> None:
    assert KERNEL_TROUBLE.search(line)
