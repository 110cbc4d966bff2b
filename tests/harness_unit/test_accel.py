"""The accelerator decision: pure logic over gathered facts."""

from __future__ import annotations

import pytest

from harness.errors import AccelError
from harness.lab.accel import Choice, Facts, decide

GOOD = Facts(kvm_usable=True, pvm_host=False, probe_booted=True)


def test_kvm_when_a_probe_guest_booted() -> None:
    assert decide(GOOD).accel == "kvm"


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        (Facts(False, False, None), "missing or unusable"),
        (Facts(True, True, None), "PVM"),
        (Facts(True, False, False), "did not boot"),
        (Facts(True, False, None), "not probed"),
    ],
)
def test_tcg_unless_kvm_is_proven(facts: Facts, reason: str) -> None:
    choice = decide(facts)
    assert choice.accel == "tcg" and reason in choice.reason
    assert choice.qemu_args == ["-accel", "tcg,thread=multi", "-cpu", "max,erms=off"]


def test_forcing_overrides_detection() -> None:
    assert decide(GOOD, "tcg").accel == "tcg"
    assert decide(Facts(True, True, None), "kvm").accel == "kvm"


def test_forcing_kvm_without_dev_kvm_is_refused() -> None:
    with pytest.raises(AccelError, match="unusable"):
        decide(Facts(False, False, None), "kvm")


def test_unknown_accel_is_refused() -> None:
    with pytest.raises(AccelError, match="must be one of kvm, tcg"):
        decide(GOOD, "hvf")


def test_tcg_guest_ram_is_not_a_multiple_of_64_pages() -> None:
    # QEMU < 9.0 skips the TLB reset that TCG dirty tracking needs when a
    # RAM block's size is a multiple of 64 pages (256 KiB): writes get lost
    # in migration.  The padded size must take the page-by-page path.
    kib = int(Choice("tcg", "test").memory_arg(256).removesuffix("K"))
    assert kib * 1024 % (64 * 4096) != 0 and kib % 8 == 0 and kib >= 256 * 1024
    assert Choice("kvm", "test").memory_arg(256) == "256M"
