"""User-space tests of the shared-memory ring (guest-driver/ivl_ring.c).

The C tests live in tests/ring/ (see its Makefile); these wrappers run them
from pytest with build outputs under tmp_path, so they are xdist-safe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

RING_DIR = Path(__file__).resolve().parent / "ring"
FUZZ_SECONDS = int(os.environ.get("IVLOOP_FUZZ_SECONDS", "20"))


def _make(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-C", str(RING_DIR), f"BUILD={tmp_path / 'build'}", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def _libfuzzer_missing(tmp_path: Path) -> str | None:
    """Why clang cannot build a libFuzzer target here, or None if it can."""
    clang = shutil.which("clang")
    if clang is None:
        return "clang not found (make -C tests/ring deps)"
    probe = tmp_path / "probe.c"
    probe.write_text(
        "#include <stddef.h>\n#include <stdint.h>\n"
        "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n);\n"
        "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)\n"
        "{ (void)d; (void)n; return 0; }\n"
    )
    res = subprocess.run(
        [clang, "-fsanitize=fuzzer,address,undefined", str(probe), "-o", str(tmp_path / "probe")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        return "clang cannot link libFuzzer (install libclang-rt-14-dev): " + res.stderr[-500:]
    return None


def test_ring_check(tmp_path: Path) -> None:
    """Unit, litmus and stress tests plus regression replay, under ASan/UBSan."""
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.fail("gcc and make are required (make -C tests/ring deps)")
    res = _make(tmp_path, "check", timeout=600)
    assert res.returncode == 0, f"make check failed:\n{res.stdout}"
    assert "passed, 0 failed" in res.stdout, res.stdout


def test_ring_fuzz(tmp_path: Path) -> None:
    """A short libFuzzer run over hostile ring contents: no crash, no hang."""
    reason = _libfuzzer_missing(tmp_path)
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"fuzzer unavailable under CI: {reason}")
        pytest.skip(reason)
    res = _make(tmp_path, "fuzz", f"FUZZ_SECONDS={FUZZ_SECONDS}", timeout=FUZZ_SECONDS + 300)
    crashes = sorted((tmp_path / "build").glob("crash-*")) + sorted(
        (tmp_path / "build").glob("timeout-*")
    )
    assert res.returncode == 0 and not crashes, (
        f"fuzzer failed; reproducer(s): {[str(c) for c in crashes]} "
        f"(copy to tests/ring/regressions/ once fixed)\n{res.stdout[-20000:]}"
    )
