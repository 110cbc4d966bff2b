"""The Debian packages of ``make deb``: versions, contents, fields, maintainer scripts, lintian.

Unit speed, on build/deb/'s output (``debs.built()`` runs ``make deb``, a
no-op when nothing changed; lintian takes some seconds).  What is checked is
the package as dpkg sees it (``dpkg-deb -c/-f/-e/-x``), never the build
tree; installing them is tests/packaging/test_host_package.py's job.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from . import debs as debs_mod
from .debs import REPO, Debs, contents, control_file, extract, field, member_text

DIST_PACKAGES = "/usr/lib/python3/dist-packages"
UNIT_DIR = "/lib/systemd/system"
SERVER_SYSTEMD = REPO / "qemu-dev" / "ivloop_server" / "systemd"
GUEST_ETC = REPO / "images" / "debian" / "etc"
GUEST_DIST = REPO / "guest-driver"
#: Debian's interpreter, the one the packages' scripts name (#!/usr/bin/python3).
SYSTEM_PYTHON = "/usr/bin/python3"
#: Modules outside the standard library the packaged Python may import, and
#: the Debian package that provides each.
PROVIDED_BY = {
    "libvirt": "python3-libvirt",
    "libvirt_qemu": "python3-libvirt",
}


@pytest.fixture(scope="session")
def debs() -> Debs:
    return debs_mod.built()


def depends(deb: Path) -> list[set[str]]:
    """Depends as a list of alternatives, each a set of package names (no versions)."""
    text = field(deb, "Depends")
    return [{re.sub(r"\s*\(.*\)|:any", "", alt).strip() for alt in clause.split("|")}
            for clause in text.split(",") if clause.strip()]


def tree_files(directory: Path, *patterns: str) -> list[str]:
    """Names of the tree's files in @directory matching @patterns (no build outputs)."""
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", "."], cwd=directory,
        capture_output=True, text=True, timeout=60, check=True).stdout.split()
    names = {name for name in tracked if "/" not in name and (directory / name).exists()}
    return sorted(n for n in names if any(Path(n).match(p) for p in patterns))


# -- both packages ---------------------------------------------------------


@pytest.mark.parametrize("package", debs_mod.PACKAGES)
def test_version_and_fields(debs: Debs, package: str) -> None:
    deb = debs.of(package)
    assert debs.version == f"{debs_mod.upstream_version()}-1"
    assert field(deb, "Package") == package
    assert field(deb, "Version") == debs.version
    assert field(deb, "Source") == "ivloop"
    assert field(deb, "Architecture") == "all"


def test_lintian_reports_no_error(debs: Debs) -> None:
    """lintian on the .changes (both .debs and the .buildinfo): no E:, no stale override."""
    proc = subprocess.run(["lintian", "--fail-on", "none", "--display-info", str(debs.changes)],
                          capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lintian failed to run:\n{output}"
    errors = [line for line in output.splitlines() if line.startswith("E:")]
    assert not errors, f"lintian errors:\n{output}"
    # an override must still match something (debian/*.lintian-overrides)
    stale = [line for line in output.splitlines()
             if re.search(r"\b(unused-override|mismatched-override)\b", line)]
    assert not stale, f"lintian overrides that no longer match:\n{output}"


# -- ivloop-host -----------------------------------------------------------


def test_host_python_and_scripts(debs: Debs) -> None:
    paths = contents(debs.host)
    version = debs_mod.upstream_version()
    for script in ("ivloop-server", "ivloop-libvirt"):
        mode = paths.get(f"/usr/bin/{script}")
        assert mode == "-rwxr-xr-x", f"/usr/bin/{script}: {mode}"
    for package, source, dist in (
        ("ivloop_server", REPO / "qemu-dev" / "ivloop_server", "ivloop_server"),
        ("ivloop_libvirt", REPO / "libvirt" / "ivloop_libvirt", "ivloop_libvirt"),
    ):
        for name in tree_files(source, "*.py", "py.typed"):
            assert f"{DIST_PACKAGES}/{package}/{name}" in paths, f"{package}/{name} not packaged"
        assert f"{DIST_PACKAGES}/{dist}-{version}.dist-info/METADATA" in paths
        assert f"{DIST_PACKAGES}/{dist}-{version}.dist-info/entry_points.txt" in paths
    # --print-unit reads the units from the package
    for name in tree_files(SERVER_SYSTEMD, "*"):
        assert f"{DIST_PACKAGES}/ivloop_server/systemd/{name}" in paths
    # the lab is not part of it, nor compiled files (py3compile makes them)
    assert not [p for p in paths if "/harness" in p or "__pycache__" in p or p.endswith(".pyc")]
    assert not [p for p in paths if p.startswith("/usr/local") or "/python3.11/" in p]


def test_host_units_defaults_and_group(debs: Debs, tmp_path: Path) -> None:
    paths = contents(debs.host)
    for unit in ("ivloop-server.service", "ivloop-server@.service"):
        assert f"{UNIT_DIR}/{unit}" in paths
        assert member_text(debs.host, f"{UNIT_DIR}/{unit}") == (SERVER_SYSTEMD / unit).read_text()

    assert control_file(debs.host, "conffiles", tmp_path).split() == ["/etc/default/ivloop-server"]
    defaults = member_text(debs.host, "/etc/default/ivloop-server")
    active = [line for line in defaults.splitlines() if line.startswith("IVLOOP_SERVER_OPTS=")]
    assert len(active) == 1, defaults
    opts = active[0].split("=", 1)[1].strip('"').split()
    assert opts[opts.index("--socket-group") + 1] == "ivloop", active
    assert opts[opts.index("--socket-mode") + 1] == "0660", active

    sysusers = member_text(debs.host, "/usr/lib/sysusers.d/ivloop.conf")
    entries = [line.split() for line in sysusers.splitlines()
               if line.strip() and not line.startswith("#")]
    assert entries == [["g", "ivloop", "-"]]


def test_host_maintainer_scripts(debs: Debs, tmp_path: Path) -> None:
    """The group exists before the server starts; the service alone is enabled and started;
    an upgrade hands over instead of restarting (which would drop every member)."""
    postinst = control_file(debs.host, "postinst", tmp_path)
    group = postinst.index("systemd-sysusers")
    enable = postinst.index("deb-systemd-helper enable 'ivloop-server.service'")
    start = postinst.index("deb-systemd-invoke start 'ivloop-server.service'")
    hand_over = postinst.index("systemctl kill --kill-who=main --signal=SIGUSR2")
    assert group < enable < start < hand_over
    assert "deb-systemd-invoke restart 'ivloop-server.service'" not in postinst
    assert "deb-systemd-invoke $_dh_action" not in postinst  # dh's restart on upgrade
    assert "'ivloop-server@*.service'" in postinst  # instances hand over too
    # The template is not enabled.
    assert "deb-systemd-helper enable 'ivloop-server@" not in postinst
    assert "py3compile -p ivloop-host" in postinst
    prerm = control_file(debs.host, "prerm", tmp_path)
    # Stopped on removal only, not on upgrade.
    assert "[ \"$1\" = remove ]" in prerm
    assert "deb-systemd-invoke stop 'ivloop-server.service'" in prerm


def test_host_depends(debs: Debs) -> None:
    clauses = depends(debs.host)
    # procps: /bin/kill, the unit's ExecReload (not in a minbase system)
    for wanted in ("python3-libvirt", "python3", "procps"):
        assert {wanted} in clauses, f"Depends lacks {wanted}: {clauses}"
    # dh_installsysusers: systemd-sysusers runs in postinst
    assert any("systemd" in c and "systemd-standalone-sysusers" in c for c in clauses), clauses


def test_host_python_imports_only_what_depends_provides(debs: Debs, tmp_path: Path) -> None:
    """Every module the packaged code imports is its own, the standard library's, or a
    Depends' (ivloop_server: the standard library's alone)."""
    root = extract(debs.host, tmp_path / "root") / DIST_PACKAGES.lstrip("/")
    clauses = depends(debs.host)
    needed: dict[str, set[str]] = {}
    for package in ("ivloop_server", "ivloop_libvirt"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != package:
                        needed.setdefault(package, set()).add(top)
    assert "ivloop_server" not in needed, f"ivloop_server imports {needed['ivloop_server']}"
    for module in sorted(needed.get("ivloop_libvirt", set())):
        assert module in PROVIDED_BY, f"ivloop_libvirt imports {module}: which package has it?"
        assert {PROVIDED_BY[module]} in clauses, (
            f"ivloop_libvirt imports {module}, but Depends lacks {PROVIDED_BY[module]}")


def test_host_server_runs_standalone(debs: Debs, tmp_path: Path) -> None:
    """The packaged ivloop-server needs nothing but Python's standard library: run it
    with the system site directories off (python3 -S) and only the package's own
    dist-packages on the path."""
    root = extract(debs.host, tmp_path / "root")
    site = root / DIST_PACKAGES.lstrip("/")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    check = (
        "import sys\n"
        f"others = [p for p in sys.path if 'packages' in p and p != {str(site)!r}]\n"
        "assert not others, others\n"
        "import ivloop_server, ivloop_server.cli\n"
        f"assert ivloop_server.__file__.startswith({str(site)!r}), ivloop_server.__file__\n"
        "ivloop_server.cli.main(['--version'])\n"
    )
    expected = f"ivloop-server {debs_mod.upstream_version()}"
    for argv in ([SYSTEM_PYTHON, "-S", "-c", check],
                 [SYSTEM_PYTHON, "-S", str(root / "usr/bin/ivloop-server"), "--version"]):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                              check=False, cwd=tmp_path)
        assert proc.returncode == 0, f"{argv[-1]}: exit {proc.returncode}\n{proc.stderr}"
        assert proc.stdout.strip() == expected, proc.stdout + proc.stderr
    # the script runs Debian's python3, not whichever is first on PATH
    assert (root / "usr/bin/ivloop-server").read_text().startswith(f"#!{SYSTEM_PYTHON}\n")


# -- ivloop-guest ----------------------------------------------------------


def test_guest_dkms_tree(debs: Debs) -> None:
    paths = contents(debs.guest)
    version = debs_mod.upstream_version()
    src = f"/usr/src/ivloop-{version}"
    driver = REPO / "guest-driver"
    expected = tree_files(driver, "ivl*.c", "ivl*.h", "Kbuild", "Makefile", "dkms.conf")
    packaged = sorted(p.removeprefix(f"{src}/") for p in paths if p.startswith(f"{src}/"))
    assert packaged == expected
    # every object Kbuild links has its source there
    kbuild = member_text(debs.guest, f"{src}/Kbuild")
    objects = re.findall(r"(ivl_\w+)\.o", kbuild)
    assert objects, kbuild
    assert not [o for o in objects if f"{o}.c" not in packaged]


def test_guest_dkms_conf_names_the_version(debs: Debs, tmp_path: Path) -> None:
    """dkms.conf, as dkms sources it in /usr/src/ivloop-VERSION/, says VERSION; the
    maintainer scripts add and remove that version."""
    version = debs_mod.upstream_version()
    root = extract(debs.guest, tmp_path / "root")
    conf = root / f"usr/src/ivloop-{version}/dkms.conf"
    assert f'PACKAGE_VERSION="{version}"' in conf.read_text().splitlines()
    # dkms reads it with bash, from anywhere
    proc = subprocess.run(
        ["bash", "-c", 'source "$1"; echo "$PACKAGE_NAME $PACKAGE_VERSION ${MAKE[0]}"', "-",
         str(conf)], capture_output=True, text=True, timeout=60, check=True, cwd="/")
    name, found, make = proc.stdout.strip().split(" ", 2)
    assert (name, found) == ("ivloop", version)
    if "IVL_VERSION=" in make:  # Kbuild's version, where dkms's copy has no VERSION
        assert f"IVL_VERSION={version} " in make, make
    postinst = control_file(debs.guest, "postinst", tmp_path)
    assert f"DKMS_VERSION={version}" in postinst and "DKMS_NAME=ivloop" in postinst
    assert f"DKMS_VERSION={version}" in control_file(debs.guest, "prerm", tmp_path)


def test_guest_units_modules_load_and_examples(debs: Debs, tmp_path: Path) -> None:
    paths = contents(debs.guest)
    unit = f"{UNIT_DIR}/ivloop@.service"
    assert member_text(debs.guest, unit) == (
        GUEST_DIST / "systemd/ivloop@.service").read_text()
    assert member_text(debs.guest, "/usr/lib/modules-load.d/ivloop.conf") == (
        GUEST_DIST / "modules-load.d/ivloop.conf").read_text()
    examples = "/usr/share/doc/ivloop-guest/examples"
    shipped = sorted(p.rsplit("/", 1)[1] for p in paths
                     if p.startswith(f"{examples}/") and not p.endswith("/"))
    # the NIC, ivl0 and their .link files; not the lab's management NIC
    assert shipped == ["10-ivloop-eth0.link", "10-ivloop-ivl0.link", "20-eth0.network",
                       "30-ivl0.network"], shipped
    for name in shipped:
        assert member_text(debs.guest, f"{examples}/{name}") == (
            GUEST_ETC / "systemd/network" / name).read_text()
    # nothing in /etc: the guest's own configuration stays the administrator's
    assert not [p for p in paths if p.startswith("/etc")]
    # the template is installed, never enabled (the instance names the NIC)
    postinst = control_file(debs.guest, "postinst", tmp_path)
    assert "deb-systemd-helper" not in postinst and "ivloop@" not in postinst


def test_guest_depends(debs: Debs) -> None:
    clauses = depends(debs.guest)
    assert {"dkms"} in clauses, clauses
    assert {"iproute2"} in clauses, clauses  # ivloop@.service runs ip link
    assert not [c for c in clauses if any(p.startswith("python3") for p in c)]


def test_no_file_owned_by_the_builder(debs: Debs) -> None:
    for deb in (debs.host, debs.guest):
        out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        owners = {line.split()[1] for line in out.splitlines()}
        assert owners == {"root/root"}, f"{deb.name}: {owners}"
