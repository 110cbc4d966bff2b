"""A hot-plug that ivloop-server refuses says where to look."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from harness.backends import qmp
from harness.errors import QMPError


class RefusingMonitor:
    """device_add fails the way QEMU reports a server's version -1."""

    def __init__(self, error: str) -> None:
        self.error = error
        self.calls: list[str] = []

    async def cmd(self, name: str, args: dict[str, Any] | None = None,
                  timeout: float = 30) -> None:
        self.calls.append(name)
        if name == "device_add":
            raise QMPError(self.error)


def plug(mon: RefusingMonitor) -> None:
    asyncio.run(qmp.plug_ivshmem(mon, "/nonexistent.sock"))  # type: ignore[arg-type]


def test_a_refused_plug_points_at_the_server_log() -> None:
    mon = RefusingMonitor("QMP device_add failed: server sent version -1, expecting 0")
    with pytest.raises(QMPError, match=r"ivloop-server refused this QEMU; its log"):
        plug(mon)
    assert mon.calls == ["chardev-add", "device_add", "chardev-remove"]


def test_other_plug_errors_pass_through_unchanged() -> None:
    mon = RefusingMonitor("QMP device_add failed: Duplicate device ID")
    with pytest.raises(QMPError) as info:
        plug(mon)
    assert str(info.value) == "QMP device_add failed: Duplicate device ID"
    assert mon.calls[-1] == "chardev-remove"
