"""`dkms add/build/install` of guest-driver/ against both guest kernels'
headers, as a Debian or Ubuntu guest runs them for every kernel it installs.

Real dkms, with a private tree: --dkmstree, --sourcetree and --installtree
point into a temporary directory and the MOK signing key dkms may generate
goes there too, so /var/lib/dkms, /usr/src and /lib/modules are never
touched (install runs with --no-depmod).  One build per kernel: ~15 s each
on the 2-core build machine.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .kernel_headers import SERIES, build_env, copy_sources, headers, modinfo, package_version

ARCH = "x86_64"


class Dkms:
    """dkms confined to one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tree = root / "dkms"
        self.sources = root / "src"
        self.install = root / "modules"
        for d in (self.tree, self.sources, self.install):
            d.mkdir(parents=True)
        self.env = build_env(mok_signing_key=str(root / "mok.key"),
                             mok_certificate=str(root / "mok.pub"))

    def run(self, *args: str) -> str:
        proc = subprocess.run(
            ["dkms", *args, "--dkmstree", str(self.tree), "--sourcetree", str(self.sources),
             "--installtree", str(self.install)],
            capture_output=True, text=True, timeout=600, check=False, env=self.env)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"dkms {' '.join(args)} failed:\n{output}"
        return output


@pytest.fixture(scope="module")
def dkms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dkms, str]:
    """A private dkms tree with guest-driver/ added; (dkms, module/version)."""
    if shutil.which("dkms") is None:
        pytest.fail("dkms is not installed: run `make deps`")
    root = tmp_path_factory.mktemp("dkms")
    d = Dkms(root)
    # `dkms add DIR` copies DIR into the source tree as ivloop-<version>; DIR
    # is laid out as in the repository (VERSION one level up), as the
    # README's `dkms add ./guest-driver` runs it
    d.run("add", str(copy_sources(root / "checkout" / "guest-driver", version_above=True)))
    version = package_version()
    assert (d.sources / f"ivloop-{version}" / "dkms.conf").is_file()
    return d, f"ivloop/{version}"


@pytest.mark.parametrize("series", SERIES)
def test_dkms_build_and_install(dkms: tuple[Dkms, str], series: str) -> None:
    d, mv = dkms
    hdr = headers(series)
    kernel = ["-k", hdr.abi, "--kernelsourcedir", str(hdr.kdir),
              "--config", str(hdr.kdir / ".config")]
    d.run("build", mv, *kernel)
    built = sorted((d.tree / mv / hdr.abi / ARCH / "module").glob("ivloop.ko*"))
    assert len(built) == 1, f"dkms build left {built}"
    assert modinfo(built[0], "vermagic").split()[0] == hdr.abi
    assert modinfo(built[0], "version") == package_version()

    # dkms refuses to install for a kernel whose modules directory is
    # missing; in the private install tree it is this empty one
    (d.install / hdr.abi).mkdir()
    d.run("install", mv, *kernel, "--no-depmod")
    installed = sorted((d.install / hdr.abi / "updates/dkms").glob("ivloop.ko*"))
    assert [p.name for p in installed] == [built[0].name]
    status = d.run("status", mv, "-k", hdr.abi)
    assert f"{mv}, {hdr.abi}, {ARCH}: installed" in status, status
