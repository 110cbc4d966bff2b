"""Build ivloop.ko out of tree with W=1 for every supported guest kernel
(Debian 12's 6.1 and bookworm-backports' 6.12) and require a warning-free
build, the right vermagic and metadata, and checkpatch-clean sources.

The sources are copied into a temporary directory per kernel, so parallel
runs (xdist) and a developer's in-tree build never share object files.
Missing headers fail (kernel_headers.py says why and what to run).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .kernel_headers import (
    DRIVER,
    REPO,
    SERIES,
    build_env,
    copy_sources,
    headers,
    modinfo,
    package_version,
)

# Our files; ivl_ring.c, ivl_ring.h and ivl_abi.h have their own checks.
CHECKPATCH_FILES = ("ivl_main.c", "ivl_pci.c", "ivl_netdev.c", "ivl_ethtool.c", "ivl_core.c",
                    "ivl_peer.c", "ivl_poll.c",
                    "ivl_ring.c", "ivl_meta.c", "ivl.h", "ivl_ring.h", "ivl_meta.h")
#: Headers shared with user space, checked with --ignore PREFER_KERNEL_TYPES
#: (guest-driver/Makefile's ABI_HDRS says why).
CHECKPATCH_ABI_HDRS = ("ivl_abi.h",)
#: The kernel-version compatibility header, checked with --ignore
#: LINUX_VERSION_CODE (its own comment says why).
CHECKPATCH_COMPAT_HDRS = ("ivl_compat.h",)
CHECKPATCH_CANDIDATES = (
    str(REPO / "build/linux-source-6.1/scripts/checkpatch.pl"),  # make deps
    "/tmp/linux-source-6.1/scripts/checkpatch.pl",
    "/usr/src/linux-source-6.1/scripts/checkpatch.pl",
)
WARNING_RE = re.compile(r"\b(warning|error):", re.IGNORECASE)
VERSION_RE = re.compile(r"\b(LINUX_VERSION_CODE|KERNEL_VERSION|IVL_KERNEL_AT_LEAST)\b")


@pytest.fixture(scope="module", params=SERIES)
def build(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, str]:
    """Build once per kernel series; return (ABI, build dir, make output)."""
    hdr = headers(request.param)
    work = copy_sources(tmp_path_factory.mktemp(f"ivloop-build-{hdr.series}"))
    proc = subprocess.run(
        ["make", "-C", str(work), f"KDIR={hdr.kdir}", "modules"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=build_env(),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"module build for {hdr.abi} failed:\n{output}"
    assert "W=1" in output, "the build did not run with W=1"
    return hdr.abi, work, output


def test_builds_without_warnings(build: tuple[str, Path, str]) -> None:
    abi, work, output = build
    assert (work / "ivloop.ko").is_file()
    lines = [line for line in output.splitlines() if WARNING_RE.search(line)]
    assert not lines, f"W=1 build for {abi} is not warning-free:\n" + "\n".join(lines)


def test_module_is_for_that_kernel(build: tuple[str, Path, str]) -> None:
    abi, work, _ = build
    assert modinfo(work / "ivloop.ko", "vermagic").split()[0] == abi


def test_module_metadata(build: tuple[str, Path, str]) -> None:
    """The module binds 1af4:1110, autoloads for `type ivloop`, carries the
    version VERSION states, and has exactly the documented parameters."""
    _, work, _ = build
    info = subprocess.run(
        ["modinfo", str(work / "ivloop.ko")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "alias:          pci:v00001AF4d00001110" in info
    assert "alias:          rtnl-link-ivloop" in info
    assert re.search(r"^license:\s+GPL$", info, re.MULTILINE)
    assert re.search(rf"^version:\s+{re.escape(package_version())}$", info, re.MULTILINE)
    parms = re.findall(r"^parm:\s+(\S+):", info, re.MULTILINE)
    assert set(parms) == {"force_lower", "stall_ms", "poll_us"}


def test_version_differences_live_in_ivl_compat_h() -> None:
    """No kernel-version test outside ivl_compat.h (issue 17)."""
    offenders = [f"{src.name}:{n}: {line.strip()}"
                 for src in sorted(DRIVER.glob("ivl*.[ch]"))
                 if src.name != "ivl_compat.h" and not src.name.endswith(".mod.c")
                 for n, line in enumerate(src.read_text().splitlines(), 1)
                 if VERSION_RE.search(line)]
    assert not offenders, "kernel-version tests outside ivl_compat.h:\n" + "\n".join(offenders)


@pytest.mark.parametrize(("files", "extra"), [
    (CHECKPATCH_FILES, ()),
    (CHECKPATCH_ABI_HDRS, ("--ignore", "PREFER_KERNEL_TYPES")),
    (CHECKPATCH_COMPAT_HDRS, ("--ignore", "LINUX_VERSION_CODE")),
])
def test_checkpatch_clean(files: tuple[str, ...], extra: tuple[str, ...]) -> None:
    checkpatch = next((c for c in CHECKPATCH_CANDIDATES if Path(c).is_file()), None)
    if checkpatch is None:
        pytest.skip("checkpatch.pl not found: run make deps")
    proc = subprocess.run(
        [
            "perl",
            checkpatch,
            "--strict",
            "--no-tree",
            "--quiet",
            *extra,
            "-f",
            *files,
        ],
        cwd=DRIVER,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
