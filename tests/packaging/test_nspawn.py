"""The parts of tests/packaging/nspawn.py that need neither root nor the archive."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import nspawn


def write_apt(etc_apt: Path, keyring: Path, sources: str = "", lists: str = "") -> None:
    (etc_apt / "sources.list.d").mkdir(parents=True)
    keyring.write_bytes(b"")
    (etc_apt / "sources.list.d" / "debian.sources").write_text(sources.format(kr=keyring))
    (etc_apt / "sources.list").write_text(lists.format(kr=keyring))


DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.example.org/debian
Suites: bookworm bookworm-updates bookworm-backports
Components: main contrib
Signed-By: {kr}

Types: deb deb-src
URIs: http://deb.example.org/debian-security/
Suites: bookworm-security
Components: main
Signed-By: {kr}

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
"""


def test_archive_from_deb822(tmp_path: Path) -> None:
    kr = tmp_path / "kr.gpg"
    write_apt(tmp_path / "apt", kr, sources=DEB822)
    archive = nspawn.machine_archive("bookworm", tmp_path / "apt")
    assert archive.mirror == "http://deb.example.org/debian"
    assert archive.keyring == kr
    assert archive.sources == (
        f"deb [signed-by={kr}] http://deb.example.org/debian bookworm main",
        f"deb [signed-by={kr}] http://deb.example.org/debian bookworm-updates main",
        f"deb [signed-by={kr}] http://deb.example.org/debian-security/ bookworm-security main",
    )


def test_archive_from_one_line_lists(tmp_path: Path) -> None:
    kr = tmp_path / "kr.gpg"
    lists = (
        "deb [arch=amd64 signed-by={kr}] http://mirror.example/debian bookworm main non-free\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "# deb http://old.example/debian bookworm main\n"
        "deb http://mirror.example/debian-security bookworm-security main\n"
        "deb http://mirror.example/debian bullseye main\n"
    )
    write_apt(tmp_path / "apt", kr, lists=lists)
    archive = nspawn.machine_archive("bookworm", tmp_path / "apt")
    assert archive.mirror == "http://mirror.example/debian"
    assert archive.keyring == kr
    assert archive.sources == (
        f"deb [arch=amd64 signed-by={kr}] http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian-security bookworm-security main",
    )


def test_archive_missing(tmp_path: Path) -> None:
    ubuntu = "deb http://x.example/ubuntu jammy main\n"
    write_apt(tmp_path / "apt", tmp_path / "kr.gpg", lists=ubuntu)
    with pytest.raises(nspawn.NspawnError, match="no Debian bookworm source"):
        nspawn.machine_archive("bookworm", tmp_path / "apt")


def test_parse_depends() -> None:
    depends = (
        "python3-libvirt, python3-rich (>= 13), "
        "systemd | systemd-standalone-sysusers | systemd-sysusers, python3:any"
    )
    assert nspawn.parse_depends("", depends) == [
        "python3",
        "python3-libvirt",
        "python3-rich",
        "systemd",
    ]


def test_snapshot_diff(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for path in ("etc/default", "usr/bin", "var/lib/dpkg", "tmp"):
        (root / path).mkdir(parents=True)
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "usr/bin/tool").write_text("1")
    before = nspawn.Snapshot.of(root)
    assert "/etc/group" in before.entries and "/var/lib/dpkg" not in before.entries

    (root / "etc/group").write_text("root:x:0:\nivloop:x:999:\n")
    (root / "usr/bin/tool").write_text("2")  # outside /etc only the metadata counts
    (root / "etc/default/ivloop-server").write_text("")
    (root / "var/lib/dpkg/status").write_text("ignored")
    (root / "tmp/x").write_text("ignored")
    os.symlink("/lib/systemd/system/x.service", root / "etc/x.service")
    diff = before.diff(nspawn.Snapshot.of(root))
    assert diff.added == ["/etc/default/ivloop-server", "/etc/x.service"]
    assert diff.removed == []
    assert diff.changed == ["/etc/group"]
    assert str(diff).splitlines() == [
        "+ /etc/default/ivloop-server",
        "+ /etc/x.service",
        "~ /etc/group",
    ]
    assert not before.diff(before)


def test_remove_tree(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("")
    nspawn.remove_tree(tree)
    assert not tree.exists()
    nspawn.remove_tree(tree)  # gone already: nothing to do


def test_machine_names_unique() -> None:
    names = {nspawn.machine_name() for _ in range(3)}
    assert len(names) == 3
    assert all(len(n) <= 64 and n.startswith(f"ivl-{os.getpid()}-") for n in names)
