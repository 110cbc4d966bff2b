"""Which QEMU runs: --qemu / $IVLOOP_QEMU, its version, and what depends on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import cli, cluster
from harness.backends import direct
from harness.errors import QemuBinaryError
from harness.experiments import bench
from harness.lab import hostnet, qemu, vms
from harness.lab.accel import Choice
from harness.lab.qemu import Binary, Version
from harness.lab.state import ProcRecord, StateDir

from .support import record_default_topology, snapshot
from .test_template import opt, spec

BANNER_72 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
BANNER_10 = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"


def fake_qemu(path: Path, banner: str, status: int = 0) -> Path:
    """A shell script that answers --version like a QEMU printing *banner*."""
    path.write_text(f"#!/bin/sh\necho '{banner}'\necho 'Copyright (c) 2003-2025'\nexit {status}\n")
    path.chmod(0o755)
    return path


def binary(banner: str, path: str = "/usr/bin/qemu-system-x86_64") -> Binary:
    return Binary(path=path, version=Version.parse(banner), banner=banner)


@pytest.fixture(autouse=True)
def no_env_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their QEMU themselves, whatever the caller's environment says."""
    monkeypatch.delenv(qemu.BINARY_ENV, raising=False)


# ---------------------------------------------------------------------------
# versions


@pytest.mark.parametrize(
    ("banner", "version"),
    [
        (BANNER_72, Version(7, 2, 22)),
        (BANNER_10, Version(10, 0, 2)),
        ("QEMU emulator version 9.0 (v9.0.0-dirty)", Version(9, 0, 0)),
        ("  QEMU emulator version 8.2.10\n", Version(8, 2, 10)),
    ],
)
def test_version_is_read_from_the_banner(banner: str, version: Version) -> None:
    assert Version.parse(banner) == version


@pytest.mark.parametrize("text", ["", "qemu-img version 10.0.2", "Usage: foo [--version]",
                                  "QEMU emulator version ten"])
def test_anything_but_a_qemu_banner_is_no_version(text: str) -> None:
    with pytest.raises(ValueError, match="not a QEMU version banner"):
        Version.parse(text)


def test_versions_order_numerically() -> None:
    assert Version(7, 2, 22) < Version(9, 0) < Version(10, 0, 2)
    assert Version(9, 10) > Version(9, 2) and str(Version(10, 0, 2)) == "10.0.2"


# ---------------------------------------------------------------------------
# the TCG RAM padding: below 9.0 only


@pytest.mark.parametrize(
    ("banner", "padded"),
    [(BANNER_72, True), ("QEMU emulator version 8.2.2", True),
     ("QEMU emulator version 9.0.0", False), (BANNER_10, False)],
)
def test_tcg_ram_padding_only_below_9_0(banner: str, padded: bool) -> None:
    tcg = Choice("tcg", "test")
    want = f"{256 * 1024 + 8}K" if padded else "256M"
    assert tcg.memory_arg(256, binary(banner)) == want
    assert tcg.loses_migration_writes(256 * 2**20, binary(banner)) is padded
    # the padded size itself is safe on every version
    assert not tcg.loses_migration_writes((256 * 1024 + 8) * 1024, binary(banner))


def test_kvm_and_unknown_qemus() -> None:
    assert Choice("kvm", "test").memory_arg(256, binary(BANNER_72)) == "256M"
    assert not Choice("kvm", "test").loses_migration_writes(256 * 2**20, binary(BANNER_72))
    # An unrecorded QEMU (a state from an older harness) is assumed to need it.
    assert Choice("tcg", "test").memory_arg(256) == f"{256 * 1024 + 8}K"


def test_template_runs_the_chosen_binary(tmp_path: Path) -> None:
    b = binary(BANNER_10, "/opt/q10/bin/qemu-system-x86_64")
    argv = qemu.render(spec(tmp_path, binary=b.path,
                            memory=Choice("tcg", "test").memory_arg(256, b)))
    assert argv[0] == "/opt/q10/bin/qemu-system-x86_64"
    assert opt(argv, "-m") == ["256M"]
    assert qemu.render(spec(tmp_path))[0] == qemu.DEFAULT_BINARY


# ---------------------------------------------------------------------------
# probing a --qemu path


def test_probe_reads_a_qemus_version(tmp_path: Path) -> None:
    b = qemu.probe(fake_qemu(tmp_path / "q", BANNER_10))
    assert b == Binary(path=str(tmp_path / "q"), version=Version(10, 0, 2), banner=BANNER_10)
    assert not b.tcg_loses_dirty_writes


def test_probe_makes_a_relative_path_absolute(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fake_qemu(tmp_path / "q", BANNER_72)
    monkeypatch.chdir(tmp_path)
    assert qemu.probe("./q").path == str(tmp_path / "q")


def test_probe_follows_the_environment_then_path(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake_qemu(tmp_path / "qemu-system-x86_64", BANNER_72)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert qemu.probe().path == str(tmp_path / "qemu-system-x86_64")
    monkeypatch.setenv(qemu.BINARY_ENV, str(fake_qemu(tmp_path / "q10", BANNER_10)))
    assert qemu.probe().version == Version(10, 0, 2)
    # --qemu wins over the environment
    assert qemu.probe(tmp_path / "qemu-system-x86_64").version == Version(7, 2, 22)


def _not_a_qemu(tmp_path: Path) -> Path:
    script = tmp_path / "not-qemu"
    script.write_text("#!/bin/sh\necho 'hello from a shell script'\n")
    script.chmod(0o755)
    return script


def _silent(tmp_path: Path) -> Path:
    script = tmp_path / "silent"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(0o755)
    return script


def _not_executable(tmp_path: Path) -> Path:
    p = fake_qemu(tmp_path / "noexec", BANNER_10)
    p.chmod(0o644)
    return p


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_not_a_qemu, "is not a QEMU: '{p} --version' printed 'hello from a shell script'"),
        (_silent, "is not a QEMU: '{p} --version' printed nothing (exit status 3)"),
        (lambda t: t / "nowhere" / "qemu", "--qemu {p}: no such file"),
        (lambda t: t, "--qemu {p} is a directory, not a QEMU binary"),
        (_not_executable, "--qemu {p} is not executable"),
        (lambda t: fake_qemu(t / "q6", "QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2)"),
         "QEMU 6.2.0 ({p}) is too old for ivloop's harness"),
    ],
)
def test_bad_qemu_paths_are_refused_in_one_line(tmp_path: Path, make: object,
                                                message: str) -> None:
    p = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(QemuBinaryError) as info:
        qemu.probe(p)
    text = str(info.value)
    assert message.format(p=p) in text, text
    assert "\n" not in text


def test_a_missing_default_qemu_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(QemuBinaryError, match="not on PATH; install Debian's qemu-system-x86"):
        qemu.probe()


def test_a_hanging_binary_is_not_waited_for(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "hang"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    monkeypatch.setattr(qemu, "PROBE_TIMEOUT", 0.3)
    with pytest.raises(QemuBinaryError, match="got no answer"):
        qemu.probe(script)


def test_a_feature_newer_than_the_qemu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(qemu.FEATURES, "x-test", (Version(11, 1), "the x-test feature"))
    b = binary(BANNER_10)
    b.require("harness")
    with pytest.raises(QemuBinaryError,
                       match=r"QEMU 10.0.2 \(.*\) is too old for the x-test feature: it needs "
                             r"QEMU 11.1 or later"):
        b.require("x-test")


# ---------------------------------------------------------------------------
# harness up: nothing starts with a bad QEMU


@pytest.mark.parametrize("how", ["option", "environment"])
def test_up_with_a_bad_qemu_starts_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    bad = _not_a_qemu(tmp_path)
    sd = StateDir(tmp_path / "state")
    argv = ["--state-dir", str(sd.path), "up"]
    if how == "option":
        argv += ["--qemu", str(bad)]
    else:
        monkeypatch.setenv(qemu.BINARY_ENV, str(bad))
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines == [f"harness: error: {'--qemu' if how == 'option' else '$IVLOOP_QEMU'} "
                     f"{bad} is not a QEMU: '{bad} --version' printed 'hello from a shell "
                     "script' (exit status 0)"], err
    assert not sd.exists()
    assert not list(hostnet.NETNS_DIR.glob(f"ivl-{sd.instance}-*"))


# ---------------------------------------------------------------------------
# a recorded topology: status and migration


@pytest.fixture
def on_qemu(tmp_path: Path) -> tuple[StateDir, Path]:
    """The default topology recorded as running on a fake QEMU 10 (this process
    stands in for every VM's QEMU)."""
    q = fake_qemu(tmp_path / "qemu-10", BANNER_10)
    sd = record_default_topology(tmp_path / "state", ProcRecord.of(os.getpid()))
    with sd:
        state = sd.load()
        state.qemu, state.qemu_banner = str(q), BANNER_10
        for vs in state.vms.values():
            vs.qemu, vs.qemu_banner = str(q), BANNER_10
        sd.save(state)
    return sd, q


def test_status_shows_the_qemu_each_vm_runs(capsys: pytest.CaptureFixture[str],
                                            on_qemu: tuple[StateDir, Path]) -> None:
    sd, q = on_qemu
    rows = cluster.status(sd, probe=False)
    assert {(r.vm, r.qemu, r.qemu_path) for r in rows} == {
        (vm, "10.0.2", str(q)) for vm in ("vm1", "vm2", "vm3")}
    assert cli.main(["--state-dir", str(sd.path), "status", "--no-probe"]) == 0
    shown = capsys.readouterr().out
    assert f"QEMU {q} runs vm1, vm2, vm3" in shown and "10.0.2" in shown


def test_bench_reports_the_qemu_that_ran(on_qemu: tuple[StateDir, Path]) -> None:
    sd, _ = on_qemu
    assert bench.host_environment(sd.load())["qemu_version"] == BANNER_10


def test_migration_to_a_different_qemu_is_refused(capsys: pytest.CaptureFixture[str],
                                                  on_qemu: tuple[StateDir, Path],
                                                  tmp_path: Path) -> None:
    sd, q = on_qemu
    other = fake_qemu(tmp_path / "qemu-7", BANNER_72)
    before = snapshot(sd)
    assert cli.main(["--state-dir", str(sd.path), "migrate", "vm2", "--to", "B",
                     "--qemu", str(other)]) == 1
    err = capsys.readouterr().err
    assert (f"harness: error: vm2 runs QEMU 10.0.2 ({q}) and the destination would run QEMU "
            f"7.2.22 ({other}): a migration needs the same QEMU on both ends") in err, err
    assert snapshot(sd) == before


def test_migration_after_the_binary_changed_is_refused(on_qemu: tuple[StateDir, Path]) -> None:
    sd, q = on_qemu
    fake_qemu(q, "QEMU emulator version 10.0.3 (Debian 1:10.0.3+ds-1~bpo12+1)")  # upgraded
    state = sd.load()
    with pytest.raises(QemuBinaryError, match=rf"{q} is now 10.0.3: a migration needs the same"):
        direct.destination_qemu(state, state.vms["vm2"])


def test_migration_on_the_same_qemu_is_allowed(on_qemu: tuple[StateDir, Path]) -> None:
    sd, q = on_qemu
    state = sd.load()
    assert direct.destination_qemu(state, state.vms["vm2"]).path == str(q)
    assert direct.destination_qemu(state, state.vms["vm2"], str(q)).version == Version(10, 0, 2)


def test_state_without_a_qemu_reads_as_the_default(tmp_path: Path) -> None:
    # written by a harness before --qemu existed: no qemu keys at all
    sd = record_default_topology(tmp_path / "state")
    state = sd.load()
    assert state.qemu == "" and vms.vm_qemu(state.vms["vm1"]) is None
    assert {r.qemu for r in cluster.status(sd, probe=False)} == {"-"}


# ---------------------------------------------------------------------------
# the CPU: no FSRM where ERMS is off (Linux assumes FSRM implies ERMS)


@pytest.mark.parametrize(
    ("banner", "cpu"),
    [(BANNER_72, "max,erms=off"), (BANNER_10, "max,erms=off,fsrm=off"),
     ("QEMU emulator version 8.0.0", "max,erms=off,fsrm=off")],
)
def test_tcg_cpu_turns_fsrm_off_with_erms_where_max_has_it(banner: str, cpu: str) -> None:
    args = Choice("tcg", "test").qemu_args_for(binary(banner))
    assert args == ["-accel", "tcg,thread=multi", "-cpu", cpu]


def test_kvm_and_unknown_qemus_keep_their_cpu_arguments() -> None:
    assert Choice("kvm", "test").qemu_args_for(binary(BANNER_10)) == [
        "-accel", "kvm", "-cpu", "host"]
    assert Choice("tcg", "test").qemu_args_for(None) == Choice("tcg", "test").qemu_args


def test_a_link_to_the_vms_own_qemu_is_the_same_qemu(on_qemu: tuple[StateDir, Path],
                                                     tmp_path: Path) -> None:
    sd, q = on_qemu
    (tmp_path / "link").symlink_to(q)
    state = sd.load()
    assert direct.destination_qemu(state, state.vms["vm2"], str(tmp_path / "link")).version \
        == Version(10, 0, 2)
