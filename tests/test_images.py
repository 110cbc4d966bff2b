"""images/: the kernel series parameter, the private apt configurations and
the modules the busybox guest carries.

Fast: nothing is built (an image `make image` left behind is read, if its
images/build is today's).  The private sources are derived from a fixture
/etc/apt (IVLOOP_APT_ETC); the series checks run the real scripts and the
real Makefile with an unknown KERNEL=, which must stop with one line before
anything exists.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"
UNKNOWN = "unknown KERNEL series '5.10': supported are 6.1 and 6.12"

DEB822 = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
ONE_LINE = """\
deb [arch=amd64] http://mirror.example/debian bookworm main
deb https://packages.example/apt stable main
deb http://security.debian.org/debian-security bookworm-security main
"""


def _sources(etc: Path, component: str, suffix: str = "") -> list[str]:
    script = f'. "{IMAGES}/private-apt.sh"; private_apt_sources "$1" "$2"'
    out = subprocess.run(["bash", "-c", script, "sh", component, suffix],
                         env=dict(os.environ, IVLOOP_APT_ETC=str(etc)),
                         capture_output=True, text=True, check=True).stdout
    return sorted(out.splitlines())


@pytest.fixture
def apt_etc(tmp_path: Path) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(DEB822)
    (tmp_path / "sources.list").write_text(ONE_LINE)
    return tmp_path


def test_nonfree_reuses_the_machines_debian_suites(apt_etc: Path) -> None:
    sb = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    assert _sources(apt_etc, "non-free") == sorted([
        f"deb {sb} http://deb.debian.org/debian bookworm non-free",
        f"deb {sb} http://deb.debian.org/debian bookworm-updates non-free",
        "deb [arch=amd64] http://mirror.example/debian bookworm non-free",
    ])


def test_backports_is_the_base_suite_plus_suffix(apt_etc: Path) -> None:
    """Same URIs, one -backports suite per base suite; no security or
    third-party repository, no bookworm-updates-backports."""
    sb = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    assert _sources(apt_etc, "main", "-backports") == sorted([
        f"deb {sb} http://deb.debian.org/debian bookworm-backports main",
        "deb [arch=amd64] http://mirror.example/debian bookworm-backports main",
    ])


def test_no_debian_source_is_an_error(tmp_path: Path) -> None:
    script = f'. "{IMAGES}/private-apt.sh"; private_apt_setup "$1" non-free'
    proc = subprocess.run(["bash", "-c", script, "sh", str(tmp_path / "cfg")],
                          env=dict(os.environ, IVLOOP_APT_ETC=str(tmp_path)),
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "no Debian archive source found" in proc.stderr


@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_known_series_pass_the_check(series: str) -> None:
    subprocess.run([str(IMAGES / "resolve-kernel"), "--check", series], check=True)


def test_resolve_kernel_rejects_an_unknown_series() -> None:
    proc = subprocess.run([str(IMAGES / "resolve-kernel"), "5.10"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert (proc.stdout, proc.stderr) == ("", UNKNOWN + "\n")


def test_build_rejects_an_unknown_series_before_creating_anything(tmp_path: Path) -> None:
    out = tmp_path / "out-5.10"
    proc = subprocess.run([str(IMAGES / "build"), "--kernel", "5.10"],
                          env=dict(os.environ, IVLOOP_IMAGE_OUT=str(out),
                                   IVLOOP_IMAGE_CACHE=str(tmp_path / "cache")),
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert proc.stderr == UNKNOWN + "\n"
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_make_image_rejects_an_unknown_series() -> None:
    """One line from make, nothing run: the check is at parse time."""
    proc = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", "image",
                           "KERNEL=5.10"], capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and UNKNOWN in lines[0], proc.stderr
    assert not (IMAGES / "out-5.10").exists()
    assert not (REPO / "build/driver-5.10").exists()


# ---------------------------------------------------------------------------
# the busybox guest carries what users stack on a NIC (issue 26), autoloaded

#: What `ip link add ... type vlan|macvlan|bridge|veth|bond` and `tc ... htb`
#: need in the guest, by module name; their own dependencies come along.
STACKING = ("bridge", "8021q", "macvlan", "veth", "bonding", "sch_htb")
#: The kernel asks modprobe for these names when a link kind is missing.
LINK_ALIASES = {"rtnl-link-bridge": "bridge", "rtnl-link-vlan": "8021q",
                "rtnl-link-macvlan": "macvlan", "rtnl-link-veth": "veth",
                "rtnl-link-bond": "bonding"}


def test_build_lists_the_stacking_modules() -> None:
    text = (IMAGES / "build").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("stack_mods=(")]
    assert set(line.removeprefix("stack_mods=(").removesuffix(")").split()) >= set(STACKING)


def _cpio(archive: bytes, *args: str) -> str:
    return subprocess.run(["cpio", "--quiet", *args], input=archive, capture_output=True,
                          check=True).stdout.decode()


def _built_by_this_script(out: Path) -> bool:
    """The image in *out* exists and was made by today's images/build (its
    manifest records the script's hash), so its contents are this script's."""
    digest = hashlib.sha256((IMAGES / "build").read_bytes()).hexdigest()
    manifest = out / "manifest"
    return (out / "initrd.img").exists() and manifest.exists() and \
        digest in manifest.read_text().split()


@pytest.mark.parametrize("out", ["out", "out-6.12"])
def test_built_image_can_autoload_the_stacking_modules(out: str) -> None:
    """modules.dep (busybox modprobe's index, made by depmod at build time)
    lists each module with dependencies that are all in the image."""
    d = IMAGES / out
    if not _built_by_this_script(d):
        pytest.skip(f"no image in images/{out} built by this images/build (make image)")
    abi = (d / "kernel-abi").read_text().strip()
    archive = gzip.decompress((d / "initrd.img").read_bytes())
    files = set(_cpio(archive, "-t").splitlines())
    moddir = f"lib/modules/{abi}"
    dep = _cpio(archive, "-i", "--to-stdout", f"{moddir}/modules.dep")
    alias = _cpio(archive, "-i", "--to-stdout", f"{moddir}/modules.alias")
    index: dict[str, list[str]] = {}
    for line in dep.splitlines():
        path, _, deps = line.partition(":")
        index[Path(path).name.removesuffix(".ko")] = [path, *deps.split()]
    for name in STACKING:
        assert name in index, f"{name} is not in {out}'s modules.dep"
        for path in index[name]:
            assert f"{moddir}/{path}" in files, f"{name} needs {path}, not in {out}"
    aliases = {tuple(ln.split()[1:3]) for ln in alias.splitlines() if ln.startswith("alias ")}
    assert set(LINK_ALIASES.items()) <= aliases
    # the kernel runs /sbin/modprobe (busybox's); init loads by /lib/modules/ivl
    assert "usr/bin/modprobe" in files and "lib/modules/ivl" in files
    # bonding makes no unasked-for bond0 when `ip link add ... type bond` loads it
    assert "etc/modprobe.d/bonding.conf" in files
