"""Topology files: which simulated hosts exist and which VMs run on them.

A topology is a small TOML file (see ``topologies/default.toml``).  Parsing
validates everything up front so that a bad file changes nothing.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from harness.errors import TopologyError
from ivloop_server.options import parse_size
from ivloop_server.region import is_power_of_two

_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$", re.IGNORECASE)
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_HOST_KEYS = {"max_peers", "region_size"}
# Words for the guest command line; ivl.* is the harness's own namespace.
_KERNEL_ARGS = re.compile(r"(?=.{0,256}$)\s*(?:(?!ivl\.)[A-Za-z0-9._,:=+/-]+(?:\s+|$))*")
_VM_KEYS = {"host", "mac", "ip", "ip6", "mobile", "memory", "cpus", "group", "driver",
            "kernel_args", "image"}
#: Guest images a VM boots: the busybox initramfs (images/build, `make image`)
#: or the systemd Debian disk (images/build-debian, `make debian-image`).
IMAGES = ("initramfs", "debian")
_NET_KEYS = {"subnet", "subnet6", "mtu"}
#: The data network's MTU bounds: IPv6 (every guest has an address) needs
#: 1280, and 65535 is the most Linux's bridges, taps, veths and virtio-net take.
MTU_MIN, MTU_MAX = 1280, 65535
#: What every link has when a topology sets no MTU (the kernel's default).
DEFAULT_MTU = 1500


@dataclass(frozen=True)
class HostSpec:
    """A simulated host: a network namespace with a bridge and one server."""

    name: str
    index: int
    max_peers: int = 8
    region_size: str = "128M"


@dataclass(frozen=True)
class VMSpec:
    """A guest and its place in the topology."""

    name: str
    index: int
    host: str
    mac: str
    ip: str
    ip6: str
    prefixlen: int
    prefixlen6: int
    mobile: bool = False
    memory: int = 256
    cpus: int = 1
    # Load ivloop.ko in this guest; None: follow the topology-wide choice
    # (`harness up --no-driver`).  False leaves the ivshmem device unbound,
    # e.g. for ivl-dir or the hostile peer of the reliability tests.
    driver: bool | None = None
    # Extra guest kernel command-line words, e.g. "profile=2" (debugging).
    kernel_args: str = ""
    # Which guest image it boots (one of IMAGES).
    image: str = "initramfs"
    # The data network's MTU ([network] mtu), None when the topology sets
    # none: the guest is then told nothing and keeps the kernel's 1500.
    mtu: int | None = None

    @property
    def mgmt_mac(self) -> str:
        return f"52:54:00:ff:{self.index >> 8:02x}:{self.index & 0xFF:02x}"


@dataclass(frozen=True)
class Topology:
    hosts: dict[str, HostSpec]
    vms: dict[str, VMSpec]
    source: str = "<default>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    # [network] mtu: every host bridge, tap and wire gets it, and every
    # guest's eth0 (so ivl0); None leaves all of them at the kernel's 1500.
    mtu: int | None = None

    def host(self, name: str) -> HostSpec:
        try:
            return self.hosts[name]
        except KeyError:
            raise TopologyError(
                f"unknown host '{name}' (hosts: {', '.join(sorted(self.hosts))})"
            ) from None

    def vm(self, name: str) -> VMSpec:
        try:
            return self.vms[name]
        except KeyError:
            raise TopologyError(
                f"unknown VM '{name}' (VMs: {', '.join(sorted(self.vms))})"
            ) from None

    def vms_on(self, host: str) -> list[VMSpec]:
        return [vm for vm in self.vms.values() if vm.host == host]


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise TopologyError(f"{where}: '{key}' must be a table")
    return value


def _check_keys(got: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise TopologyError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def _is_int(value: Any) -> bool:
    """TOML integers only: `true` is an int to Python but not a count."""
    return isinstance(value, int) and not isinstance(value, bool)


def _region_size_ok(text: str) -> bool:
    """The server's own check (a size it parses, a power of two), made early,
    before anything starts; its parser, so the two cannot disagree."""
    try:
        return is_power_of_two(parse_size(text))
    except argparse.ArgumentTypeError:
        return False


def _check_name(name: str, what: str, where: str) -> None:
    if not _NAME_RE.match(name):
        raise TopologyError(
            f"{where}: {what} name '{name}' must be 1-8 letters or digits starting with a letter"
        )


def _mtu(net: dict[str, Any], where: str) -> int | None:
    if "mtu" not in net:
        return None
    mtu = net["mtu"]
    if not _is_int(mtu) or not MTU_MIN <= mtu <= MTU_MAX:
        raise TopologyError(
            f"{where}: mtu must be an integer in {MTU_MIN}..{MTU_MAX} (bytes of IP packet "
            f"per frame, e.g. 9000 for jumbo frames; IPv6 needs at least {MTU_MIN}), "
            f"not {mtu!r}")
    return int(mtu)


def parse(data: dict[str, Any], source: str = "<memory>") -> Topology:
    """Validate a decoded topology document and derive the missing fields."""
    _check_keys(data, {"network", "hosts", "vms"}, source)
    net = _table(data, "network", source)
    _check_keys(net, _NET_KEYS, f"{source} [network]")
    try:
        subnet = ipaddress.IPv4Network(net.get("subnet", "10.77.0.0/24"))
        subnet6 = ipaddress.IPv6Network(net.get("subnet6", "fd77::/64"))
    except ValueError as exc:
        raise TopologyError(f"{source} [network]: {exc}") from exc
    if not subnet.is_private or not subnet6.is_private:
        raise TopologyError(f"{source} [network]: data subnets must be private address ranges")
    mtu = _mtu(net, f"{source} [network]")

    hosts: dict[str, HostSpec] = {}
    seen_lower: dict[str, str] = {}
    for i, (name, spec) in enumerate(_table(data, "hosts", source).items()):
        where = f"{source} [hosts.{name}]"
        _check_name(name, "host", where)
        if not isinstance(spec, dict):
            raise TopologyError(f"{where}: must be a table")
        _check_keys(spec, _HOST_KEYS, where)
        max_peers = spec.get("max_peers", 8)
        if not _is_int(max_peers) or not 2 <= max_peers <= 64:
            raise TopologyError(f"{where}: max_peers must be an integer in 2..64")
        region_size = str(spec.get("region_size", "128M"))
        if not _region_size_ok(region_size):
            raise TopologyError(
                f"{where}: region_size '{region_size}' must be a power of two in bytes, "
                "optionally with a K, M or G suffix (e.g. \"32M\")"
            )
        hosts[name] = HostSpec(name=name, index=i, max_peers=max_peers, region_size=region_size)
        seen_lower[name.lower()] = name
    if not hosts:
        raise TopologyError(f"{source}: at least one [hosts.NAME] table is required")

    vms: dict[str, VMSpec] = {}
    macs: dict[str, str] = {}
    ips: dict[str, str] = {}
    hosts_ips = list(subnet.hosts())
    for i, (name, spec) in enumerate(_table(data, "vms", source).items(), start=1):
        where = f"{source} [vms.{name}]"
        _check_name(name, "VM", where)
        if name.lower() in seen_lower:
            raise TopologyError(f"{where}: name '{name}' is already used by a host")
        if not isinstance(spec, dict):
            raise TopologyError(f"{where}: must be a table")
        _check_keys(spec, _VM_KEYS, where)
        host = spec.get("host")
        if host not in hosts:
            raise TopologyError(
                f"{where}: host '{host}' is not defined (hosts: {', '.join(sorted(hosts))})"
            )
        mac = str(spec.get("mac", f"52:54:00:77:{i >> 8:02x}:{i & 0xFF:02x}")).lower()
        if not _MAC_RE.match(mac):
            raise TopologyError(f"{where}: invalid MAC address '{mac}'")
        if int(mac[:2], 16) & 1:
            raise TopologyError(f"{where}: MAC '{mac}' is multicast; a NIC needs a unicast MAC")
        if mac.startswith("52:54:00:ff:"):
            raise TopologyError(f"{where}: MAC prefix 52:54:00:ff is reserved for management NICs")
        if mac in macs:
            raise TopologyError(f"{where}: MAC {mac} is already used by {macs[mac]}")
        try:
            ip = ipaddress.IPv4Address(spec["ip"]) if "ip" in spec else hosts_ips[i - 1]
            ip6 = ipaddress.IPv6Address(spec["ip6"]) if "ip6" in spec else subnet6[i]
        except (ValueError, IndexError) as exc:
            raise TopologyError(f"{where}: bad address: {exc}") from exc
        if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
            raise TopologyError(f"{where}: {ip} is not a host address of {subnet}")
        if ip6 not in subnet6:
            raise TopologyError(f"{where}: {ip6} is not in {subnet6}")
        if str(ip) in ips:
            raise TopologyError(f"{where}: address {ip} is already used by {ips[str(ip)]}")
        memory = spec.get("memory", 256)
        cpus = spec.get("cpus", 1)
        if not _is_int(memory) or not 128 <= memory <= 16384:
            raise TopologyError(f"{where}: memory must be an integer number of MiB in 128..16384")
        if not _is_int(cpus) or not 1 <= cpus <= 8:
            raise TopologyError(f"{where}: cpus must be an integer in 1..8")
        mobile = spec.get("mobile", False)
        if not isinstance(mobile, bool):
            raise TopologyError(f"{where}: mobile must be true or false")
        driver = spec.get("driver")
        if driver is not None and not isinstance(driver, bool):
            raise TopologyError(f"{where}: driver must be true or false")
        kernel_args = spec.get("kernel_args", "")
        if not isinstance(kernel_args, str) or not _KERNEL_ARGS.fullmatch(kernel_args):
            raise TopologyError(
                f"{where}: kernel_args must be a string of at most 256 characters: "
                "space-separated words of letters, digits and ._,:=+/- (no quotes, "
                "and no ivl.* words, which the harness sets)")
        image = spec.get("image", "initramfs")
        if image not in IMAGES:
            raise TopologyError(
                f"{where}: image must be one of {', '.join(repr(i) for i in IMAGES)}, "
                f"not {image!r}")
        if image == "debian" and driver is False:
            raise TopologyError(
                f"{where}: a debian guest always stacks ivl0 from its own configuration; "
                "driver = false needs image = \"initramfs\"")
        if image == "debian" and mtu not in (None, DEFAULT_MTU):
            raise TopologyError(
                f"{where}: a debian guest keeps its NIC at {DEFAULT_MTU} bytes (its own "
                f"networkd configuration); [network] mtu = {mtu} needs image = \"initramfs\" "
                "guests")
        macs[mac] = name
        ips[str(ip)] = name
        vms[name] = VMSpec(
            name=name, index=i, host=host, mac=mac, ip=str(ip), ip6=str(ip6),
            prefixlen=subnet.prefixlen, prefixlen6=subnet6.prefixlen,
            mobile=mobile, memory=memory, cpus=cpus, driver=driver,
            kernel_args=" ".join(kernel_args.split()), image=image, mtu=mtu,
        )
    for host in hosts.values():
        count = sum(1 for vm in vms.values() if vm.host == host.name)
        if count > host.max_peers:
            raise TopologyError(
                f"{source}: host {host.name} has {count} VMs but max_peers = {host.max_peers}"
            )
    return Topology(hosts=hosts, vms=vms, source=source, raw=data, mtu=mtu)


def load(path: Path | None = None) -> Topology:
    """Load a topology file, or the default topology when *path* is None."""
    if path is None:
        text = resources.files("harness").joinpath("topologies/default.toml").read_text()
        source = "default topology"
    else:
        try:
            text = path.read_text()
        except OSError as exc:
            raise TopologyError(f"cannot read topology file {path}: {exc.strerror}") from exc
        source = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{source}: not valid TOML: {exc}") from exc
    return parse(data, source)
