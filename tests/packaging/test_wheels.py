"""The three Python distributions as wheels, and one version everywhere (issue 28).

- ivloop-server (qemu-dev/) needs nothing outside Python's standard library:
  its wheel goes into a fresh virtual environment with no index and no other
  wheel, ``pip check`` passes, every module imports there, and the
  environment holds that package and nothing else;
- ivloop-libvirt (libvirt/) needs libvirt-python alone;
- ivloop-lab (the root) is the lab: the two, and the libraries of the lab.

The version is written once, in VERSION: the wheels, the packages'
``__version__``, the commands' ``--version``, the MODULE_VERSION Kbuild
compiles into ivloop.ko and the PACKAGE_VERSION dkms.conf gives dkms all say
it.  (test_driver_build.py and test_dkms.py read the built module's.)

The wheels are built the way ``make wheels`` builds them (pip wheel
--no-deps --no-build-isolation), once per session, from a copy of the
projects: setuptools builds in each project's build/ directory, which a
concurrent run or ``make wheels`` would share.
"""

from __future__ import annotations

import ast
import fcntl
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest

from ..kernel_headers import DRIVER, REPO, build_env, copy_sources

VERSION = (REPO / "VERSION").read_text().strip()
#: distribution -> (project directory, its package, its console script)
DISTS = {
    "ivloop-server": ("qemu-dev", "ivloop_server", "ivloop-server = ivloop_server.cli:main"),
    "ivloop-libvirt": ("libvirt", "ivloop_libvirt", "ivloop-libvirt = ivloop_libvirt.cli:main"),
    "ivloop-lab": (".", "harness", "harness = harness.cli:main"),
}
#: What the lab's wheel requires (names; the server and libvirt wheels are exact below).
LAB_REQUIRES = {"ivloop-server", "ivloop-libvirt", "pyroute2", "fabric", "jinja2", "qemu.qmp",
                "rich", "matplotlib", "libvirt-python"}
#: What the three projects are built from.
BUILD_INPUTS = ("VERSION", "README.md", "pyproject.toml", "harness", "qemu-dev", "libvirt")


def _build(dest: Path) -> None:
    src = dest / "src"
    src.mkdir(parents=True)
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            # symlinks kept: qemu-dev/VERSION and libvirt/VERSION link to ../VERSION
            shutil.copytree(path, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(dest / "wheels"), "./qemu-dev", "./libvirt", "."],
        cwd=src, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}{proc.stderr}"
    (dest / "built").touch()


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each distribution's wheel; built once, shared by xdist's workers."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        dest = tmp_path_factory.mktemp("wheels")
        _build(dest)
    else:
        # this run's directory, above every worker's
        dest = tmp_path_factory.getbasetemp().parent / "ivloop-wheels"
        with (dest.parent / "ivloop-wheels.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (dest / "built").exists():
                shutil.rmtree(dest, ignore_errors=True)
                _build(dest)
    found = {}
    for dist in DISTS:
        whl = sorted((dest / "wheels").glob(f"{dist.replace('-', '_')}-*.whl"))
        assert len(whl) == 1, f"{dist}: wheels {whl}"
        found[dist] = whl[0]
    return found


def _dist_info(whl: Path, name: str) -> str:
    with zipfile.ZipFile(whl) as z:
        info = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
        assert len(info) == 1, info
        return z.read(info[0]).decode()


def _metadata(whl: Path) -> Message:
    return Parser().parsestr(_dist_info(whl, "METADATA"))


def _requires(whl: Path) -> list[str]:
    """Requires-Dist without the extras' (the lab's [dev])."""
    return [r for r in _metadata(whl).get_all("Requires-Dist", []) if "extra ==" not in r]


@pytest.mark.parametrize("dist", DISTS)
def test_wheel_is_named_and_versioned_by_VERSION(wheels: dict[str, Path], dist: str) -> None:
    meta = _metadata(wheels[dist])
    assert (meta["Name"], meta["Version"]) == (dist, VERSION)
    assert wheels[dist].name == f"{dist.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["License-Expression"] == "GPL-2.0-only"


@pytest.mark.parametrize("dist", DISTS)
def test_wheel_holds_its_package_and_command(wheels: dict[str, Path], dist: str) -> None:
    _, package, script = DISTS[dist]
    with zipfile.ZipFile(wheels[dist]) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {package, f"{dist.replace('-', '_')}-{VERSION}.dist-info"}
    assert f"{package}/py.typed" in names
    scripts = _dist_info(wheels[dist], "entry_points.txt")
    assert re.findall(r"^\S+ = \S+$", scripts, re.MULTILINE) == [script]


def test_server_wheel_carries_its_unit_files(wheels: dict[str, Path]) -> None:
    with zipfile.ZipFile(wheels["ivloop-server"]) as z:
        names = set(z.namelist())
    for unit in ("ivloop-server.service", "ivloop-server@.service", "ivloop-server.default"):
        assert f"ivloop_server/systemd/{unit}" in names


def test_requires_dist(wheels: dict[str, Path]) -> None:
    assert _requires(wheels["ivloop-server"]) == []
    assert _requires(wheels["ivloop-libvirt"]) == ["libvirt-python>=9.0"]
    lab = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in _requires(wheels["ivloop-lab"])}
    assert lab == LAB_REQUIRES


def test_server_wheel_alone_in_a_fresh_venv(wheels: dict[str, Path], tmp_path: Path) -> None:
    """No index, no other wheel: it installs, pip check is content, every module
    imports, --version says VERSION, and nothing but the package was installed.
    (The venv has no pip of its own, so nothing else is in it: this pip works
    on it through --python.)"""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in build_env().items() if not k.startswith(("PYTHON", "PIP_"))}

    def pip(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args],
                              capture_output=True, text=True, timeout=120, check=False, env=env)
        assert proc.returncode == 0, f"pip {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    pip("install", "-q", "--no-index", "--no-deps", str(wheels["ivloop-server"]))
    assert "No broken requirements found" in pip("check")
    site = next(venv.glob("lib/python3*/site-packages"))
    assert sorted(p.name for p in site.iterdir()) == [
        "ivloop_server", f"ivloop_server-{VERSION}.dist-info"]

    # -I: none of this tree's paths, no user site
    imports = ("import importlib, pkgutil, ivloop_server\n"
               "for m in pkgutil.walk_packages(ivloop_server.__path__, 'ivloop_server.'):\n"
               "    importlib.import_module(m.name)\n"
               "print(ivloop_server.__version__)\n")
    run = subprocess.run([str(python), "-I", "-c", imports], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=60, check=False)
    assert run.returncode == 0 and run.stdout == f"{VERSION}\n", run.stderr
    version = subprocess.run([str(venv / "bin" / "ivloop-server"), "--version"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
                             check=False)
    assert version.returncode == 0, version.stderr
    assert version.stdout == f"ivloop-server {VERSION}\n"


def _top_imports(package: Path) -> set[str]:
    found = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(("dist", "allowed"), [
    ("ivloop-server", set()),
    # libvirt-python's two modules; ivloop_server is reached only through QEMU
    ("ivloop-libvirt", {"libvirt", "libvirt_qemu"}),
])
def test_imports_only_what_the_wheel_requires(dist: str, allowed: set[str]) -> None:
    project, package, _ = DISTS[dist]
    foreign = _top_imports(REPO / project / package) - set(sys.stdlib_module_names) \
        - allowed - {package, "__future__"}
    assert not foreign, f"{package} imports {sorted(foreign)}, which {dist} does not require"


@pytest.mark.parametrize(("module", "command"), [
    ("ivloop_server", "ivloop-server"), ("ivloop_libvirt", "ivloop-libvirt"),
    ("harness", "harness")])
def test_commands_and_packages_say_VERSION(module: str, command: str) -> None:
    """In this environment (make venv's editable installs; one that kept an
    older version's metadata fails here)."""
    proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{command} {VERSION}\n"
    code = f"import {module}; print({module}.__version__)"
    version = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    assert version == f"{VERSION}\n"


@pytest.mark.parametrize("package", ["ivloop_server", "ivloop_libvirt", "harness"])
def test_version_of_a_tree_that_is_not_installed(package: str, tmp_path: Path) -> None:
    """From a copy on PYTHONPATH, in an interpreter where no ivloop distribution
    is installed, __version__ is the VERSION file next to the copy."""
    project = next(p for p, pkg, _ in DISTS.values() if pkg == package)
    copy = tmp_path / "tree"
    shutil.copytree(REPO / project / package, copy / package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "VERSION").write_text("9.8.7\n")
    proc = subprocess.run([sys.executable, "-S", "-c",
                           f"import {package}; print({package}.__version__)"],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=tmp_path, env={**build_env(), "PYTHONPATH": str(copy)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "9.8.7\n"


def _kbuild_cflags(kbuild_dir: Path, *make_args: str) -> str:
    """The CFLAGS Kbuild gives ivl_main.c (IVL_DRV_VERSION -> MODULE_VERSION),
    read by make itself without a kernel tree."""
    proc = subprocess.run(
        ["make", "--no-print-directory", "-f", str(kbuild_dir / "Kbuild"), "-f", "-",
         "ivl-print", *make_args],
        input="ivl-print: ; @:\n$(info $(CFLAGS_ivl_main.o))\n", capture_output=True,
        text=True, timeout=60, check=False, env=build_env(), cwd=kbuild_dir)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_kbuild_compiles_VERSION_into_the_module(tmp_path: Path) -> None:
    expect = f"-DIVL_DRV_VERSION='\"{VERSION}\"'"
    # in the repository (../VERSION), in a copy with VERSION beside Kbuild
    # (make driver KERNEL=6.12, the tests' builds), and as dkms.conf runs it
    assert _kbuild_cflags(DRIVER) == expect
    assert _kbuild_cflags(copy_sources(tmp_path / "copy")) == expect
    bare = copy_sources(tmp_path / "dkms")
    (bare / "VERSION").unlink()
    assert _kbuild_cflags(bare, f"IVL_VERSION={VERSION}") == expect


def _dkms_conf(conf: Path) -> tuple[str, str]:
    """PACKAGE_VERSION and MAKE[0] as dkms sees them (it sources the file with bash)."""
    proc = subprocess.run(
        ["bash", "-c", 'kernel_source_dir=/KDIR; . "$1" >/dev/null; '
         'printf "%s\\n%s\\n" "$PACKAGE_VERSION" "${MAKE[0]}"', "_", str(conf)],
        capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert proc.returncode == 0, proc.stderr
    version, make = proc.stdout.splitlines()
    return version, make


def test_dkms_conf_says_VERSION(tmp_path: Path) -> None:
    expect = (VERSION, f"make KDIR=/KDIR IVL_VERSION={VERSION} W= modules")
    # `dkms add ./guest-driver` reads it in the repository ...
    assert _dkms_conf(DRIVER / "dkms.conf") == expect
    # ... and from then on in its copy, <source tree>/ivloop-<version>/,
    # which has no VERSION
    copy = copy_sources(tmp_path / f"ivloop-{VERSION}")
    (copy / "VERSION").unlink()
    assert _dkms_conf(copy / "dkms.conf") == expect
    # a copy of the sources elsewhere, VERSION beside it
    assert _dkms_conf(copy_sources(tmp_path / "elsewhere") / "dkms.conf") == expect
