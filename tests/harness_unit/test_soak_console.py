"""soak reads the guests' serial consoles: a panicked guest reboots with a clean dmesg."""

from __future__ import annotations

import os
from pathlib import Path

from harness.experiments.soak import console_trouble

PANIC = """[  393.613465] list_del corruption. next->prev should be fffd5582c03d4808
[  393.617345] kernel BUG at lib/list_debug.c:62!
[  393.630748] Kernel panic - not syncing: Fatal exception in interrupt
ivloop-init: READY name=vm2 data=ivl0 ip=10.77.0.2/24
"""


def test_a_panic_in_a_console_log_is_reported(tmp_path: Path) -> None:
    (tmp_path / "console-vm2-g14.log").write_text(PANIC)
    (tmp_path / "console-vm1.log").write_text("ivloop-init: READY name=vm1\n")
    found = console_trouble(tmp_path, since=0)
    assert list(found) == ["console-vm2-g14.log"]
    assert any("kernel BUG" in line for line in found["console-vm2-g14.log"])


def test_console_logs_from_before_the_soak_are_ignored(tmp_path: Path) -> None:
    old = tmp_path / "console-evil.log"
    old.write_text(PANIC)
    os.utime(old, (1000, 1000))
    assert console_trouble(tmp_path, since=2000) == {}


def test_a_missing_logs_directory_finds_nothing(tmp_path: Path) -> None:
    assert console_trouble(tmp_path / "nope", since=0) == {}
