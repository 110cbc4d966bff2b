"""Which MAC may a peer publish?  Its QEMU's data NIC, learned from outside the guest.

A guest writes its own MAC into its directory slot, and peers send frames
for that MAC into its ring.  A guest claiming someone else's MAC (another
host's VM, the gateway) would pull their traffic into its ring.  The server
sits outside the guests: it asks the kernel who connected (SO_PEERCRED),
reads that QEMU's command line from ``/proc/PID/cmdline`` and finds the
NICs in it:

- ``-device DRIVER,...,mac=XX`` for any NIC model (virtio-net-pci and its
  transitional variants, e1000, e1000e, rtl8139, vmxnet3, ...; any device
  with a ``mac`` or ``netdev`` property is a NIC), in QEMU's keyval form or
  the JSON form libvirt uses (``-device {"driver":"virtio-net-pci",...}``);
- ``-nic TYPE,...,mac=XX`` and ``-net nic,...,macaddr=XX``.

(The default NIC QEMU adds without -net/-nic/-netdev/-nodefaults is not
modelled: it is user-mode with a MAC of QEMU's choosing, so it can never
be the data NIC and never changes the outcome below.)

Exactly one NIC: that is the data NIC.  Several: NICs on a user-mode
(slirp) backend are set aside -- they reach only QEMU's built-in NAT, never
another guest, so they cannot be the NIC whose MAC peers route to (the
harness's management NIC is one) -- and if exactly one is left, that is
the data NIC.  Otherwise, or when the data NIC's MAC is left to QEMU, the
MAC is unknown, unless the operator's map (``--nic-macs FILE``, see
:func:`load_nic_map`) names the QEMU's ``-name``; the map wins over the
command line.  Anything that could add or change NICs behind the parser's
back (``-readconfig``, ``-set`` or ``-global`` touching a NIC property, a
``-device`` that does not parse) makes the command line say "unknown".

NICs hot-plugged later through QMP are not on the command line; a QEMU that
gets its data NIC that way needs a map entry.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from .errors import ConfigError, NicMapError

log = logging.getLogger(__name__)

MAC_LEN: Final = 6
#: A QEMU command line is a few KiB; ARG_MAX bounds it anyway.  Reading
#: stops here so a strange process cannot make the server read forever.
MAX_CMDLINE: Final = 4 << 20
MAX_MAP_SIZE: Final = 1 << 20

# NIC models QEMU's x86 machines offer (``-device help``, "Network devices").
# Any -device with a mac= or netdev= property also counts: those are
# qdev's NIC properties, so a model missing here is still recognised as
# soon as it is given a MAC.
NIC_DRIVERS: Final = frozenset(
    {
        "virtio-net",
        "virtio-net-pci",
        "virtio-net-pci-transitional",
        "virtio-net-pci-non-transitional",
        "virtio-net-device",
        "virtio-net-ccw",
        "e1000",
        "e1000-82540em",
        "e1000-82544gc",
        "e1000-82545em",
        "e1000e",
        "igb",
        "rtl8139",
        "ne2k_pci",
        "ne2k_isa",
        "pcnet",
        "vmxnet3",
        "tulip",
        "usb-net",
        "i82550",
        "i82551",
        "i82557a",
        "i82557b",
        "i82557c",
        "i82558a",
        "i82558b",
        "i82559a",
        "i82559b",
        "i82559c",
        "i82559er",
        "i82562",
        "i82801",
    }
)

# Options whose argument must not be mistaken for an option (so
# ``-append "... -device x"`` style values, or a value that happens to
# start with '-', are skipped whole).  Options not listed here and not
# parsed below are skipped one element at a time, which is only wrong for
# a value that is literally one of the option names parsed below.
_TAKES_ARG: Final = frozenset(
    {
        "accel", "action", "add-fd", "append", "audiodev", "bios", "blockdev", "boot", "cdrom",
        "chardev", "chroot", "compat", "cpu", "d", "D", "device", "display", "drive", "dtb",
        "fda", "fdb", "fsdev", "global", "hda", "hdb", "hdc", "hdd", "icount", "incoming",
        "initrd", "k", "kernel", "L", "loadvm", "m", "machine", "mem-path", "mon", "monitor",
        "msg", "name", "net", "netdev", "nic", "numa", "object", "overcommit", "parallel",
        "pidfile", "plugin", "qmp", "qmp-pretty", "readconfig", "rtc", "run-with", "runas",
        "sandbox", "serial", "set", "smbios", "smp", "spice", "trace", "usbdevice", "uuid",
        "vga", "virtfs", "vnc", "watchdog-action"
    }
)  # fmt: skip

# QEMU's own spellings accepted as the MAC of a -net nic.
_NET_MAC_KEYS: Final = ("macaddr", "mac")
_MAC_RE: Final = re.compile(r"^[0-9a-fA-F]{2}([:-])(?:[0-9a-fA-F]{2}\1){4}[0-9a-fA-F]{2}$")
_NAME_RE: Final = re.compile(r"^[^\s#]+$")


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` (or dashes) -> 6 bytes; ValueError saying what is wrong."""
    if not _MAC_RE.match(text):
        raise ValueError(
            f"{text!r} is not a MAC address (expected six hex pairs, 52:54:00:12:34:56)"
        )
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def check_unicast(mac: bytes) -> str | None:
    """Why ``mac`` cannot be a NIC's address, or None."""
    if mac == bytes(MAC_LEN):
        return "is all zeroes"
    if mac[0] & 1:
        return "is a multicast address (lowest bit of the first octet set)"
    return None


def split_keyval(text: str, implied: str) -> dict[str, str]:
    """QEMU's ``a,b=c,d=e,,f`` option syntax: ``,,`` is a literal comma.

    The first element without ``=`` is the ``implied`` key (driver, type);
    a later bare element ``x`` means ``x=on`` (QemuOpts' flag shorthand).
    A repeated key keeps the last value, as QemuOpts does.
    """
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    opts: dict[str, str] = {}
    for index, part in enumerate(parts):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            if index == 0:
                opts[implied] = part
            else:
                opts[part] = "on"
        else:
            opts[key] = value
    return opts


@dataclass(frozen=True)
class Nic:
    """One NIC of a QEMU command line."""

    origin: str  # how it was given, for messages: "-device virtio-net-pci", "-nic tap"
    mac: bytes | None  # None: not on the command line (QEMU picks one)
    netdev: str | None = None  # the -netdev id it uses, if any
    backend: str | None = None  # that netdev's type (tap, user, ...), if known
    device_id: str | None = None

    def describe(self) -> str:
        mac = format_mac(self.mac) if self.mac is not None else "MAC chosen by QEMU"
        backend = f" on {self.backend}" if self.backend else ""
        return f"{self.origin} ({mac}{backend})"


@dataclass(frozen=True)
class QemuCommandLine:
    """What the server understands of one QEMU command line."""

    name: str | None
    nics: tuple[Nic, ...]
    #: Reasons the NIC list may be incomplete or wrong; any makes it unusable.
    doubts: tuple[str, ...] = ()

    @property
    def explicit_macs(self) -> list[bytes]:
        return [n.mac for n in self.nics if n.mac is not None]

    def data_nic(self) -> tuple[bytes | None, str]:
        """(the data NIC's MAC, how it was chosen) or (None, why it is unknown)."""
        if self.doubts:
            return None, "; ".join(self.doubts)
        if not self.nics:
            return None, "no NIC on its command line"
        candidates = list(self.nics)
        if len(candidates) > 1:
            candidates = [n for n in self.nics if n.backend != "user"]
        if len(candidates) != 1:
            listed = ", ".join(n.describe() for n in self.nics)
            if not candidates:
                return None, f"{len(self.nics)} NICs, all user-mode: {listed}"
            return None, f"{len(candidates)} NICs could be the data NIC: {listed}"
        nic = candidates[0]
        if nic.mac is None:
            return None, f"its data NIC {nic.origin} has no mac= (QEMU chooses one)"
        how = "its only NIC" if len(self.nics) == 1 else "its only NIC not on user-mode networking"
        return nic.mac, f"command line, {how}: {nic.origin}"


def _option_name(arg: str) -> str | None:
    """``-device``/``--device`` -> ``device``; None for a non-option."""
    if len(arg) < 2 or arg[0] != "-" or arg == "--":
        return None
    return arg[2:] if arg.startswith("--") else arg[1:]


def _parse_json_or_keyval(value: str, implied: str, what: str) -> dict[str, str]:
    """-device/-netdev take JSON when the value starts with '{' (libvirt's form)."""
    if not value.lstrip().startswith("{"):
        return split_keyval(value, implied)
    try:
        obj = json.loads(value)  # starts with '{': an object, or an error
    except ValueError as exc:
        raise ValueError(f"{what} JSON does not parse: {exc}") from None
    assert isinstance(obj, dict)
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in obj.items()}


def parse_qemu_cmdline(argv: Sequence[str]) -> QemuCommandLine:
    """Find the ``-name`` and the NICs in a QEMU argv (argv[0] included or not).

    Never raises on odd input: what cannot be understood becomes a doubt.
    """
    name: str | None = None
    doubts: list[str] = []
    devices: list[dict[str, str]] = []  # -device NICs, before netdevs are resolved
    netdevs: dict[str, str] = {}  # id -> type
    nics: list[Nic] = []
    sets: list[str] = []
    i = 0
    while i < len(argv):
        opt = _option_name(argv[i])
        if opt is None:
            i += 1
            continue
        if opt not in _TAKES_ARG:
            i += 1
            continue
        if i + 1 >= len(argv):
            if opt in ("device", "nic", "net", "netdev", "name"):
                doubts.append(f"-{opt} without an argument")
            break
        value = argv[i + 1]
        i += 2
        try:
            if opt == "name":
                opts = split_keyval(value, "guest")
                name = opts.get("guest") or None
            elif opt == "device":
                opts = _parse_json_or_keyval(value, "driver", "-device")
                driver = opts.get("driver", "")
                if driver in NIC_DRIVERS or "mac" in opts or "netdev" in opts:
                    devices.append(opts)
            elif opt == "netdev":
                opts = _parse_json_or_keyval(value, "type", "-netdev")
                if "id" in opts:
                    netdevs[opts["id"]] = opts.get("type", "")
            elif opt == "nic":
                opts = split_keyval(value, "type")
                kind = opts.get("type", "")
                if kind != "none":
                    mac_opt = opts.get("mac")
                    model = opts.get("model", "default model")
                    nics.append(
                        Nic(
                            origin=f"-nic {kind} ({model})",
                            mac=parse_mac(mac_opt) if mac_opt is not None else None,
                            backend=kind or None,
                        )
                    )
            elif opt == "net":
                opts = split_keyval(value, "type")
                kind = opts.get("type", "")
                if kind == "nic":
                    mac_opt = next((opts[k] for k in _NET_MAC_KEYS if k in opts), None)
                    # Without netdev= it sits on a hub whose backend is some
                    # -net TYPE: unknown here, so a candidate like any other.
                    netdev = opts.get("netdev")
                    nics.append(
                        Nic(
                            origin=f"-net nic ({opts.get('model', 'default model')})",
                            mac=parse_mac(mac_opt) if mac_opt is not None else None,
                            netdev=netdev,
                        )
                    )
            elif opt == "readconfig":
                doubts.append(f"-readconfig {value} may define NICs this server cannot see")
            elif opt == "set":
                sets.append(value)
            elif opt == "global" and re.search(r"(^|[.,=])(mac|macaddr|netdev)\b", value):
                doubts.append(f"-global {value} changes NIC properties")
        except ValueError as exc:
            doubts.append(f"-{opt} {value}: {exc}")

    by_id = {d["id"]: d for d in devices if "id" in d}
    for s in sets:
        # -set device.ID.PROP=VALUE edits a -device given above.
        match = re.match(r"^device\.([^.]+)\.([^=]+)=(.*)$", s)
        if match and match.group(1) in by_id:
            by_id[match.group(1)][match.group(2)] = match.group(3)
        elif re.search(r"\.(mac|macaddr|netdev)=", s):
            doubts.append(f"-set {s} changes a NIC this server cannot see")

    for dev in devices:
        driver = dev.get("driver", "")
        mac_text = dev.get("mac")
        try:
            mac = parse_mac(mac_text) if mac_text is not None else None
        except ValueError as exc:
            doubts.append(f"-device {driver}: {exc}")
            continue
        netdev = dev.get("netdev")
        nics.append(
            Nic(
                origin=f"-device {driver}" + (f" id={dev['id']}" if "id" in dev else ""),
                mac=mac,
                netdev=netdev,
                backend=netdevs.get(netdev) if netdev else None,
                device_id=dev.get("id"),
            )
        )
    # Resolve -net nic,netdev=ID too (devices were done above).
    nics = [
        Nic(n.origin, n.mac, n.netdev, netdevs.get(n.netdev), n.device_id)
        if n.backend is None and n.netdev
        else n
        for n in nics
    ]
    return QemuCommandLine(name=name, nics=tuple(nics), doubts=tuple(doubts))


# -- the operator's map ------------------------------------------------------


def parse_nic_map(lines: Iterable[str], source: str) -> dict[str, bytes]:
    """``NAME MAC`` per line (``#`` comments, blank lines ignored) -> {name: mac}.

    NAME is the QEMU ``-name`` (``guest=NAME`` or the bare form).  Every bad
    line is reported, as ``line N: problem``, in one NicMapError.
    """
    entries: dict[str, bytes] = {}
    where: dict[str, int] = {}
    owners: dict[bytes, str] = {}
    errors: list[str] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            errors.append(
                f"line {lineno}: expected 'NAME MAC', got {len(fields)} field(s): {line!r}"
            )
            continue
        name, mac_text = fields
        if name.startswith("guest="):
            name = name[len("guest=") :]
        if not name or not _NAME_RE.match(name):
            errors.append(f"line {lineno}: {fields[0]!r} is not a QEMU -name")
            continue
        try:
            mac = parse_mac(mac_text)
        except ValueError as exc:
            errors.append(f"line {lineno}: {exc}")
            continue
        why = check_unicast(mac)
        if why is not None:
            errors.append(f"line {lineno}: {mac_text} {why}, not a NIC address")
            continue
        if name in entries:
            errors.append(f"line {lineno}: {name} already mapped on line {where[name]}")
            continue
        if mac in owners:
            errors.append(
                f"line {lineno}: {mac_text} is already {owners[mac]}'s (line "
                f"{where[owners[mac]]}); two QEMUs cannot share a data-NIC MAC"
            )
            continue
        entries[name] = mac
        where[name] = lineno
        owners[mac] = name
    if errors:
        raise NicMapError(source, errors)
    return entries


def load_nic_map(path: Path) -> dict[str, bytes]:
    """Read and check a ``--nic-macs`` file; ConfigError with every problem."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_MAP_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read --nic-macs file {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_MAP_SIZE:
        raise ConfigError(f"--nic-macs file {path} is larger than {MAX_MAP_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--nic-macs file {path} is not UTF-8 text: {exc}") from exc
    return parse_nic_map(text.splitlines(), str(path))


# -- resolving a connected peer ------------------------------------------------


@dataclass(frozen=True)
class NicIdentity:
    """What the server learned about the QEMU behind one connection."""

    pid: int
    mac: bytes | None  # the data NIC's MAC; None: unknown, claims are not checked
    #: Where ``mac`` came from ("command line, ...", "--nic-macs map"), or why it is unknown.
    source: str
    name: str | None = None  # QEMU -name
    #: /proc/PID/stat start time: with the pid, names one process even if pids wrap.
    start_time: int | None = None
    #: Something the operator should hear about (the map disagrees with the command line).
    warning: str | None = None

    @property
    def key(self) -> tuple[int, int] | None:
        """Identifies the process for eviction hold-offs; None when it cannot."""
        if self.pid <= 0 or self.start_time is None:
            return None
        return (self.pid, self.start_time)


class NicResolver(Protocol):
    """Tells the server a connecting QEMU's data-NIC MAC (the test seam)."""

    def resolve(self, pid: int) -> NicIdentity: ...


def read_cmdline(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """argv of process ``pid``; OSError (FileNotFoundError, PermissionError...) if unreadable."""
    with (proc / str(pid) / "cmdline").open("rb") as f:
        data = f.read(MAX_CMDLINE)
    args = data.split(b"\0")
    if args and args[-1] == b"":
        args.pop()
    return [a.decode("utf-8", "surrogateescape") for a in args]


def read_start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if unreadable."""
    try:
        text = (proc / str(pid) / "stat").read_text(errors="replace")
        # comm (field 2) is in parentheses and may hold spaces or ')'.
        rest = text[text.rindex(")") + 2 :].split()
        return int(rest[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class ProcNicResolver:
    """The production resolver: /proc/PID/cmdline, then the operator's map."""

    nic_map: Mapping[str, bytes] = field(default_factory=dict)
    proc: Path = Path("/proc")
    #: Reads argv; replaceable only so tests can make /proc misbehave.
    reader: Callable[[int, Path], list[str]] = read_cmdline

    def resolve(self, pid: int) -> NicIdentity:
        if pid <= 0:
            return NicIdentity(pid, None, "the kernel did not say which process connected")
        start = read_start_time(pid, self.proc)
        try:
            argv = self.reader(pid, self.proc)
        except FileNotFoundError:
            return NicIdentity(pid, None, f"process {pid} is gone", start_time=start)
        except PermissionError:
            return NicIdentity(
                pid, None, f"cannot read /proc/{pid}/cmdline: permission denied", start_time=start
            )
        except OSError as exc:
            return NicIdentity(
                pid,
                None,
                f"cannot read /proc/{pid}/cmdline: {exc.strerror or exc}",
                start_time=start,
            )
        if not argv:
            return NicIdentity(
                pid, None, f"process {pid} has an empty command line (exiting?)", start_time=start
            )
        cmdline = parse_qemu_cmdline(argv)
        mac, how = cmdline.data_nic()
        mapped = self.nic_map.get(cmdline.name) if cmdline.name is not None else None
        if mapped is None:
            return NicIdentity(pid, mac, how, cmdline.name, start)
        warning = None
        explicit = cmdline.explicit_macs
        if explicit and mapped not in explicit:
            warning = (
                f"--nic-macs maps {cmdline.name} to {format_mac(mapped)}, which is none of its "
                f"QEMU's NIC MACs ({', '.join(format_mac(m) for m in explicit)}); using the map "
                "(a guest using its NIC's MAC will be evicted)"
            )
        return NicIdentity(pid, mapped, "--nic-macs map", cmdline.name, start, warning)
