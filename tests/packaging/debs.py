"""The Debian packages ``make deb`` builds into build/deb/, built on demand.

:func:`built` runs ``make deb`` (a no-op, a fraction of a second, when no
input changed since the last build; about 20 s when one did; it installs
the tools it needs with apt) and returns the packages of VERSION.  The
Makefile holds a lock on build/deb/ while it builds, so xdist workers and a
concurrent ``make deb`` share one build.  A failed build fails the caller
with make's output: the Makefile installs everything the build needs, so
a missing tool is a bug, not a reason to skip.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..kernel_headers import build_env

REPO = Path(__file__).resolve().parents[2]
DEB_DIR = REPO / "build" / "deb"
#: The binary packages of the ivloop source package.
PACKAGES = ("ivloop-host", "ivloop-guest")


def upstream_version() -> str:
    """VERSION, the one hand-written version."""
    return (REPO / "VERSION").read_text().strip()


@dataclass(frozen=True)
class Debs:
    version: str  # the Debian version, VERSION-1
    host: Path
    guest: Path
    changes: Path

    def of(self, package: str) -> Path:
        return {"ivloop-host": self.host, "ivloop-guest": self.guest}[package]


def built() -> Debs:
    """Run ``make deb`` and return its packages (VERSION-1), or fail."""
    proc = subprocess.run(["make", "-s", "--no-print-directory", "deb"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False,
                          env=build_env())
    if proc.returncode != 0:
        pytest.fail(f"make deb failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    version = f"{upstream_version()}-1"
    # the .changes is named for the build machine's architecture
    changes = sorted(DEB_DIR.glob(f"ivloop_{version}_*.changes"))
    debs = Debs(version=version,
                host=DEB_DIR / f"ivloop-host_{version}_all.deb",
                guest=DEB_DIR / f"ivloop-guest_{version}_all.deb",
                changes=changes[0] if changes else DEB_DIR / f"ivloop_{version}_ARCH.changes")
    missing = [p for p in (debs.host, debs.guest, debs.changes) if not p.is_file()]
    if missing:
        pytest.fail(f"make deb succeeded but left no {', '.join(map(str, missing))}:\n"
                    f"{proc.stdout}")
    return debs


def field(deb: Path, name: str) -> str:
    """One control field of a .deb (dpkg-deb -f), '' when absent."""
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()


def contents(deb: Path) -> dict[str, str]:
    """Every path in a .deb's data (dpkg-deb -c), absolute, mapped to its mode string."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    paths = {}
    for line in out.splitlines():
        # drwxr-xr-x root/root 0 2026-12-07 17:55 ./usr/ [-> target]
        mode, _owner, _size, _date, _time, name = line.split(None, 5)
        name = name.split(" -> ", 1)[0]
        paths["/" + name.removeprefix("./").rstrip("/")] = mode
    return paths


def control_file(deb: Path, name: str, dest: Path) -> str:
    """A control-area file (conffiles, postinst...) of a .deb, '' when absent."""
    target = dest / f"control-{deb.name}"
    if not target.exists():
        subprocess.run(["dpkg-deb", "-e", str(deb), str(target)], timeout=60, check=True)
    path = target / name
    return path.read_text() if path.exists() else ""


def extract(deb: Path, dest: Path) -> Path:
    """The .deb's data unpacked under @dest (dpkg-deb -x, no maintainer scripts)."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], timeout=60, check=True)
    return dest


def member_text(deb: Path, path: str) -> str:
    """The text of one file in a .deb's data, by its absolute path."""
    proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          timeout=60, check=True)
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        member = tar.extractfile("." + path)
        assert member is not None, f"{path} is not a regular file in {deb.name}"
        return member.read().decode()
