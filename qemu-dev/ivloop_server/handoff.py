"""Handing a running server over to the next server process, members and all.

An upgrade replaces the server's code, which means a new process; a new
process with a new region and a new listening socket would cut every
running QEMU off (they keep their old region, no longer a member of
anything, until re-plugged).  Instead, on SIGUSR2 under systemd, a server
puts everything its members depend on in the unit's file-descriptor store
(``FileDescriptorStoreMax=``, :mod:`~ivloop_server.sdnotify`) and exits
with :data:`EXIT_HANDED_OFF`, which the unit restarts at once:

- ``region``: the memfd every QEMU maps;
- ``listener``: the listening socket, still bound to its path, so a QEMU
  that connects during the swap waits in its backlog;
- ``peer<ID>`` and ``peer<ID>v<N>``: each member's connection and the
  server's copies of its eventfds; ``parked<ID>v<N>``: a departed ID's
  eventfds, kept to hand on (see :mod:`~ivloop_server.server`);
- ``state``: a sealed memfd holding :class:`State` as JSON: what the server
  published in the directory, each member's ID, slot, process and what it
  was told, the next peer ID, the eviction hold-offs.

The next process finds them in ``LISTEN_FDS``/``LISTEN_FDNAMES``
(:func:`inherited`), reads the state once (:func:`load`: size-limited,
every field type- and range-checked), takes the descriptors over and takes
them out of the store again, so that nothing but the server holds a
member's connection: a member the server drops later must see EOF.  The
QEMUs never notice: their connection, eventfds and mapping stay the same,
and no protocol message is sent.  A stored descriptor the state names but
the store lost is that member's loss alone (its slot is marked absent).

A real stop (SIGTERM: ``systemctl stop`` or ``restart``) is not a
hand-off: members are dropped and marked absent, so that guests fall back
to the lower path, and systemd empties the store once the unit is down.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final

from . import abi
from .errors import HandOffError
from .nic import NicIdentity
from .protocol import MAX_PEER_ID
from .region import MAC_LEN, RegionRecord, ServerHalf
from .sdnotify import Notifier

log = logging.getLogger(__name__)

#: Exit status of a server that handed over (the unit restarts on it).
EXIT_HANDED_OFF: Final = 75
#: Version of the state's JSON; a server refuses one it does not know.
STATE_FORMAT: Final = 1
#: A state larger than this is refused unread (64 peers need about 40 KiB).
MAX_STATE_BYTES: Final = 4 << 20
#: The first fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START: Final = 3

STATE: Final = "state"
REGION: Final = "region"
LISTENER: Final = "listener"


def peer_name(peer_id: int) -> str:
    return f"peer{peer_id}"


def vector_name(prefix: str, peer_id: int, vector: int) -> str:
    return f"{prefix}{peer_id}v{vector}"


def fds_needed(max_peers: int, vectors: int) -> int:
    """Store entries a full region needs: state, region, listener, and per ID
    in circulation (at most ``max_peers``: live or parked) a socket and its
    eventfds."""
    return 3 + max_peers * (1 + vectors)


# -- the state ---------------------------------------------------------------


@dataclass(frozen=True)
class SavedPeer:
    id: int
    slot: int
    pid: int
    identity: NicIdentity
    known: frozenset[int]
    join_generation: int
    noted: frozenset[str]


@dataclass(frozen=True)
class SavedStrike:
    pid: int
    start_time: int
    count: int
    until: float
    forget: float
    evicted_at: float
    refusals: int


@dataclass(frozen=True)
class State:
    """What a server hands over besides descriptors (parsed and checked)."""

    pid: int
    version: str
    socket_path: str
    socket_id: tuple[int, int]
    vectors: int
    leave_notices: bool
    region: RegionRecord
    next_id: int
    exhausted_refusals: int
    peers: tuple[SavedPeer, ...]
    parked: tuple[int, ...]
    strikes: tuple[SavedStrike, ...] = ()

    def fd_names(self) -> list[str]:
        """Every descriptor this state counts on, besides itself."""
        names = [REGION, LISTENER]
        for peer in self.peers:
            names.append(peer_name(peer.id))
            names.extend(vector_name("peer", peer.id, v) for v in range(self.vectors))
        for peer_id in self.parked:
            names.extend(vector_name("parked", peer_id, v) for v in range(self.vectors))
        return names


@dataclass
class HandOff:
    """One server process's leavings: its state (JSON-able) and its descriptors by name.

    The descriptors stay the server's until :meth:`IvshmemServer.detach`;
    this object never closes them.
    """

    state: dict[str, Any]
    fds: dict[str, int] = field(default_factory=dict)


class _Reader:
    """Typed, range-checked access to one JSON object of the state."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise HandOffError(f"handed-over state: {where} is not an object")
        self.obj: dict[str, object] = obj
        self.where = where

    def _get(self, key: str) -> object:
        if key not in self.obj:
            raise HandOffError(f"handed-over state: {self.where} has no {key!r}")
        return self.obj[key]

    def integer(self, key: str, lo: int, hi: int) -> int:
        value = self._get(key)
        if type(value) is not int or not lo <= value <= hi:
            raise HandOffError(f"handed-over state: {self.where}.{key} = {value!r} is not an "
                               f"integer in {lo}..{hi}")  # fmt: skip
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        if type(value) not in (int, float):
            raise HandOffError(f"handed-over state: {self.where}.{key} is not a number")
        return float(value)  # type: ignore[arg-type]

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if type(value) is not bool:
            raise HandOffError(f"handed-over state: {self.where}.{key} is not a boolean")
        return value

    def text(self, key: str, *, optional: bool = False) -> str | None:
        value = self._get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > 4096:
            raise HandOffError(f"handed-over state: {self.where}.{key} is not a short string")
        return value

    def items(self, key: str, limit: int) -> list[object]:
        value = self._get(key)
        if not isinstance(value, list) or len(value) > limit:
            raise HandOffError(f"handed-over state: {self.where}.{key} is not a list of at most "
                               f"{limit} entries")  # fmt: skip
        return value

    def mac(self, key: str, *, optional: bool = False) -> bytes | None:
        text = self.text(key, optional=optional)
        if text is None:
            return None
        try:
            mac = bytes.fromhex(text)
        except ValueError:
            mac = b""
        if len(mac) != MAC_LEN:
            raise HandOffError(f"handed-over state: {self.where}.{key} is not a MAC")
        return mac


def _ints(values: list[object], lo: int, hi: int, where: str) -> list[int]:
    if any(type(v) is not int or not lo <= v <= hi for v in values):
        raise HandOffError(f"handed-over state: {where} holds a value outside {lo}..{hi}")
    return values  # type: ignore[return-value]


def _parse_region(r: _Reader) -> RegionRecord:
    max_peers = r.integer("max_peers", 2, abi.IVL_MAX_PEERS)
    seqs = _ints(r.items("srv_seq", max_peers), 0, 0xFFFFFFFF, "region.srv_seq")
    halves_raw = r.items("halves", max_peers)
    if len(seqs) != max_peers or len(halves_raw) != max_peers:
        raise HandOffError(f"handed-over state: the region record has not {max_peers} slots")
    halves = []
    for i, raw in enumerate(halves_raw):
        h = _Reader(raw, f"region.halves[{i}]")
        halves.append(ServerHalf(
            present=h.boolean("present"), peer_id=h.integer("peer_id", 0, MAX_PEER_ID),
            generation=h.integer("generation", 0, 1 << 62), flags=h.integer("flags", 0, 0xFFFFFFFF),
            nic_mac=h.mac("nic_mac") or bytes(MAC_LEN),
        ))  # fmt: skip
    return RegionRecord(
        size=r.integer("size", 1, 1 << 48),
        max_peers=max_peers,
        ring_size=r.integer("ring_size", 1, 1 << 40),
        page=r.integer("page", 4096, 1 << 40),
        generation=r.integer("generation", 0, 1 << 62),
        nr_present=r.integer("nr_present", 0, max_peers),
        srv_seq=tuple(seqs),
        halves=tuple(halves),
    )


def _parse_peer(raw: object, where: str, max_peers: int) -> SavedPeer:
    p = _Reader(raw, where)
    i = _Reader(p.obj.get("identity"), f"{where}.identity")
    start_time = i.obj.get("start_time")
    identity = NicIdentity(
        pid=i.integer("pid", 0, 1 << 31), mac=i.mac("mac", optional=True),
        source=i.text("source") or "", name=i.text("name", optional=True),
        start_time=None if start_time is None else i.integer("start_time", 0, 1 << 62),
        warning=i.text("warning", optional=True),
    )  # fmt: skip
    noted = p.items("noted", 8)
    if not all(isinstance(n, str) and len(n) < 32 for n in noted):
        raise HandOffError(f"handed-over state: {where}.noted is not a list of short strings")
    return SavedPeer(
        id=p.integer("id", 0, MAX_PEER_ID),
        slot=p.integer("slot", 0, max_peers - 1),
        pid=p.integer("pid", 0, 1 << 31),
        identity=identity,
        known=frozenset(_ints(p.items("known", MAX_PEER_ID + 1), 0, MAX_PEER_ID, f"{where}.known")),
        join_generation=p.integer("join_generation", 0, 1 << 62),
        noted=frozenset(noted),  # type: ignore[arg-type]
    )


def _parse_strike(raw: object, where: str) -> SavedStrike:
    s = _Reader(raw, where)
    return SavedStrike(
        pid=s.integer("pid", 1, 1 << 31), start_time=s.integer("start_time", 0, 1 << 62),
        count=s.integer("count", 1, 1 << 31), until=s.number("until"), forget=s.number("forget"),
        evicted_at=s.number("evicted_at"), refusals=s.integer("refusals", 0, 1 << 62),
    )  # fmt: skip


def parse_state(data: bytes) -> State:
    """The state a server handed over; HandOffError says what is wrong with it."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HandOffError(f"handed-over state is not JSON: {exc}") from exc
    top = _Reader(obj, "state")
    fmt = top.integer("format", 0, 1 << 31)
    if fmt != STATE_FORMAT:
        raise HandOffError(f"handed-over state has format {fmt}; this server reads format "
                           f"{STATE_FORMAT} (was it handed down by a newer server?)")  # fmt: skip
    region = _parse_region(_Reader(top.obj.get("region"), "region"))
    vectors = top.integer("vectors", abi.IVL_NR_VECTORS, 64)
    peers = tuple(_parse_peer(raw, f"peers[{n}]", region.max_peers)
                  for n, raw in enumerate(top.items("peers", region.max_peers)))  # fmt: skip
    parked = tuple(_ints(top.items("parked", MAX_PEER_ID + 1), 0, MAX_PEER_ID, "parked"))
    ids = [p.id for p in peers] + list(parked)
    if len(set(ids)) != len(ids) or len({p.slot for p in peers}) != len(peers):
        raise HandOffError("handed-over state: a peer ID or a slot appears twice")
    socket_id = _ints(top.items("socket_id", 2), 0, 1 << 64, "socket_id")
    if len(socket_id) != 2:
        raise HandOffError("handed-over state: socket_id is not (device, inode)")
    strikes = tuple(_parse_strike(raw, f"strikes[{n}]")
                    for n, raw in enumerate(top.items("strikes", 1 << 16)))  # fmt: skip
    return State(
        pid=top.integer("pid", 0, 1 << 31),
        version=top.text("version") or "?",
        socket_path=top.text("socket_path") or "",
        socket_id=(socket_id[0], socket_id[1]),
        vectors=vectors,
        leave_notices=top.boolean("leave_notices"),
        region=region,
        next_id=top.integer("next_id", 0, MAX_PEER_ID + 1),
        exhausted_refusals=top.integer("exhausted_refusals", 0, 1 << 62),
        peers=peers,
        parked=parked,
        strikes=strikes,
    )


# -- the store -----------------------------------------------------------------


def inherited(environ: MutableMapping[str, str] | None = None) -> dict[str, int]:
    """Descriptors the service manager passed this process, by name (sd_listen_fds_with_names).

    ``LISTEN_PID`` must be this process; the variables are removed from
    the environment, and each descriptor made close-on-exec.  Names that
    are missing or repeated are given as ``fd<N>`` and never match ours.
    """
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    pid_text = env.pop("LISTEN_PID", "")
    count_text = env.pop("LISTEN_FDS", "")
    names_text = env.pop("LISTEN_FDNAMES", "")
    if not count_text:
        return {}
    try:
        count = int(count_text)
        mine = int(pid_text) == os.getpid()
    except ValueError:
        log.warning("ignoring LISTEN_PID=%r LISTEN_FDS=%r: not numbers", pid_text, count_text)
        return {}
    if not mine or count <= 0:
        return {}
    names = names_text.split(":") if names_text else []
    fds: dict[str, int] = {}
    for n in range(count):
        fd = LISTEN_FDS_START + n
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            continue  # not open after all
        name = names[n] if n < len(names) and names[n] else f"fd{fd}"
        if name in fds:
            name = f"fd{fd}"
        fds[name] = fd
    return fds


def close_all(fds: MutableMapping[str, int]) -> None:
    """Close every descriptor of ``fds`` and empty it (so none is closed twice)."""
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.popitem()[1])


def load(fds: MutableMapping[str, int]) -> State:
    """Read the ``state`` descriptor of ``fds`` once (it is closed and removed from ``fds``)."""
    fd = fds.pop(STATE, None)
    if fd is None:
        found = ", ".join(fds) or "none"
        raise HandOffError(f"no {STATE!r} among the stored descriptors ({found})")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HandOffError("the handed-over state is not a file")
        if st.st_size > MAX_STATE_BYTES:
            raise HandOffError(f"the handed-over state is {st.st_size} bytes, more than "
                               f"{MAX_STATE_BYTES}")  # fmt: skip
        data = os.pread(fd, MAX_STATE_BYTES + 1, 0)
    except OSError as exc:
        raise HandOffError(f"cannot read the handed-over state: {exc}") from exc
    finally:
        os.close(fd)
    return parse_state(data)


def _state_memfd(state: dict[str, Any]) -> int:
    data = json.dumps(state, separators=(",", ":")).encode()
    fd = os.memfd_create("ivloop-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)  # fmt: skip
    except OSError:
        os.close(fd)
        raise
    return fd


def store(notifier: Notifier, handoff: HandOff) -> None:
    """Put ``handoff`` in the unit's file-descriptor store and wait until the manager holds it.

    The state goes first, then the descriptors it names: if the store is
    smaller than ``FileDescriptorStoreMax`` promised, what is lost is a
    member or two, never the state that says what was sent.  On failure,
    what was stored is taken out again and HandOffError raised; the
    server's descriptors are untouched either way.
    """
    if not notifier.enabled:
        raise HandOffError("no service manager to hand over to (NOTIFY_SOCKET is not set)")
    need = len(handoff.fds) + 1
    if notifier.fdstore_max < need:
        raise HandOffError(
            f"the unit's file-descriptor store holds {notifier.fdstore_max} descriptors, "
            f"{need} are needed (FileDescriptorStoreMax= and FDSTORE= in the unit)"
        )
    sent: list[str] = []
    try:
        state_fd = _state_memfd(handoff.state)
        try:
            notifier.store_fd(STATE, state_fd)
        finally:
            os.close(state_fd)
        sent.append(STATE)
        for name, fd in handoff.fds.items():
            notifier.store_fd(name, fd)
            sent.append(name)
        notifier.barrier()
    except OSError as exc:
        for name in sent:
            with contextlib.suppress(OSError):
                notifier.remove_fd(name)
        raise HandOffError(f"cannot put the descriptors in the service manager's store: "
                           f"{exc}") from exc  # fmt: skip


def unstore(notifier: Notifier, names: list[str]) -> None:
    """Take ``names`` out of the store (the server holds them alone from now on).

    Returns once the manager has let go of them (BARRIER=1): a listening
    socket closed here must be closed everywhere before a new one is bound.
    """
    failed = 0
    for name in names:
        try:
            notifier.remove_fd(name)
        except OSError:
            failed += 1
    try:
        notifier.barrier()
    except OSError:
        failed = failed or len(names)
    if failed:
        log.warning("could not take %d descriptors out of the service manager's store: a "
                    "member the server drops may not see its connection close until the unit "
                    "stops", failed)  # fmt: skip
