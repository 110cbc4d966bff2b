"""`make lint`'s checkpatch covers every kernel source of the driver (issue 19)."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "guest-driver"
#: User-space only (the ring tests' shim), never built into the module.
NOT_KERNEL = {"ivl_user.h"}


def _sources() -> set[str]:
    return {p.name for p in DRIVER.glob("ivl*.[ch]")
            if not p.name.endswith(".mod.c")} - NOT_KERNEL


def test_make_checkpatch_checks_every_driver_source() -> None:
    dry = subprocess.run(["make", "-n", "-s", "-C", str(DRIVER), "checkpatch",
                          "CHECKPATCH=CHECKPATCH"], capture_output=True, text=True,
                         check=True).stdout
    checked = {word for line in dry.splitlines() if line.startswith("CHECKPATCH")
               for word in line.split() if word.endswith((".c", ".h"))}
    assert {"ivl_ring.c", "ivl_ring.h", "ivl_abi.h"} <= _sources()
    assert checked == _sources()


def test_the_checkpatch_test_checks_every_driver_source() -> None:
    # Read, not imported: tests/ is no package.
    tree = ast.parse((REPO / "tests/test_driver_build.py").read_text())
    lists = {t.id: ast.literal_eval(node.value) for node in tree.body
             if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name) and t.id.startswith("CHECKPATCH_")
             and t.id != "CHECKPATCH_CANDIDATES"}
    files = set().union(*lists.values())
    assert files == _sources()
