"""Simulated hosts on one machine: network namespaces, bridges, taps, wires.

A host is a network namespace holding a bridge ``br0``; each VM has a tap on
its host's bridge; a veth pair (the wire) joins two hosts' bridges.  Only
namespaces whose names the state directory recorded are ever removed.

A topology's MTU (``[network] mtu``) is given to every one of these links
(``mtu=``): a bridge forwards no frame larger than the port it leaves by,
so one link left at 1500 would drop jumbo frames silently.  Without it
(None) every link keeps the kernel's default.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import threading
from pathlib import Path

from pyroute2 import NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from harness.errors import HostNetError

log = logging.getLogger(__name__)

BRIDGE = "br0"
NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _mtu(mtu: int | None) -> dict[str, int]:
    """The netlink attribute for *mtu*, none at all for the kernel's default."""
    return {} if mtu is None else {"mtu": mtu}


def create_host(name: str, mtu: int | None = None) -> None:
    """Create namespace *name* with loopback and bridge ``br0`` up (MTU *mtu*)."""
    if exists(name):
        raise HostNetError(f"network namespace {name} already exists; run 'harness down'")
    try:
        netns.create(name)
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.link("add", ifname=BRIDGE, kind="bridge", br_stp_state=0, br_forward_delay=0)
            ns.link("set", index=ns.link_lookup(ifname=BRIDGE)[0], state="up", **_mtu(mtu))
    except (OSError, NetlinkError) as exc:
        raise HostNetError(f"cannot create host namespace {name}: {exc}") from exc
    log.info("host namespace %s created with bridge %s", name, BRIDGE)


def remove_host(name: str) -> bool:
    """Remove namespace *name* and with it every tap and wire end inside."""
    if not exists(name):
        return False
    try:
        netns.remove(name)
    except OSError as exc:
        raise HostNetError(f"cannot remove network namespace {name}: {exc}") from exc
    log.info("host namespace %s removed", name)
    return True


def add_tap(ns_name: str, tap: str, mtu: int | None = None) -> None:
    """Create *tap* in *ns_name* (MTU *mtu*), enslaved to its bridge, for QEMU to open."""
    try:
        with NetNS(ns_name) as ns:
            ns.link("add", ifname=tap, kind="tuntap", mode="tap")
            idx = ns.link_lookup(ifname=tap)[0]
            bridge = ns.link_lookup(ifname=BRIDGE)[0]
            ns.link("set", index=idx, master=bridge, state="up", **_mtu(mtu))
    except (OSError, NetlinkError) as exc:
        raise HostNetError(f"cannot create tap {tap} in {ns_name}: {exc}") from exc


def remove_link(ns_name: str, ifname: str) -> None:
    try:
        with NetNS(ns_name) as ns:
            found = ns.link_lookup(ifname=ifname)
            if found:
                ns.link("del", index=found[0])
    except (OSError, NetlinkError) as exc:
        raise HostNetError(f"cannot remove {ifname} from {ns_name}: {exc}") from exc


def add_wire(ns_a: str, end_a: str, ns_b: str, end_b: str, mtu: int | None = None) -> None:
    """Join the bridges of two hosts with a veth pair (both ends MTU *mtu*)."""
    try:
        with NetNS(ns_a) as ns:
            ns.link("add", ifname=end_a, kind="veth", peer={"ifname": end_b, "net_ns_fd": ns_b})
            ns.link(
                "set", index=ns.link_lookup(ifname=end_a)[0],
                master=ns.link_lookup(ifname=BRIDGE)[0], state="up", **_mtu(mtu),
            )  # fmt: skip
        with NetNS(ns_b) as ns:
            ns.link(
                "set", index=ns.link_lookup(ifname=end_b)[0],
                master=ns.link_lookup(ifname=BRIDGE)[0], state="up", **_mtu(mtu),
            )  # fmt: skip
    except (OSError, NetlinkError) as exc:
        raise HostNetError(f"cannot wire {ns_a} to {ns_b}: {exc}") from exc
    log.info("wire %s:%s <-> %s:%s%s", ns_a, end_a, ns_b, end_b,
             "" if mtu is None else f" (MTU {mtu})")


def connect(
    ns_name: str, port: int, host: str = "127.0.0.1", timeout: float = 5.0
) -> socket.socket:
    """A TCP connection made from inside namespace *ns_name*.

    A socket keeps the namespace it was created in, so a short-lived thread
    enters the namespace, connects, and hands the socket back; the rest of
    the process never leaves its own namespace.
    """
    result: list[socket.socket] = []
    failure: list[BaseException] = []

    def worker() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(NETNS_DIR / ns_name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            failure.append(exc)
            return
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                failure.append(OSError(err, os.strerror(err)))
                return
            result.append(socket.create_connection((host, port), timeout=timeout))
        except OSError as exc:
            failure.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=worker, name=f"netns-{ns_name}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        exc = failure[0]
        if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ETIMEDOUT):
            raise ConnectionRefusedError(exc.errno, f"{host}:{port} in {ns_name}: {exc.strerror}")
        raise HostNetError(f"cannot connect to {host}:{port} in {ns_name}: {exc}") from exc
    return result[0]


def bridge_fdb(ns_name: str) -> str:
    """The learned MAC -> port entries of *ns_name*'s bridge, one per line."""
    try:
        with NetNS(ns_name) as ns:
            names = {link["index"]: link.get("ifname") for link in ns.get_links()}
            lines = []
            for entry in ns.fdb("dump"):
                if entry.get("NDA_MASTER") is None:
                    continue
                port = names.get(entry["ifindex"], entry["ifindex"])
                lines.append(f"{entry.get('NDA_LLADDR')} {port} state {entry['state']}")
            return "\n".join(sorted(lines))
    except (OSError, NetlinkError) as exc:
        raise HostNetError(f"cannot read the bridge FDB of {ns_name}: {exc}") from exc
