"""The accelerator decision: pure logic over gathered facts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.errors import AccelError
from harness.lab.accel import Choice, Facts, decide, lower_path, vhost_net_usable

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


# ---------------------------------------------------------------------------
# the lower path: vhost-net on KVM where /dev/vhost-net opens


@pytest.fixture
def vhost_dev(tmp_path: Path) -> str:
    """A stand-in for /dev/vhost-net that opens read-write."""
    dev = tmp_path / "vhost-net"
    dev.touch(mode=0o600)
    return str(dev)


def test_kvm_with_a_vhost_device_runs_vhost_net(vhost_dev: str) -> None:
    assert vhost_net_usable(vhost_dev)
    assert Choice("kvm", "test").vhost_net(vhost_net_usable(vhost_dev)) is True


def test_tcg_never_runs_vhost_net(vhost_dev: str) -> None:
    # vhost-net's doorbells and interrupts are KVM's ioeventfds and irqfds
    assert Choice("tcg", "test").vhost_net(vhost_net_usable(vhost_dev)) is False


def test_kvm_without_a_vhost_device_stays_in_user_space(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-vhost-net")
    assert not vhost_net_usable(missing)
    assert Choice("kvm", "test").vhost_net(vhost_net_usable(missing)) is False
    unreadable = tmp_path / "ro"
    unreadable.touch(mode=0o400)
    if os.geteuid() != 0:  # root opens it anyway
        assert not vhost_net_usable(str(unreadable))


def test_the_lower_path_says_what_it_is() -> None:
    assert lower_path("kvm", True) == "virtio-net, vhost-net (KVM)"
    assert lower_path("tcg", False) == "virtio-net, user-space (TCG)"
    assert lower_path("kvm", False) == (
        "virtio-net, user-space (KVM without a usable /dev/vhost-net)")
