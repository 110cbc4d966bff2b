"""QEMU's monitor verbs for the ivloop device and for migration, in one place.

The direct backend speaks them to its own QEMUs (:mod:`harness.backends.direct`,
which also re-plugs after a server restart); the libvirt backend leaves
both to libvirt through :mod:`ivloop_libvirt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from harness.errors import HarnessError, MigrationError, StateError
from harness.lab import qemu
from harness.lab.state import VMState
from ivloop_libvirt import fdholes
from ivloop_libvirt.flow import Progress

log = logging.getLogger(__name__)

DEFAULT_BANDWIDTH_MIB = 128  # QEMU's own default


# QEMU's ivshmem unrealize closes its vector eventfds but leaves the TCG
# fd handlers watching their numbers (opaque: the freed msi_vectors).  When a
# later fd reuses such a number and becomes readable (a QMP or SSH socket, the
# next device's own eventfds), QEMU runs the stale handler and crashes.  So an
# unplug parks a never-signalled eventfd (QMP `getfd`, held until QEMU exits)
# on every fd number it freed, before anything else can take one; Linux hands
# out the lowest free number, so the holes below are filled as well.
# Done on every QEMU version: seen on 7.2, and the unrealize path is the same
# in upstream's hw/misc/ivshmem-pci.c, so it is still needed.  Which numbers
# to fill, and when to give up, is ivloop_libvirt.fdholes' plan, shared with
# the libvirt backend.


def open_fds(pid: int) -> set[int]:
    """The fd numbers open in process *pid*."""
    try:
        return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    except OSError as exc:
        raise StateError(f"cannot list the fds of QEMU pid {pid}: {exc}") from exc


async def park_fds(mon: qemu.Monitor, pid: int, numbers: set[int], tag: str) -> int:
    """Occupy every free fd number in *numbers* (and the holes below); how many parked."""
    parked = 0
    for _ in fdholes.holes(pid, numbers, open_fds):
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            mon.client.send_fd_scm(fd)
            await mon.cmd("getfd", {"fdname": f"ivl-park-{tag}-{parked}"})
        finally:
            os.close(fd)
        parked += 1
    return parked


async def unplug_ivshmem(mon: qemu.Monitor, vs: VMState, timeout: float = 30) -> None:
    """device_del *vs*'s ivshmem device, wait for DEVICE_DELETED, park the freed fds.

    Counts the unplug in ``vs.unplugs``, which names the parked fds.
    """
    if vs.proc is None:
        raise StateError(f"VM {vs.name} has no QEMU process")
    pid = vs.proc.pid
    before = open_fds(pid)
    with mon.listener("DEVICE_DELETED") as listener:
        await mon.cmd("device_del", {"id": qemu.IVSHMEM_ID})
        await mon.wait_event(listener, timeout, {"device": qemu.IVSHMEM_ID})
    vs.unplugs += 1
    await mon.cmd("chardev-remove", {"id": qemu.IVSHMEM_CHARDEV})
    n = await park_fds(mon, pid, before - open_fds(pid), str(vs.unplugs))
    log.debug("QEMU pid %d: parked %d fds after unplugging ivshmem", pid, n)


# QEMU's words when the server answers with version -1 (a refusal)
REFUSED = "server sent version -1"


async def plug_ivshmem(mon: qemu.Monitor, server_socket: str) -> None:
    """Connect a chardev to *server_socket* and hot-add ivshmem-doorbell on it."""
    await mon.cmd("chardev-add", {
        "id": qemu.IVSHMEM_CHARDEV,
        "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": server_socket}}, "server": False}},
    })  # fmt: skip
    try:
        await mon.cmd("device_add", {
            "driver": "ivshmem-doorbell", "id": qemu.IVSHMEM_ID, "chardev": qemu.IVSHMEM_CHARDEV,
            "vectors": 2, "bus": "pci.0", "addr": qemu.IVSHMEM_ADDR,
        })  # fmt: skip
    except HarnessError as exc:
        await mon.cmd("chardev-remove", {"id": qemu.IVSHMEM_CHARDEV})
        if REFUSED in str(exc):
            # how ivloop-server refuses (full, or an evicted QEMU's hold-off)
            raise type(exc)(f"{exc} (ivloop-server refused this QEMU; its log, "
                            "logs/server-HOST.log in the state directory, says why)") from exc
        raise


async def wait_migration(src: qemu.Monitor, listener: Any, timeout: float,
                         progress: Progress, t0: float) -> dict[str, Any]:
    """Wait for the source's MIGRATION event to say completed or failed."""
    deadline = time.monotonic() + timeout
    status = "setup"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MigrationError(f"migration did not complete within {timeout:.0f} s")
        try:
            event = await src.wait_event(listener, min(left, 0.5))
            status = str(event["data"]["status"])
            progress("migration", {"status": status, "t": time.monotonic() - t0})
        except HarnessError:
            pass  # no event in this slice: report progress below
        if status in ("completed", "failed", "cancelled"):
            info: dict[str, Any] = await src.cmd("query-migrate")
            return {"status": status, **info}
        with contextlib.suppress(HarnessError):
            info = await src.cmd("query-migrate", timeout=5)
            ram = info.get("ram", {})
            progress("transfer", {"status": info.get("status", status),
                                  "mib": ram.get("transferred", 0) / 2**20,
                                  "t": time.monotonic() - t0})


async def completed_stats(src: qemu.Monitor) -> dict[str, Any]:
    """query-migrate may say completed before downtime is filled in: ask again."""
    info: dict[str, Any] = {}
    for _ in range(20):
        info = await src.cmd("query-migrate")
        if "downtime" in info and "total-time" in info:
            break
        await asyncio.sleep(0.05)
    return info


async def set_up_migration(src: qemu.Monitor, dst: qemu.Monitor, uri: str,
                           max_bandwidth_mib: int | None) -> None:
    """Events on both ends, the bandwidth cap on the source, the destination listening."""
    caps = [{"capability": "events", "state": True}]
    await dst.cmd("migrate-set-capabilities", {"capabilities": caps})
    await src.cmd("migrate-set-capabilities", {"capabilities": caps})
    # Always set: a cap left by an earlier (failed) attempt would stick.
    await src.cmd("migrate-set-parameters",
                  {"max-bandwidth": (max_bandwidth_mib or DEFAULT_BANDWIDTH_MIB) * 2**20})
    await dst.cmd("migrate-incoming", {"uri": uri})


async def resume(mon: qemu.Monitor) -> None:
    """``cont`` unless the VM already runs."""
    status = await mon.cmd("query-status")
    if status.get("status") != "running":
        await mon.cmd("cont")


async def cancel_migration(mon: qemu.Monitor) -> None:
    """``migrate_cancel``; a source with no migration to cancel is fine."""
    with contextlib.suppress(HarnessError):
        await mon.cmd("migrate_cancel")


async def ram_bytes(mon: qemu.Monitor) -> int:
    """The VM's base RAM in bytes (a migration destination must repeat it)."""
    return int((await mon.cmd("query-memory-size-summary"))["base-memory"])
