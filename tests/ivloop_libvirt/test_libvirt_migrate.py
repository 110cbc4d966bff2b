"""migrate: phases, flags, statistics, and the rollback after each failing phase."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from typing import Any

import libvirt
import pytest

from ivloop_libvirt import lv, shmem
from ivloop_libvirt import migrate as mig
from ivloop_libvirt.errors import (
    DeviceStateError,
    IncompleteMigrationError,
    MigrationError,
    RequestError,
)
from ivloop_libvirt.shmem import PciAddress

from .conftest import SOCK_A, SOCK_B, shmem_xml
from .lvfakes import FakeDomain, FakeHost, lv_error

LIVE = libvirt.VIR_MIGRATE_LIVE
PERSIST = libvirt.VIR_MIGRATE_PERSIST_DEST
UNDEFINE = libvirt.VIR_MIGRATE_UNDEFINE_SOURCE


def _vm(host: FakeHost, *, persistent: bool = True, slot: int = 5) -> FakeDomain:
    return host.start(host.domain_xml("vm2", devices=shmem_xml(SOCK_A, slot=slot)),
                      persistent=persistent)


def _migrate_call(dom: FakeDomain) -> tuple[str, str, int]:
    [call] = [c for c in dom.calls if c[0] == "migrate3"]
    return call


def _assert_source_restored(src: FakeDomain, slot: int = 5) -> None:
    """Source running, not paused, with the very device it had (socket, address)."""
    assert src.real.isActive()
    assert src.real.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    found = shmem.find_shmem(src.XMLDesc(0))
    assert found is not None
    assert found.device.socket == SOCK_A and found.device.address == PciAddress(slot=slot)


def test_success_persistent(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a, slot=6)
    hooks: list[tuple[str, str, float]] = []

    def switch_source(dom: lv.Domain, since: float) -> float:
        # the device is already gone from the source when the caller waits
        assert shmem.find_shmem(dom.XMLDesc(0)) is None
        hooks.append(("source", dom.name(), since))
        return 0.25

    def switch_dest(dom: lv.Domain, since: float) -> float:
        assert shmem.find_shmem(dom.XMLDesc(0)) is not None
        hooks.append(("dest", dom.connect().getURI(), since))
        return 0.5

    phases: list[str] = []
    report = mig.migrate(src, host_b.conn, migrate_uri="tcp://10.0.0.2:49152",
                         dest_socket=SOCK_B, max_bandwidth_mib=64,
                         progress=lambda p, _: phases.append(p),
                         switch_source=switch_source, switch_dest=switch_dest)
    assert report.ok and report.failed_phase == "" and report.error == ""
    _, _, flags = _migrate_call(src)
    assert flags == LIVE | PERSIST | UNDEFINE
    assert report.flags == ["VIR_MIGRATE_LIVE", "VIR_MIGRATE_PERSIST_DEST",
                            "VIR_MIGRATE_UNDEFINE_SOURCE"]
    params = src.params
    assert params[libvirt.VIR_MIGRATE_PARAM_URI] == "tcp://10.0.0.2:49152"
    assert params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 64
    # the definition that moves points at the destination's server
    persisted = shmem.find_shmem(params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML])
    assert persisted is not None and persisted.device.socket == SOCK_B
    # source: gone and undefined; destination: running with a new device on B's server
    with pytest.raises(libvirt.libvirtError):
        host_a.real.lookupByName("vm2")
    dst = host_b.conn.lookupByName("vm2")
    found = shmem.find_shmem(dst.XMLDesc(0))
    assert found is not None
    assert found.device.socket == SOCK_B and found.device.address == PciAddress(slot=6)
    conf = shmem.find_shmem(dst.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert conf is not None and conf.device.socket == SOCK_B
    # statistics from libvirt's completed job, timings from the phases
    assert report.downtime_ms == 42 and report.job_ms == 2400 and report.setup_ms == 7
    assert report.transferred_mib == 256
    assert report.switch_source_s == 0.25 and report.switch_dest_s == 0.5
    assert [h[:2] for h in hooks] == [("source", "vm2"), ("dest", host_b.uri)]
    assert hooks[0][2] <= hooks[1][2]
    assert report.total_s >= report.unplug_s + report.migrate_s + report.plug_s
    assert (report.source_socket, report.dest_socket) == (SOCK_A, SOCK_B)
    assert phases[0] == "unplug on source" and phases[-2].startswith("peers on the dest")
    assert phases[-1] == "source stopped" and report.completed and report.backend == "libvirt"
    assert [e[1] for e in report.events][:2] == ["unplug on source",
                                                 "source left the shared region"]


def test_success_transient_stays_transient(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a, persistent=False)
    report = mig.migrate(src, host_b.conn)
    assert _migrate_call(src)[2] == LIVE
    assert libvirt.VIR_MIGRATE_PARAM_PERSIST_XML not in src.params
    assert report.dest_socket == SOCK_A  # default: the source's path
    dst = host_b.conn.lookupByName("vm2")
    assert not dst.isPersistent()
    found = shmem.find_shmem(dst.XMLDesc(0))
    assert found is not None and found.device.socket == SOCK_A


def test_keep_source_definition(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a)
    mig.migrate(src, host_b.conn, keep_source_definition=True)
    assert _migrate_call(src)[2] == LIVE | PERSIST
    assert not host_a.real.lookupByName("vm2").isActive()  # defined, not running


def test_without_device_migrates_and_plugs_nothing(host_a: FakeHost, host_b: FakeHost) -> None:
    src = host_a.start(host_a.domain_xml("vm2"))
    report = mig.migrate(src, host_b.conn, dest_socket=SOCK_B)
    assert report.ok and report.unplug_s == 0 and report.plug_s == 0
    assert shmem.find_shmem(host_b.conn.lookupByName("vm2").XMLDesc(0)) is None


# -- check phase: nothing changes


def test_same_host_uuid_refused_before_anything(host_a: FakeHost, host_b: FakeHost) -> None:
    host_b.uuid = host_a.uuid
    src = _vm(host_a)
    with pytest.raises(RequestError, match=r"same host UUID.*host_uuid"):
        mig.migrate(src, host_b.conn)
    assert src.calls == []


def test_already_running_on_destination(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a)
    host_b.real.createXML(src.real.XMLDesc(0), 0)
    with pytest.raises(RequestError, match="already running on"):
        mig.migrate(src, host_b.conn)
    assert src.calls == []


def test_stopped_source(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a)
    src.real.destroy()
    with pytest.raises(DeviceStateError, match="not running"):
        mig.migrate(src, host_b.conn)
    assert src.calls == []


# -- rollback, phase by phase


def test_unplug_refused_keeps_everything(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a)
    src.detach_error = lv_error(libvirt.VIR_ERR_OPERATION_FAILED,
                                "operation failed: device detach timed out")
    with pytest.raises(MigrationError) as info:
        mig.migrate(src, host_b.conn)
    assert type(info.value) is MigrationError
    r = info.value.report
    assert r.failed_phase == "unplug" and r.source_restored and not r.ok
    assert "stays on" in str(info.value) and "unplug failed" in str(info.value)
    assert [c[0] for c in src.calls] == ["detach"]  # no migration, nothing re-attached
    _assert_source_restored(src)


def test_unplug_never_completes(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a)
    src.detach_never = True
    with pytest.raises(MigrationError, match="did not release") as info:
        mig.migrate(src, host_b.conn, unplug_timeout=0.2)
    assert info.value.report.failed_phase == "unplug"
    assert "migrate3" not in [c[0] for c in src.calls]
    _assert_source_restored(src)


def test_destination_daemon_lost_mid_migration(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a, slot=6)
    src.migrate_error = lv_error(libvirt.VIR_ERR_RPC, "End of file while reading data: "
                                 "Input/output error", libvirt.VIR_FROM_RPC)
    src.migrate_pauses = True
    with pytest.raises(MigrationError, match=r"stays on .*migrate failed: End of file") as info:
        mig.migrate(src, host_b.conn, dest_socket=SOCK_B)
    r = info.value.report
    assert type(info.value) is MigrationError
    assert r.failed_phase == "migrate" and r.source_restored and r.unplug_s > 0
    # paused by the failed migration: resumed; device attached again as it was
    assert [c[0] for c in src.calls] == ["detach", "migrate3", "resume", "attach"]
    attach_xml = ET.fromstring(src.calls[-1][1])
    assert attach_xml.find("alias") is None
    _assert_source_restored(src, slot=6)
    with pytest.raises(libvirt.libvirtError):
        host_b.real.lookupByName("vm2")


def test_migration_timeout_aborts_the_job(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a)
    src.migrate_blocks = True
    t = time.monotonic()
    with pytest.raises(MigrationError, match=r"did not complete within 0.3 s") as info:
        mig.migrate(src, host_b.conn, timeout=0.3)
    assert time.monotonic() - t < 5
    assert src.aborted.is_set()
    assert info.value.report.failed_phase == "migrate"
    assert [c[0] for c in src.calls] == ["detach", "migrate3", "abortJob", "attach"]
    _assert_source_restored(src)


def test_source_gone_after_failure(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a)
    src.migrate_error = lv_error(libvirt.VIR_ERR_OPERATION_FAILED, "operation failed: "
                                 "domain is no longer running")
    src.migrate_kills_source = True
    with pytest.raises(IncompleteMigrationError) as info:
        mig.migrate(src, host_b.conn)
    r = info.value.report
    assert r.failed_phase == "migrate" and r.source_restored is False
    assert "virsh list --all" in r.hint
    assert "attach" not in [c[0] for c in src.calls]


def test_source_cannot_get_its_device_back(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a)
    src.migrate_error = lv_error(libvirt.VIR_ERR_OPERATION_FAILED, "operation failed: x")
    src.attach_error = lv_error(libvirt.VIR_ERR_INTERNAL_ERROR,
                                "internal error: server sent version -1")
    with pytest.raises(IncompleteMigrationError) as info:
        mig.migrate(src, host_b.conn)
    r = info.value.report
    assert r.failed_phase == "migrate" and r.source_restored is False
    assert r.hint.startswith("the source keeps running but without shared memory")
    assert f"ivloop-libvirt plug vm2 --connect '{host_a.uri}' --socket {SOCK_A}" in r.hint
    assert src.real.isActive()


def test_destination_refuses_the_new_device(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a)
    host_b.attach_error = lv_error(libvirt.VIR_ERR_INTERNAL_ERROR,
                                   f"internal error: Failed to connect to '{SOCK_B}': "
                                   "No such file or directory")
    with pytest.raises(IncompleteMigrationError, match="runs there without shared memory "
                       r"\(over its lower NIC\).*could not join") as info:
        mig.migrate(src, host_b.conn, dest_socket=SOCK_B)
    r = info.value.report
    assert r.failed_phase == "plug" and not r.ok and r.completed and r.source_restored is None
    assert r.hint.endswith(f"ivloop-libvirt plug vm2 --connect '{host_b.uri}' "
                           f"--socket {SOCK_B}")
    # the VM runs on the destination (without device); the source is not touched again
    dst = host_b.conn.lookupByName("vm2")
    assert dst.isActive() and shmem.find_shmem(dst.XMLDesc(0)) is None
    assert "attach" not in [c[0] for c in src.calls]
    assert r.downtime_ms == 42  # the migration itself is still reported


def test_failing_hook_does_not_undo_a_migration(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a)

    def broken(dom: lv.Domain, since: float) -> float:
        raise RuntimeError("ssh to the peer failed")

    report = mig.migrate(src, host_b.conn, switch_source=broken, switch_dest=broken)
    assert report.ok and report.switch_source_s is None and report.switch_dest_s is None


def test_interrupt_rolls_back_then_propagates(host_a: FakeHost, host_b: FakeHost) -> None:
    src = _vm(host_a)

    def ctrl_c(dom: lv.Domain, since: float) -> float:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mig.migrate(src, host_b.conn, switch_source=ctrl_c)
    assert [c[0] for c in src.calls] == ["detach", "attach"]
    _assert_source_restored(src)


def test_migrate_by_name_closes_both_connections(host_a: FakeHost, host_b: FakeHost,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _vm(host_a)
    conns: dict[str | None, Any] = {"src": host_a.conn, "dst": host_b.conn}
    monkeypatch.setattr(lv, "connect", lambda uri=None: conns[uri])
    report = mig.migrate_by_name("vm2", "dst", connect_uri="src")
    assert report.ok and host_a.closed and host_b.closed
