"""Fixtures: two private libvirt test-driver "hosts" and helpers to start domains."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ivloop_libvirt import lv

from .lvfakes import FakeHost

SOCK_A = "/run/ivloop-server/ivloop.sock"
SOCK_B = "/srv/ivloop/b.sock"


def shmem_xml(socket: str = SOCK_A, slot: int = 5, bus: int = 0) -> str:
    return (f"<shmem name='ivloop0' role='peer'><model type='ivshmem-doorbell'/>"
            f"<server path='{socket}'/><msi vectors='2' ioeventfd='on'/>"
            f"<address type='pci' domain='0x0000' bus='0x{bus:02x}' slot='0x{slot:02x}' "
            f"function='0x0'/></shmem>")


@pytest.fixture
def host_a(tmp_path: Path) -> Iterator[FakeHost]:
    lv._quiet_libvirt()
    host = FakeHost(tmp_path, "a")
    yield host
    host.real.close()


@pytest.fixture
def host_b(tmp_path: Path) -> Iterator[FakeHost]:
    host = FakeHost(tmp_path, "b")
    yield host
    host.real.close()
