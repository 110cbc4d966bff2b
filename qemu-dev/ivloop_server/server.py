"""The ivloop-server: QEMU ivshmem server and authority on membership.

One :class:`IvshmemServer` owns one region, one listening UNIX socket and
the connections of the QEMU processes (peers) attached to it.  All work
happens in event-loop callbacks and each callback runs to completion, so a
join or a leave (directory update, notices to every other peer, doorbells)
is never interleaved with another one.

Peers go JOINING -> ACTIVE -> LEAVING -> GONE (JOINING -> LEAVING when the
setup fails).

Each peer has two numbers:

- its QEMU peer ID, what the protocol sends and the guest reads as its
  IVPosition.  A QEMU is never told that a peer left (see
  ``ServerConfig.leave_notices``), so it keeps that peer's eventfds in
  its table under the departed ID for as long as it runs, and it takes no
  new eventfds for an ID it already has (``process_msg_connect``: "Too
  many eventfd received").  An ID is therefore handed on together with its
  eventfds: when a QEMU hangs up, its ID and the server's copies of its
  eventfds are parked, and the next joiner gets the lowest parked ID with
  those same eventfds (drained).  Members that were told of the ID
  already hold them and are sent nothing; only those that never were get
  the connect messages.  So every QEMU holds at most ``vectors`` eventfds
  per ID, and the IDs in use never exceed the most members the region has
  had at once: a QEMU on a host with churn stays within its fd limit.
  Only an ID whose QEMU hung up itself is parked -- a QEMU closes its
  socket only when its device goes (and with it the eventfds) or its
  process exits.  One the server cut off (evicted, not reading its
  socket, misbehaving) may still hold its eventfds and read its own
  doorbells, so its ID is retired: the server closes its copies and never
  gives that ID out again.  New IDs count up from 0; QEMU takes IDs up to
  65535, and once they are used up (only retired IDs use them up), new
  connections are refused until the server restarts.
- its directory slot, its index in the region's directory and ring
  matrix: the lowest free one.  A slot stays taken until its peer is GONE,
  that is until its leave is written to the directory and announced to
  every remaining peer; only then can a new connection get it.  The slot
  records its occupant's ID (``peer_id``), which is how a guest finds it.

Sends never block: messages are 8 bytes, and a peer whose socket buffer is
full is not reading, so it is dropped like a peer whose socket failed.
Only that peer is dropped; the others carry on.

Impersonation.  When a QEMU connects the server learns its data-NIC MAC
(:mod:`ivloop_server.nic`: SO_PEERCRED, /proc/PID/cmdline, the operator's
map) and publishes it in the slot with IVL_SLOT_F_MAC_KNOWN; guests send to
a slot only while its MAC equals that.  Every ``police_interval`` the
server also checks each live peer itself: first it restores any server
bytes a region member overwrote (the header, a slot's server half -- a
guest could otherwise rewrite its own nic_mac to match a lie), then it
reads each guest half under its seq.  A joined peer, UP or LEAVING, that
publishes a MAC other than its NIC's -- or, when its own NIC is unknown,
the NIC MAC of another peer -- is evicted: one WARNING, IVL_SLOT_F_EVICTED
in its slot with the leave, its connection closed.  QEMU takes a closed
server connection quietly once set up: its ivshmem registers no chardev
event handler, so the socket chardev just disconnects and the device keeps
its BAR2 mapping and eventfds (``_evict``).  During setup it does not: a
refusal must be a message QEMU reads, never a bare close (``_turn_away``).
The same QEMU process is refused for a hold-off that doubles with each
eviction, so a reconnecting chardev cannot turn join-lie-evict into a log
flood.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import enum
import errno
import fcntl
import logging
import mmap
import os
import select
import socket
import stat
import struct
import termios
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from . import __version__, abi, handoff, protocol
from .errors import ConfigError, HandOffError, SocketInUseError, SocketPathError, StateError
from .handoff import HandOff, SavedPeer, State
from .nic import NicIdentity, NicResolver, ProcNicResolver, check_unicast, format_mac
from .protocol import MAX_PEER_ID
from .region import Layout, Region, SlotView, compute_layout, format_size

log = logging.getLogger(__name__)

DEFAULT_SIZE: Final = 32 << 20
DEFAULT_MAX_PEERS: Final = 8
DEFAULT_VECTORS: Final = abi.IVL_NR_VECTORS
MAX_VECTORS: Final = 64
SOCKET_MODE: Final = 0o600
LISTEN_BACKLOG: Final = 64
_PROBE_TIMEOUT: Final = 1.0
_ACCEPT_RETRY_DELAY: Final = 0.2
DEFAULT_POLICE_INTERVAL: Final = 0.1
DEFAULT_EVICT_HOLDOFF: Final = 5.0
DEFAULT_EVICT_HOLDOFF_MAX: Final = 600.0
#: Rounds a guest half may stay mid-update before the server says so (once).
_STUCK_ROUNDS: Final = 10
#: At most one WARNING per slot per this many seconds about restored bytes.
_REPAIR_LOG_INTERVAL: Final = 60.0
_MAX_STRIKES: Final = 4096
#: Refused connections held open until their refusal is read, at most.
_MAX_REFUSED: Final = 64
DEFAULT_REFUSE_LINGER: Final = 60.0
DEFAULT_RING_RELEASE_DELAY: Final = 5.0
#: What one 8-byte message with an fd costs a UNIX socket's send buffer
#: (skb truesize; about 278 fit in the default 212992 bytes).
SETUP_MSG_TRUESIZE: Final = 1024
SO_SNDBUFFORCE: Final = getattr(socket, "SO_SNDBUFFORCE", 32)
#: One WARNING when only this many QEMU peer IDs are left.
_IDS_LOW_WATER: Final = 1000
#: Errors that mean the other end closed its socket.
_HANG_UPS: Final = frozenset({errno.EPIPE, errno.ECONNRESET})


class Runstate(enum.Enum):
    """Lifecycle of a server."""

    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class PeerState(enum.Enum):
    """Lifecycle of one connected QEMU."""

    JOINING = "joining"
    ACTIVE = "active"
    LEAVING = "leaving"
    GONE = "gone"


_RUN_TRANSITIONS: Final[dict[Runstate, frozenset[Runstate]]] = {
    Runstate.IDLE: frozenset({Runstate.STARTING}),
    Runstate.STARTING: frozenset({Runstate.RUNNING, Runstate.STOPPING}),
    Runstate.RUNNING: frozenset({Runstate.STOPPING}),
    Runstate.STOPPING: frozenset({Runstate.STOPPED}),
    Runstate.STOPPED: frozenset(),
}

_PEER_TRANSITIONS: Final[dict[PeerState, frozenset[PeerState]]] = {
    PeerState.JOINING: frozenset({PeerState.ACTIVE, PeerState.LEAVING}),
    PeerState.ACTIVE: frozenset({PeerState.LEAVING}),
    PeerState.LEAVING: frozenset({PeerState.GONE}),
    PeerState.GONE: frozenset(),
}


@dataclass(frozen=True)
class ServerConfig:
    """What a server is asked to provide; :meth:`validate` says if it can."""

    socket_path: Path
    #: Permission bits of the listening socket: who may connect (and so
    #: join the region, one trust domain).  Never anything for others.
    socket_mode: int = SOCKET_MODE
    #: Group ID the socket is given (e.g. the one QEMU runs as), or None.
    socket_group: int | None = None
    size: int = DEFAULT_SIZE
    max_peers: int = DEFAULT_MAX_PEERS
    vectors: int = DEFAULT_VECTORS
    ring_size: int | None = None
    memfd_name: str = "ivloop"
    #: Back the region with huge pages of this size (``-m`` on a hugetlbfs mount).
    hugepage_size: int | None = None
    #: QEMU peer ID given to the first client (IDs then count up).  0 except
    #: in tests, which use it to reach the end of the ID space quickly.
    first_peer_id: int = 0
    #: Send QEMU's "peer N left" message (an ID without an fd) on a leave.
    #: Off by default: QEMU's ivshmem (every version, upstream's too) frees the departed
    #: peer's eventfd array on that message and frees it again when its own
    #: device is unplugged -- a double free that kills the QEMU -- and writes
    #: a returning ID's eventfds into the freed array.  Guests learn of
    #: leaves from the directory and the vector-0 doorbell instead; each QEMU
    #: keeps a departed peer's eventfds, and the server hands that ID on with
    #: those same eventfds (see the module docstring).  With notices on,
    #: IDs are never given out twice.
    leave_notices: bool = False
    #: QEMU -name -> data-NIC MAC (6 bytes), the operator's --nic-macs map.
    nic_macs: Mapping[str, bytes] = field(default_factory=dict)
    #: Seconds between checks of what every peer publishes.
    police_interval: float = DEFAULT_POLICE_INTERVAL
    #: An evicted QEMU process may rejoin after this many seconds, doubled
    #: on each further eviction up to ``evict_holdoff_max``.
    evict_holdoff: float = DEFAULT_EVICT_HOLDOFF
    evict_holdoff_max: float = DEFAULT_EVICT_HOLDOFF_MAX
    #: Seconds a refused connection stays open waiting for its QEMU to read
    #: the refusal (see :meth:`IvshmemServer._turn_away`).
    refuse_linger: float = DEFAULT_REFUSE_LINGER
    #: Seconds after a leave before the free slot's rings give their memory
    #: back (a hole punched in the region): time for every guest to see the
    #: leave and stop touching them, so none reads a ring zeroed under it.
    ring_release_delay: float = DEFAULT_RING_RELEASE_DELAY

    def validate(self) -> Layout:
        """Check every value; return the region layout or raise ConfigError."""
        if not 0 <= self.socket_mode <= 0o777 or self.socket_mode & 0o007:
            raise ConfigError(
                f"socket mode {self.socket_mode:#o} must be within 0770: whoever may "
                "connect joins the region, and a member can read and write all of it"
            )
        if self.socket_group is not None and not 0 <= self.socket_group < 1 << 32:
            raise ConfigError(f"socket group {self.socket_group} is not a group ID")
        if not 0 < self.police_interval <= 10:
            raise ConfigError(
                f"police interval must be above 0 and at most 10 s, not {self.police_interval}"
            )
        if not 0 <= self.ring_release_delay <= 3600:
            raise ConfigError(f"ring release delay must be between 0 and 3600 s, "
                              f"not {self.ring_release_delay}")
        if not 0 < self.refuse_linger <= 3600:
            raise ConfigError(
                f"refuse linger must be above 0 and at most 3600 s, not {self.refuse_linger}"
            )
        if not 0 <= self.evict_holdoff <= self.evict_holdoff_max:
            raise ConfigError(
                f"eviction hold-off {self.evict_holdoff} s must be between 0 and its maximum "
                f"{self.evict_holdoff_max} s"
            )
        for name, mac in self.nic_macs.items():
            why = "is not 6 bytes" if len(mac) != 6 else check_unicast(mac)
            if why is not None:
                raise ConfigError(f"NIC MAC for {name!r} {why}")
        if not 0 <= self.first_peer_id <= MAX_PEER_ID:
            raise ConfigError(
                f"first peer ID must be between 0 and {MAX_PEER_ID}, not {self.first_peer_id}"
            )
        if not 2 <= self.max_peers <= abi.IVL_MAX_PEERS:
            raise ConfigError(
                f"max peers must be between 2 and {abi.IVL_MAX_PEERS}, not {self.max_peers}"
            )
        if not abi.IVL_NR_VECTORS <= self.vectors <= MAX_VECTORS:
            raise ConfigError(
                f"vectors must be between {abi.IVL_NR_VECTORS} (membership and data doorbells) "
                f"and {MAX_VECTORS}, not {self.vectors}"
            )
        hp = self.hugepage_size
        if hp is not None and (hp < 4096 or hp & (hp - 1) or self.size % hp):
            raise ConfigError(
                f"a region of {format_size(self.size)} cannot be made of {format_size(hp)} huge "
                f"pages: use --size {format_size(max(hp, self.size))} or a multiple"
            )
        return compute_layout(self.size, self.max_peers, self.ring_size)


class Peer:
    """One connected QEMU: its peer ID, its directory slot, its socket, its
    eventfds (one per vector), its state.

    ``id`` is the QEMU peer ID (protocol messages, the guest's IVPosition);
    ``slot`` the directory and ring index.  They differ in general.
    """

    def __init__(
        self,
        peer_id: int,
        slot: int,
        sock: socket.socket,
        vectors: list[int],
        pid: int,
        *,
        identity: NicIdentity | None = None,
    ) -> None:
        self.id = peer_id
        self.slot = slot
        self.sock = sock
        self.vectors = vectors
        self.pid = pid
        self.state = PeerState.JOINING
        #: IDs this peer's QEMU has been told about and not yet told are gone.
        self.known: set[int] = set()
        #: The other end closed the connection (EOF, reset, broken pipe): a
        #: QEMU does that only when its device or its process goes.
        self.hung_up = False
        self.log = log.getChild(f"peer{peer_id}")
        self._reading = False
        #: What the server learned about this peer's QEMU, and its data-NIC MAC.
        self.identity = identity or NicIdentity(pid, None, "not resolved")
        #: Slot generation of this peer's join (the server's own record).
        self.join_generation = 0
        self.evicted = False
        #: Consecutive checks that found the guest half mid-update.
        self.unsettled = 0
        #: One-time notes already logged ("unchecked", "stuck").
        self.noted: set[str] = set()

    @property
    def nic_mac(self) -> bytes | None:
        return self.identity.mac

    @property
    def qemu_name(self) -> str:
        return self.identity.name or "?"

    def __repr__(self) -> str:
        return f"<Peer {self.id} slot={self.slot} {self.state.value} pid={self.pid}>"

    def transition(self, new: PeerState) -> None:
        if new not in _PEER_TRANSITIONS[self.state]:
            raise StateError(f"peer {self.id}", self.state, new)
        self.log.debug("peer %d: %s -> %s", self.id, self.state.value, new.value)
        self.state = new

    def forget_log(self) -> None:
        """Drop this peer's logger from logging's registry (it would stay there forever).

        A long-lived server would keep one logger per QEMU that ever joined
        (about 0.6 KiB each); the Peer's own reference keeps working for
        late messages.
        """
        logging.Logger.manager.loggerDict.pop(self.log.name, None)

    def close(self) -> None:
        """Close the connection and the server's copies of the eventfds."""
        self.sock.close()
        for fd in self.take_vectors():
            os.close(fd)

    def take_vectors(self) -> list[int]:
        """The server's copies of the eventfds, which this peer no longer owns."""
        vectors, self.vectors = self.vectors, []
        return vectors


def _peer_pid(sock: socket.socket) -> int:
    """PID of the process at the other end (0 if unknown)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return 0
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def _unread(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer has not read yet (SIOCOUTQ)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    except OSError:
        return 0
    return buf[0]


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def prepare_socket_path(path: Path) -> None:
    """Make ``path`` free for bind: remove a stale socket, refuse anything else.

    A socket nobody listens on (connect: ECONNREFUSED) is a leftover of a
    dead server and is removed.  A socket that accepts a connection belongs
    to a live server: SocketInUseError, and the file is left alone.  Any
    other file: SocketPathError, left alone.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SocketPathError(str(path), f"cannot inspect: {exc.strerror}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(
            str(path), "exists and is not a socket; remove it or choose another --socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(_PROBE_TIMEOUT)
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("removing stale socket %s (nothing listens on it)", path, extra={"event": "stale"})
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except TimeoutError as exc:
        raise SocketInUseError(
            str(path), "a server is listening on it but not accepting; stop it first"
        ) from exc
    except OSError as exc:
        raise SocketPathError(str(path), f"cannot check the existing socket: {exc}") from exc
    finally:
        probe.close()
    raise SocketInUseError(
        str(path),
        "another server is accepting connections on it; stop it or choose another --socket",
    )


@dataclass
class _Refused:
    sock: socket.socket
    deadline: float


@dataclass
class _Strike:
    """Evictions of one QEMU process, for the rejoin hold-off."""

    count: int
    until: float  # monotonic time before which a rejoin is refused
    forget: float  # when the count may be dropped
    evicted_at: float
    refusals: int = 0


class IvshmemServer:
    """An ivshmem server on one socket path, with one region.

    Use as ``async with IvshmemServer(config) as server: ...`` or call
    :meth:`start` and :meth:`stop` (stop is idempotent).  Every method must
    be called from the event loop the server was started in.

    ``resolver`` tells the server each connecting QEMU's data-NIC MAC; the
    default reads /proc and ``config.nic_macs``.  Tests inject their own.
    """

    def __init__(self, config: ServerConfig, *, resolver: NicResolver | None = None) -> None:
        self.config = config
        self.layout = config.validate()
        self._resolver: NicResolver = resolver or ProcNicResolver(dict(config.nic_macs))
        self._strikes: dict[tuple[int, int], _Strike] = {}
        self._police_handle: asyncio.TimerHandle | None = None
        #: Completed checks of the peers (tests wait on it).
        self.police_rounds = 0
        self._repair_logged: dict[int | None, tuple[float, int]] = {}
        #: Refused connections waiting for their refusal to be read, by fd.
        self._refused: dict[int, _Refused] = {}
        self._runstate = Runstate.IDLE
        self._region: Region | None = None
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Connected peers by QEMU peer ID.
        self._peers: dict[int, Peer] = {}
        #: The next new QEMU peer ID (one no QEMU has seen yet).
        self._next_id = config.first_peer_id
        #: IDs whose QEMU hung up, with the server's copies of their
        #: eventfds, which every QEMU told of the ID still holds.
        self._parked: dict[int, list[int]] = {}
        self._doomed: dict[int, tuple[Peer, str, int]] = {}
        #: Connections refused because no peer ID is left (ERROR once, then WARNING).
        self._exhausted_refusals = 0
        #: Called (on the loop) after each join, leave and exhaustion refusal.
        self.on_change: Callable[[], None] | None = None
        self._stopped = asyncio.Event()
        self._accept_retry: asyncio.TimerHandle | None = None

    # -- state ----------------------------------------------------------

    @property
    def runstate(self) -> Runstate:
        return self._runstate

    def _transition(self, new: Runstate) -> None:
        if new not in _RUN_TRANSITIONS[self._runstate]:
            raise StateError("server", self._runstate, new)
        log.debug("server: %s -> %s", self._runstate.value, new.value)
        self._runstate = new

    @property
    def region(self) -> Region:
        if self._region is None or self._region.closed:
            raise StateError("region", self._runstate, "use")
        return self._region

    @property
    def socket_path(self) -> Path:
        return self.config.socket_path

    def peers(self) -> dict[int, Peer]:
        """Connected peers by QEMU peer ID (a copy); each knows its ``slot``."""
        return dict(self._peers)

    @property
    def next_peer_id(self) -> int:
        """The QEMU peer ID the next client will get (above MAX_PEER_ID: none)."""
        return min(self._parked, default=self._next_id)

    def parked_ids(self) -> list[int]:
        """IDs free to be handed on with their eventfds, lowest first."""
        return sorted(self._parked)

    # -- lifecycle ------------------------------------------------------

    async def start(self) -> None:
        """Create the region and listen; on return, connections are accepted."""
        self._transition(Runstate.STARTING)
        self._loop = asyncio.get_running_loop()
        try:
            path = self.config.socket_path
            prepare_socket_path(path)
            self._region = Region.create(
                self.layout.size,
                self.layout.max_peers,
                self.layout.ring_size,
                name=self.config.memfd_name,
                hugepage_size=self.config.hugepage_size,
            )
            self._listener = self._listen(path)
            self._loop.add_reader(self._listener.fileno(), self._on_listener_readable)
        except BaseException:
            self._teardown()
            self._transition(Runstate.STOPPING)
            self._transition(Runstate.STOPPED)
            self._stopped.set()
            raise
        self._transition(Runstate.RUNNING)
        self._police_handle = self._loop.call_later(self.config.police_interval, self._police_tick)
        lay = self.layout
        log.info(
            "listening on %s: region %s, %d peers, rings of %s, %d vectors",
            path,
            format_size(lay.size),
            lay.max_peers,
            format_size(lay.ring_size),
            self.config.vectors,
            extra={
                "event": "start",
                "socket": str(path),
                "size": lay.size,
                "max_peers": lay.max_peers,
                "ring_size": lay.ring_size,
                "vectors": self.config.vectors,
            },
        )

    def _listen(self, path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind(str(path))
            # Before listen() nobody can connect, so there is no window in
            # which the socket is reachable with the umask's mode.
            self._set_socket_access(path)
            st = os.stat(path)
            self._socket_id = (st.st_dev, st.st_ino)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise SocketPathError(str(path), f"cannot listen: {exc.strerror or exc}") from exc
        return sock

    def _set_socket_access(self, path: Path) -> None:
        """Give the socket file the configured group and mode: who may connect."""
        if self.config.socket_group is not None:
            os.chown(path, -1, self.config.socket_group)
        os.chmod(path, self.config.socket_mode)

    async def stop(self, reason: str = "server stopping") -> None:
        """Drop every peer (announcing each leave), unlink the socket, free the region."""
        if self._runstate in (Runstate.STOPPING, Runstate.STOPPED):
            await self._stopped.wait()
            return
        if self._runstate is Runstate.IDLE:
            self._transition(Runstate.STARTING)
        self._transition(Runstate.STOPPING)
        nr_peers = len(self._peers)
        if self._loop is not None and self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
        if self._police_handle is not None:
            self._police_handle.cancel()
            self._police_handle = None
        # One at a time, so each remaining peer is told and rung about each
        # leave, and its guest falls back to the lower path in order.
        for peer in sorted(self._peers.values(), key=lambda p: p.id):
            self._doom(peer, reason, logging.INFO)
            self._reap()
        self._teardown()
        self._transition(Runstate.STOPPED)
        log.info(
            "stopped (%s, %d peers dropped)",
            reason,
            nr_peers,
            extra={"event": "stop", "reason": reason, "peers": nr_peers},
        )
        self._stopped.set()

    def _teardown(self) -> None:
        for fd in list(self._refused):
            self._close_refused(fd)
        for vectors in self._parked.values():
            for fd in vectors:
                os.close(fd)
        self._parked.clear()
        if self._police_handle is not None:
            self._police_handle.cancel()
            self._police_handle = None
        if self._accept_retry is not None:
            self._accept_retry.cancel()
            self._accept_retry = None
        if self._listener is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            self._unlink_own_socket()
        if self._region is not None:
            self._region.close()

    def _unlink_own_socket(self) -> None:
        """Remove the socket file, if it is still the one this server bound."""
        path = self.config.socket_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._socket_id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- handing over to the next server process (ivloop_server.handoff) --

    def hand_off(self) -> HandOff:
        """What the next server process needs to carry on serving every member.

        Changes nothing: the descriptors stay this server's, and it keeps
        serving until :meth:`detach`.  Between the two calls nothing else
        may run on the loop (callers do both in one callback).
        """
        if self._runstate is not Runstate.RUNNING or self._listener is None:
            raise StateError("server", self._runstate, "hand off")
        self._reap()
        region = self.region
        assert self._socket_id is not None
        fds = {handoff.REGION: region.fd, handoff.LISTENER: self._listener.fileno()}
        # What a member was told matters only for IDs that can be handed on
        # (retired IDs stay in ``known`` but are never given out again).
        in_circulation = set(self._peers) | set(self._parked)
        peers = []
        for peer in sorted(self._peers.values(), key=lambda p: p.id):
            assert peer.state is PeerState.ACTIVE, peer  # joins and leaves complete in a callback
            fds[handoff.peer_name(peer.id)] = peer.sock.fileno()
            for n, fd in enumerate(peer.vectors):
                fds[handoff.vector_name("peer", peer.id, n)] = fd
            ident = peer.identity
            peers.append({
                "id": peer.id, "slot": peer.slot, "pid": peer.pid,
                "known": sorted(peer.known & in_circulation),
                "join_generation": peer.join_generation,
                "noted": sorted(peer.noted),
                "identity": {"pid": ident.pid, "mac": ident.mac.hex() if ident.mac else None,
                             "source": ident.source, "name": ident.name,
                             "start_time": ident.start_time, "warning": ident.warning},
            })  # fmt: skip
        for peer_id, vectors in sorted(self._parked.items()):
            for n, fd in enumerate(vectors):
                fds[handoff.vector_name("parked", peer_id, n)] = fd
        state = {
            "format": handoff.STATE_FORMAT,
            "pid": os.getpid(),
            "version": __version__,
            "socket_path": str(self.config.socket_path),
            "socket_id": list(self._socket_id),
            "vectors": self.config.vectors,
            "leave_notices": self.config.leave_notices,
            "region": region.record(),
            "next_id": self._next_id,
            "exhausted_refusals": self._exhausted_refusals,
            "peers": peers,
            "parked": sorted(self._parked),
            "strikes": [
                {"pid": pid, "start_time": start, "count": st.count, "until": st.until,
                 "forget": st.forget, "evicted_at": st.evicted_at, "refusals": st.refusals}
                for (pid, start), st in self._strikes.items()
            ],
        }  # fmt: skip
        return HandOff(state, fds)

    def detach(self) -> None:
        """Let go of everything after a hand-off, telling nobody: the next process serves on.

        No leave is written, no socket file removed; this process's copies
        of the descriptors are closed and the server is STOPPED.
        """
        if self._runstate is not Runstate.RUNNING:
            raise StateError("server", self._runstate, "detach")
        self._transition(Runstate.STOPPING)
        nr_peers = len(self._peers)
        for peer in self._peers.values():
            if self._loop is not None:
                self._loop.remove_reader(peer.sock.fileno())
            peer.close()
            peer.forget_log()
        self._peers.clear()
        self._socket_id = None  # so that _teardown leaves the socket file alone
        self._teardown()
        self._transition(Runstate.STOPPED)
        log.info("handed %d peers over to the next server process", nr_peers,
                 extra={"event": "handed_off", "peers": nr_peers})  # fmt: skip
        self._stopped.set()

    def mismatch(self, state: State) -> str | None:
        """Why this server cannot serve ``state``'s region as it is (None: it can)."""
        rec, lay = state.region, self.layout
        page = self.config.hugepage_size or mmap.PAGESIZE
        found = {"size": rec.size, "max peers": rec.max_peers, "ring size": rec.ring_size,
                 "vectors": state.vectors, "socket": state.socket_path, "page size": rec.page,
                 "leave notices": state.leave_notices}  # fmt: skip
        wanted = {"size": lay.size, "max peers": lay.max_peers, "ring size": lay.ring_size,
                  "vectors": self.config.vectors, "socket": str(self.config.socket_path),
                  "page size": page, "leave notices": self.config.leave_notices}  # fmt: skip
        diffs = [f"{key} {found[key]} -> {wanted[key]}" for key in found
                 if found[key] != wanted[key]]  # fmt: skip
        return ", ".join(diffs) or None

    def config_of(self, state: State) -> ServerConfig:
        """This server's configuration with ``state``'s region shape and socket."""
        rec = state.region
        return dataclasses.replace(
            self.config, size=rec.size, max_peers=rec.max_peers, ring_size=rec.ring_size,
            vectors=state.vectors, socket_path=Path(state.socket_path),
            leave_notices=state.leave_notices,
            hugepage_size=None if rec.page == mmap.PAGESIZE else rec.page,
        )  # fmt: skip

    async def resume(self, state: State, fds: dict[str, int]) -> None:
        """Start by taking over what a previous server process handed over.

        ``fds`` (the inherited descriptors by name, without the state) are
        all consumed: taken over, or closed.  A member whose descriptors
        are missing or are not what the state says is dropped alone (its
        slot marked absent, its ID retired).  HandOffError if the state
        cannot be served (:meth:`mismatch` first), after closing them all.
        """
        why = self.mismatch(state)
        if why is not None:
            handoff.close_all(fds)
            raise HandOffError(f"the handed-over region does not match this configuration: {why}")
        self._transition(Runstate.STARTING)
        self._loop = asyncio.get_running_loop()
        lost: list[tuple[SavedPeer, str]] = []
        try:
            self._check_record(state)
            region_fd = fds.pop(handoff.REGION, None)
            if region_fd is None:
                raise HandOffError("the handed-over descriptors hold no region")
            self._region = Region.adopt(region_fd, state.region)
            self._listener = self._adopt_listener(fds.pop(handoff.LISTENER, None), state)
            self._next_id = state.next_id
            self._exhausted_refusals = state.exhausted_refusals
            for st in state.strikes:
                self._strikes[(st.pid, st.start_time)] = _Strike(
                    st.count, st.until, st.forget, st.evicted_at, st.refusals)
            for saved in state.peers:
                peer, problem = self._adopt_peer(saved, state.vectors, fds)
                if peer is None:
                    lost.append((saved, problem))
                else:
                    self._peers[peer.id] = peer
            for peer_id in state.parked:
                vectors = self._adopt_vectors("parked", peer_id, state.vectors, fds)
                if vectors is not None:
                    self._parked[peer_id] = vectors
        except BaseException:
            handoff.close_all(fds)
            self._teardown()
            self._transition(Runstate.STOPPING)
            self._transition(Runstate.STOPPED)
            self._stopped.set()
            raise
        if fds:
            log.warning("closing %d handed-over descriptors no member owns: %s", len(fds),
                        ", ".join(sorted(fds)))  # fmt: skip
            handoff.close_all(fds)
        self._transition(Runstate.RUNNING)
        self._loop.add_reader(self._listener.fileno(), self._on_listener_readable)
        for peer in self._peers.values():
            self._loop.add_reader(peer.sock.fileno(), self._on_peer_readable, peer)
        for saved, problem in lost:
            generation = self.region.mark_absent(saved.slot)
            log.warning("peer %d (slot %d, pid %d) was not handed over whole (%s): marked absent "
                        "(generation %d), its ID retired", saved.id, saved.slot, saved.pid,
                        problem, generation,
                        extra={"event": "leave", "peer": saved.id, "slot": saved.slot,
                               "pid": saved.pid, "reason": problem, "generation": generation,
                               "nr_present": len(self._peers)})  # fmt: skip
        if lost:
            self._ring_membership(exclude=None)
        for slot in range(self.layout.max_peers):
            if not self.region.server_half(slot).present:
                self._loop.call_later(self.config.ring_release_delay, self._release_rings,
                                      slot, self.region.server_half(slot).generation)
        self._police_handle = self._loop.call_later(self.config.police_interval, self._police_tick)
        log.info(
            "took over from server pid %d (version %s) on %s: %d peers, %d IDs parked, "
            "generation %d",
            state.pid, state.version, self.config.socket_path, len(self._peers),
            len(self._parked), state.region.generation,
            extra={"event": "resume", "from_pid": state.pid, "from_version": state.version,
                   "peers": sorted(self._peers), "lost": [s.id for s, _ in lost],
                   "parked": sorted(self._parked), "generation": state.region.generation},
        )  # fmt: skip
        self._changed()

    def _check_record(self, state: State) -> None:
        """The members and the directory record must tell the same story."""
        rec = state.region
        present = {i: h for i, h in enumerate(rec.halves) if h.present}
        members = {p.slot: p for p in state.peers}
        if set(present) != set(members) or rec.nr_present != len(members):
            raise HandOffError(f"handed-over state: the directory has slots {sorted(present)} "
                               f"present, the members hold {sorted(members)}")  # fmt: skip
        for slot, saved in members.items():
            half = present[slot]
            if half.peer_id != saved.id or half.generation != saved.join_generation:
                raise HandOffError(f"handed-over state: slot {slot} holds peer {half.peer_id} "
                                   f"of generation {half.generation}, not peer {saved.id} of "
                                   f"{saved.join_generation}")  # fmt: skip
        if any(p.id >= state.next_id for p in state.peers) or \
                any(i >= state.next_id for i in state.parked):  # fmt: skip
            raise HandOffError("handed-over state: an ID in use is not below the next new ID")

    def _adopt_listener(self, fd: int | None, state: State) -> socket.socket:
        """The handed-over listening socket, if it is still reached by its path; else a new one."""
        path = self.config.socket_path
        problem = "it was not handed over"
        if fd is not None:
            sock = socket.socket(fileno=fd)
            problem = ""
            try:
                accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                st = os.lstat(path)
                if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or \
                        not accepting or sock.getsockname() != str(path):  # fmt: skip
                    problem = "it is not a UNIX socket listening on that path"
                elif (st.st_dev, st.st_ino) != state.socket_id:
                    problem = "the socket file was removed or replaced"
            except OSError as exc:
                problem = f"cannot check it: {exc.strerror or exc}"
            if not problem:
                sock.setblocking(False)
                self._set_socket_access(path)
                self._socket_id = state.socket_id
                return sock
            sock.close()
        log.warning("listening anew on %s: %s (QEMUs that connected during the swap are "
                    "refused)", path, problem)  # fmt: skip
        prepare_socket_path(path)
        return self._listen(path)

    def _adopt_vectors(self, prefix: str, peer_id: int, count: int,
                       fds: dict[str, int]) -> list[int] | None:  # fmt: skip
        """The handed-over eventfds of ``peer_id``, or None (closed) if any is missing or wrong."""
        got = [fds.pop(handoff.vector_name(prefix, peer_id, n), None) for n in range(count)]
        vectors = [fd for fd in got if fd is not None]
        if len(vectors) == count and all(_is_eventfd(fd) for fd in vectors):
            return vectors
        for fd in vectors:
            os.close(fd)
        return None

    def _adopt_peer(self, saved: SavedPeer, count: int,
                    fds: dict[str, int]) -> tuple[Peer | None, str]:  # fmt: skip
        sock_fd = fds.pop(handoff.peer_name(saved.id), None)
        vectors = self._adopt_vectors("peer", saved.id, count, fds)
        sock = socket.socket(fileno=sock_fd) if sock_fd is not None else None
        problem = ""
        if sock is None or vectors is None:
            problem = "its connection or eventfds are missing from the store"
        elif sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            problem = "its connection is not a UNIX stream socket"
        elif _peer_pid(sock) != saved.pid:
            problem = f"its connection is now held by pid {_peer_pid(sock)}"
        if problem:
            if sock is not None:
                sock.close()
            for fd in vectors or []:
                os.close(fd)
            return None, problem
        assert sock is not None and vectors is not None
        sock.setblocking(False)
        peer = Peer(saved.id, saved.slot, sock, vectors, saved.pid, identity=saved.identity)
        peer.known = set(saved.known)
        peer.join_generation = saved.join_generation
        peer.noted = set(saved.noted)
        peer.transition(PeerState.ACTIVE)
        return peer, ""

    # -- connections ----------------------------------------------------

    def _on_listener_readable(self) -> None:
        assert self._listener is not None
        while self._runstate is Runstate.RUNNING:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(exc)
                    return
                raise
            try:
                self._admit(conn)
            except Exception:
                log.exception("unexpected error admitting a connection")
                self._turn_away(conn)
            finally:
                self._reap()

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of fds or memory: stop polling the listener for a moment."""
        assert self._loop is not None and self._listener is not None
        log.error("cannot accept connections: %s; retrying shortly", exc.strerror)
        self._loop.remove_reader(self._listener.fileno())

        def resume() -> None:
            self._accept_retry = None
            if self._runstate is Runstate.RUNNING and self._listener is not None:
                assert self._loop is not None
                self._loop.add_reader(self._listener.fileno(), self._on_listener_readable)

        self._accept_retry = self._loop.call_later(_ACCEPT_RETRY_DELAY, resume)

    def _free_slot(self) -> int | None:
        """The lowest directory slot no peer holds (a leaving peer still holds its own)."""
        taken = {p.slot for p in self._peers.values()}
        for slot in range(self.layout.max_peers):
            if slot not in taken:
                return slot
        return None

    def _refuse(
        self, conn: socket.socket, pid: int, reason: str, level: int = logging.WARNING
    ) -> None:
        log.log(
            level,
            "refused connection from pid %d: %s",
            pid,
            reason,
            extra={"event": "refuse", "reason": reason, "pid": pid},
        )
        self._turn_away(conn)

    def _turn_away(self, conn: socket.socket) -> None:
        """Refuse ``conn`` so that its QEMU fails cleanly instead of hanging.

        QEMU reads its setup synchronously in device realize and retries a
        read that returns 0 forever (ivshmem_recv_msg), so it must find a
        message, never EOF.  :data:`protocol.REFUSED` where the version
        belongs fails realize at once.  The connection then stays open until
        the message has been read: with a hot-plug (chardev-add, then
        device_add) the chardev is connected before the device reads, and if
        the server closed in between, QEMU's HUP handler would drop the
        connection, message and all, and device_add would spin for ever.
        It is closed when the peer has read everything (SIOCOUTQ is 0), or
        closes its end, or after ``refuse_linger`` seconds.
        """
        try:
            protocol.send_message(conn, protocol.REFUSED)
        except OSError:
            conn.close()
            return
        if self._loop is None or self._runstate is not Runstate.RUNNING:
            conn.close()
            return
        while len(self._refused) >= _MAX_REFUSED:
            self._close_refused(next(iter(self._refused)))
        fd = conn.fileno()
        self._refused[fd] = _Refused(conn, time.monotonic() + self.config.refuse_linger)
        # A QEMU never sends: readable means it closed (or misbehaves).
        self._loop.add_reader(fd, self._close_refused, fd)

    def _close_refused(self, fd: int) -> None:
        refused = self._refused.pop(fd, None)
        if refused is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(fd)
        refused.sock.close()

    def _sweep_refused(self) -> None:
        now = time.monotonic()
        for fd, refused in list(self._refused.items()):
            if now >= refused.deadline or _unread(refused.sock) == 0:
                self._close_refused(fd)

    def _refuse_exhausted(self, conn: socket.socket, pid: int) -> None:
        """Refuse ``conn``: every peer ID has been given out.

        The first such refusal is one ERROR that says what to do; later ones
        (each plug attempt) are WARNINGs pointing back at it.
        """
        self._exhausted_refusals += 1
        first = MAX_PEER_ID + 1 - self.config.first_peer_id
        if self._exhausted_refusals == 1:
            reason = (
                f"QEMU peer IDs are used up: all {first} IDs up to {MAX_PEER_ID} have been "
                "given out and none is free to hand on (QEMU's ivshmem cannot take an ID "
                "back: IDs of QEMUs the server cut off, or any with --leave-notices, are "
                "retired); members keep working, but no new QEMU can join until the server "
                "restarts: restart the server and re-plug every VM of this host "
                "(ivloop-libvirt server-restart, or harness server-restart HOST)"
            )
            level = logging.ERROR
        else:
            reason = (
                f"QEMU peer IDs are used up ({self._exhausted_refusals} connections refused "
                "so far); restart the server and re-plug every VM of this host"
            )
            level = logging.WARNING
        self._refuse(conn, pid, reason, level)
        self._changed()

    def _changed(self) -> None:
        """Tell ``on_change`` (the service manager's STATUS=) that membership changed."""
        if self.on_change is None:
            return
        try:
            self.on_change()
        except Exception:
            log.exception("unexpected error reporting the server's status")

    def status_text(self) -> str:
        """One line on membership, for ``systemctl status`` (sd_notify STATUS=)."""
        members = sum(1 for p in self._peers.values() if p.state is PeerState.ACTIVE)
        left = self.peer_ids_left
        text = (
            f"{members} of {self.layout.max_peers} peers on {self.config.socket_path}, "
            f"{left} peer IDs left"
        )
        if left == 0:
            text += "; no new peer can join: restart the server and re-plug the VMs"
        return text

    @property
    def peer_ids_left(self) -> int:
        """IDs that can still be given out: new ones, and parked ones to hand on."""
        return max(MAX_PEER_ID + 1 - self._next_id, 0) + len(self._parked)

    def _size_send_buffer(self, conn: socket.socket) -> None:
        """Room in *conn*'s send buffer for the whole setup, sent at once.

        A joiner is told its ID, the region and every member's eventfds
        (3 + vectors x (max_peers + 1) messages) before QEMU reads a byte,
        and a full buffer then drops it mid-setup, where QEMU hangs.  The
        default buffer holds about 278 of these messages: enough for 2
        vectors at 64 peers (131), not for 8 (523).  SO_SNDBUFFORCE passes
        net.core.wmem_max where the server may (CAP_NET_ADMIN); else
        SO_SNDBUF gets what wmem_max allows.
        """
        need = (3 + self.config.vectors * (self.layout.max_peers + 1)) * SETUP_MSG_TRUESIZE
        if need <= conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF):
            return
        for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
            try:
                conn.setsockopt(socket.SOL_SOCKET, option, need)
                return
            except OSError:
                continue

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self._size_send_buffer(conn)
        pid = _peer_pid(conn)
        if self._next_id > MAX_PEER_ID and not self._parked:
            self._refuse_exhausted(conn, pid)
            return
        slot = self._free_slot()
        if slot is None:
            self._refuse(conn, pid, f"all {self.layout.max_peers} peer slots are in use")
            return
        identity = self._identify(pid)
        if self._held_off(conn, identity):
            return
        if self._parked:
            peer_id = min(self._parked)
            vectors = self._unpark(peer_id)
        else:
            try:
                vectors = self._new_vectors()
            except OSError as exc:
                self._refuse(conn, pid, f"cannot create eventfds: {exc.strerror}")
                return
            # The ID is spent from here on, even if the setup below fails.
            peer_id = self._next_id
            self._next_id += 1
        peer = Peer(peer_id, slot, conn, vectors, pid, identity=identity)
        others = self._live_peers()
        self._peers[peer_id] = peer
        region = self.region
        region.zero_rings_of(slot)
        generation = region.mark_present(slot, peer_id, identity.mac)
        peer.join_generation = generation
        handed_on = sum(peer_id in o.known for o in others)
        peer.log.info(
            "peer %d joined in slot %d (pid %d, QEMU %s, generation %d%s)",
            peer_id,
            slot,
            pid,
            peer.qemu_name,
            generation,
            f", ID handed on: {handed_on} peers hold its eventfds already" if handed_on else "",
            extra={
                "event": "join",
                "peer": peer_id,
                "slot": slot,
                "pid": pid,
                "qemu_name": identity.name,
                "generation": generation,
                "nr_present": len(self._peers),
                "handed_on": handed_on,
            },
        )
        self._log_identity(peer)

        setup = protocol.setup_messages(
            peer_id, region.fd, vectors, [(o.id, o.vectors) for o in others]
        )
        if not self._send_all(peer, setup):
            return  # doomed: _reap() takes it out again
        peer.known.update(o.id for o in others)
        peer.known.add(peer_id)
        for other in others:
            # Those told of this ID before hold these very eventfds (and
            # QEMU would refuse a second set).
            if peer_id in other.known:
                continue
            if self._send_all(other, protocol.join_messages(peer_id, vectors)):
                other.known.add(peer_id)
        peer.transition(PeerState.ACTIVE)
        assert self._loop is not None
        self._loop.add_reader(conn.fileno(), self._on_peer_readable, peer)
        self._ring_membership(exclude=peer)
        self._warn_ids_low()
        self._changed()

    def _new_vectors(self) -> list[int]:
        vectors: list[int] = []
        try:
            for _ in range(self.config.vectors):
                vectors.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        except OSError:
            for fd in vectors:
                os.close(fd)
            raise
        return vectors

    def _unpark(self, peer_id: int) -> list[int]:
        """Take parked ``peer_id``'s eventfds for a new member, emptied of doorbells
        rung for the one that left."""
        vectors = self._parked.pop(peer_id)
        # Poll before reading: O_NONBLOCK belongs to the open file, which
        # every QEMU shares, and QEMU's char-socket makes received fds
        # blocking.  Nobody else reads a parked eventfd.
        poller = select.poll()
        for fd in vectors:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(0):
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
        return vectors

    def _park_or_retire(self, peer: Peer) -> None:
        """After ``peer``'s leave: park its ID with its eventfds, or retire both.

        Only a QEMU that hung up itself has let go of its eventfds; with
        leave notices, QEMU frees its copies and cannot take the ID again.
        """
        vectors = peer.take_vectors()
        if peer.hung_up and not self.config.leave_notices and len(vectors) == self.config.vectors:
            self._parked[peer.id] = vectors
            return
        for fd in vectors:
            os.close(fd)

    def _warn_ids_low(self) -> None:
        if self._parked:
            return
        left = self.peer_ids_left
        if left in (_IDS_LOW_WATER, 0):  # each is crossed once: new IDs only count up
            log.warning(
                "%d QEMU peer IDs left (IDs of QEMUs the server cut off are never given out "
                "again); when none are left, new QEMUs are refused: restart the server and "
                "re-plug its VMs at a quiet moment",
                left, extra={"event": "ids_low", "ids_left": left},
            )  # fmt: skip

    def _live_peers(self) -> list[Peer]:
        """ACTIVE peers not marked for dropping, in ID order."""
        return [
            p
            for _, p in sorted(self._peers.items())
            if p.state is PeerState.ACTIVE and p.id not in self._doomed
        ]

    def _send_all(self, peer: Peer, messages: Iterable[tuple[int, int | None]]) -> bool:
        """Send ``messages`` to ``peer``; on failure mark it for dropping."""
        if peer.id in self._doomed or peer.state not in (PeerState.JOINING, PeerState.ACTIVE):
            return False
        try:
            for value, fd in messages:
                protocol.send_message(peer.sock, value, fd)
        except BlockingIOError:
            self._doom(peer, "not reading its socket (send buffer full)", logging.WARNING)
            return False
        except OSError as exc:
            peer.hung_up = exc.errno in _HANG_UPS
            self._doom(peer, f"send failed: {exc.strerror or exc}", logging.WARNING)
            return False
        return True

    def _ring_membership(self, exclude: Peer | None) -> None:
        """Ring vector 0 (membership changed) of every live peer but ``exclude``."""
        for peer in self._live_peers():
            if peer is exclude:
                continue
            try:
                os.eventfd_write(peer.vectors[abi.IVL_VEC_MEMBERSHIP], 1)
            except BlockingIOError:
                pass  # counter saturated: an interrupt is pending anyway
            except OSError as exc:
                peer.log.error("cannot ring peer %d: %s", peer.id, exc.strerror)

    def _on_peer_readable(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            peer.hung_up = exc.errno in _HANG_UPS
            self._doom(peer, f"connection error: {exc.strerror or exc}", logging.INFO)
        else:
            if data:
                self._doom(
                    peer,
                    f"misbehaving: sent {len(data)} bytes, clients must not send",
                    logging.WARNING,
                )
            else:
                peer.hung_up = True
                self._doom(peer, "disconnected", logging.INFO)
        self._reap()

    # -- leaving --------------------------------------------------------

    def _doom(self, peer: Peer, reason: str, level: int) -> None:
        """Mark ``peer`` to be dropped once the current operation completes."""
        if peer.id not in self._doomed and peer.state in (PeerState.JOINING, PeerState.ACTIVE):
            self._doomed[peer.id] = (peer, reason, level)

    def _reap(self) -> None:
        """Drop doomed peers, including any a leave itself dooms."""
        while self._doomed:
            peer_id = next(iter(self._doomed))
            peer, reason, level = self._doomed[peer_id]
            try:
                self._leave(peer, reason, level)
            finally:
                del self._doomed[peer_id]

    def _leave(self, peer: Peer, reason: str, level: int) -> None:
        peer.transition(PeerState.LEAVING)
        if self._loop is not None and peer.sock.fileno() >= 0:
            self._loop.remove_reader(peer.sock.fileno())
        generation = self.region.mark_absent(peer.slot, evicted=peer.evicted)
        notified = (self._announce_leave(peer.id, self._live_peers())
                    if self.config.leave_notices else 0)
        self._ring_membership(exclude=peer)
        self._park_or_retire(peer)
        peer.close()
        peer.transition(PeerState.GONE)
        del self._peers[peer.id]
        if self._loop is not None:
            self._loop.call_later(self.config.ring_release_delay, self._release_rings,
                                  peer.slot, generation)
        peer.log.log(
            level,
            "peer %d left slot %d: %s (generation %d, told %d peers)",
            peer.id,
            peer.slot,
            reason,
            generation,
            notified,
            extra={
                "event": "leave",
                "peer": peer.id,
                "slot": peer.slot,
                "pid": peer.pid,
                "reason": reason,
                "generation": generation,
                "nr_present": len(self._peers),
            },
        )
        peer.forget_log()
        self._changed()

    def _release_rings(self, slot: int, generation: int) -> None:
        """Give a slot's rings back to the host, unless someone joined it since the leave."""
        if self._runstate is not Runstate.RUNNING or self.region.closed:
            return
        if any(p.slot == slot for p in self._peers.values()):
            return  # a join zeroed (and released) them already
        self.region.zero_rings_of(slot)
        log.debug("slot %d's rings released (left at generation %d); the region holds %s",
                  slot, generation, format_size(self.region.allocated_bytes()))

    def _announce_leave(self, peer_id: int, others: Sequence[Peer]) -> int:
        notified = 0
        for other in others:
            if other.id == peer_id or peer_id not in other.known:
                continue
            if self._send_all(other, [protocol.leave_message(peer_id)]):
                other.known.discard(peer_id)
                notified += 1
        return notified

    # -- who is behind a connection ---------------------------------------

    def set_nic_map(self, nic_macs: Mapping[str, bytes]) -> None:
        """Use a new operator map for QEMUs that connect from now on."""
        if not isinstance(self._resolver, ProcNicResolver):
            raise ConfigError(
                f"this server learns NIC MACs from a {type(self._resolver).__name__}, "
                "which has no operator map to replace"
            )
        for name, mac in nic_macs.items():
            why = "is not 6 bytes" if len(mac) != 6 else check_unicast(mac)
            if why is not None:
                raise ConfigError(f"NIC MAC for {name!r} {why}")
        self._resolver.nic_map = dict(nic_macs)

    def _identify(self, pid: int) -> NicIdentity:
        try:
            return self._resolver.resolve(pid)
        except Exception as exc:
            # A parser bug must cost this peer its check, not everyone the server.
            log.exception("cannot work out the NIC of pid %d", pid)
            return NicIdentity(pid, None, f"internal error: {exc}")

    def _log_identity(self, peer: Peer) -> None:
        ident = peer.identity
        extra = {
            "event": "nic",
            "peer": peer.id,
            "slot": peer.slot,
            "pid": peer.pid,
            "qemu_name": ident.name,
            "nic_mac": format_mac(ident.mac) if ident.mac is not None else None,
            "source": ident.source,
        }
        if ident.warning is not None:
            peer.log.warning("peer %d (QEMU %s): %s", peer.id, peer.qemu_name, ident.warning,
                             extra={**extra, "event": "nic_map_mismatch"})  # fmt: skip
        if ident.mac is not None:
            peer.log.info(
                "peer %d: data NIC %s (%s)", peer.id, format_mac(ident.mac), ident.source,
                extra=extra,
            )  # fmt: skip
        else:
            peer.log.info(
                "peer %d (pid %d, QEMU %s): data-NIC MAC unknown (%s); the MAC it claims cannot "
                "be checked (give its -device a mac= or map it with --nic-macs)",
                peer.id, peer.pid, peer.qemu_name, ident.source, extra=extra,
            )  # fmt: skip

    # -- eviction hold-off ------------------------------------------------

    def _held_off(self, conn: socket.socket, identity: NicIdentity) -> bool:
        """Refuse an evicted QEMU process that comes back too soon."""
        key = identity.key
        if key is None:
            return False
        now = time.monotonic()
        strike = self._strikes.get(key)
        if strike is None or now >= strike.until:
            return False
        strike.refusals += 1
        # A reconnecting chardev retries every few seconds: say it once.
        level = logging.WARNING if strike.refusals == 1 else logging.DEBUG
        self._refuse(
            conn,
            identity.pid,
            f"QEMU {identity.name or '?'} was evicted {now - strike.evicted_at:.0f} s ago for "
            f"publishing a MAC that is not its NIC's; it may rejoin in {strike.until - now:.0f} s",
            level,
        )
        return True

    def _strike(self, identity: NicIdentity) -> float | None:
        """Record an eviction; return the hold-off it earns (None: process unknown)."""
        key = identity.key
        if key is None:
            return None
        now = time.monotonic()
        if len(self._strikes) >= _MAX_STRIKES:
            for k in [k for k, v in self._strikes.items() if v.forget <= now]:
                del self._strikes[k]
            while len(self._strikes) >= _MAX_STRIKES:
                del self._strikes[next(iter(self._strikes))]
        old = self._strikes.get(key)
        count = old.count + 1 if old is not None and old.forget > now else 1
        cfg = self.config
        hold = min(cfg.evict_holdoff * float(1 << min(count - 1, 30)), cfg.evict_holdoff_max)
        self._strikes[key] = _Strike(count, now + hold, now + hold + cfg.evict_holdoff_max, now)
        return hold

    # -- policing ---------------------------------------------------------

    def _police_tick(self) -> None:
        self._police_handle = None
        if self._runstate is not Runstate.RUNNING:
            return
        try:
            self._sweep_refused()
            self._police()
        except Exception:
            log.exception("unexpected error checking the peers")
        finally:
            self._reap()
            self.police_rounds += 1
            if self._runstate is Runstate.RUNNING and self._loop is not None:
                self._police_handle = self._loop.call_later(
                    self.config.police_interval, self._police_tick
                )

    def _police(self) -> None:
        """Restore the server's bytes, then check what every live peer claims."""
        region = self.region
        header, tampered = region.repair()
        self._log_repairs(header, tampered)
        live = self._live_peers()
        owners = {p.nic_mac: p for p in live if p.nic_mac is not None}
        for peer in live:
            half = region.read_guest_half(peer.slot)
            if half is None:
                peer.unsettled += 1
                if peer.unsettled == _STUCK_ROUNDS and "stuck" not in peer.noted:
                    peer.noted.add("stuck")
                    peer.log.warning(
                        "peer %d (QEMU %s): its slot has been mid-update for %d checks in a "
                        "row; what it publishes is not checked while that lasts",
                        peer.id, peer.qemu_name, peer.unsettled,
                        extra={"event": "stuck", "peer": peer.id, "slot": peer.slot},
                    )  # fmt: skip
                continue
            peer.unsettled = 0
            if half.state not in (abi.IVL_STATE_UP, abi.IVL_STATE_LEAVING):
                continue
            # Joined as its peers judge it: the guest went UP in this
            # occupancy (the server's own generation), or in a rejoin faked
            # by overwriting the slot's generation, which guests believed
            # until repair() restored it.
            found = tampered.get(peer.slot)
            forged = found.generation if found is not None else None
            if half.joined_gen not in (peer.join_generation, forged):
                continue
            claimed = half.mac
            if peer.nic_mac is not None:
                if claimed != peer.nic_mac:
                    self._evict(peer, claimed, f"its NIC is {format_mac(peer.nic_mac)}")
                continue
            owner = owners.get(claimed)
            if owner is not None:
                self._evict(
                    peer, claimed, f"that is the NIC of peer {owner.id} (QEMU {owner.qemu_name})"
                )
            elif "unchecked" not in peer.noted:
                peer.noted.add("unchecked")
                peer.log.info(
                    "peer %d (QEMU %s) publishes MAC %s; its NIC is unknown, so that is not "
                    "checked", peer.id, peer.qemu_name, half.mac_str,
                    extra={"event": "unchecked", "peer": peer.id, "mac": half.mac_str},
                )  # fmt: skip

    def _evict(self, peer: Peer, claimed: bytes, why: str) -> None:
        """Cut ``peer`` off for publishing ``claimed``: EVICTED, then a leave.

        Closing the connection is safe for its QEMU: ivshmem installs no
        event handler on its server chardev (qemu_chr_fe_set_handlers with
        a NULL event callback, 7.2 to current), so EOF only disconnects the
        socket chardev (tcp_chr_disconnect); the device keeps BAR2 and its
        eventfds and nothing is freed.  Unless its chardev has reconnect=,
        that QEMU never connects again on its own; a re-plug does, and meets
        the hold-off.
        """
        if peer.evicted:
            return
        peer.evicted = True
        hold = self._strike(peer.identity)
        nic = format_mac(peer.nic_mac) if peer.nic_mac is not None else None
        peer.log.warning(
            "evicting peer %d (slot %d, pid %d, QEMU %s): it publishes MAC %s but %s; "
            "%s",
            peer.id, peer.slot, peer.pid, peer.qemu_name, format_mac(claimed), why,
            f"this QEMU may rejoin in {hold:.0f} s" if hold is not None
            else "its process is unknown, so it may rejoin at once",
            extra={
                "event": "evict", "peer": peer.id, "slot": peer.slot, "pid": peer.pid,
                "qemu_name": peer.identity.name, "claimed_mac": format_mac(claimed),
                "nic_mac": nic, "holdoff": hold,
            },
        )  # fmt: skip
        self._doom(peer, f"evicted for publishing MAC {format_mac(claimed)}", logging.INFO)

    def _log_repairs(self, header: bool, tampered: dict[int, SlotView]) -> None:
        now = time.monotonic()
        what: list[tuple[int | None, str]] = []
        if header:
            what.append((None, "the region header"))
        for index, found in tampered.items():
            what.append(
                (
                    index,
                    f"slot {index}'s server half (found present {found.present} peer_id "
                    f"{found.peer_id} generation {found.generation} flags {found.srv_flags:#x} "
                    f"nic_mac {found.nic_mac_str})",
                )
            )
        for key, text in what:
            last, suppressed = self._repair_logged.get(key, (-_REPAIR_LOG_INTERVAL, 0))
            if now - last < _REPAIR_LOG_INTERVAL:
                self._repair_logged[key] = (last, suppressed + 1)
                continue
            more = f" ({suppressed} more times since the last report)" if suppressed else ""
            log.warning(
                "a region member overwrote %s; restored%s", text, more,
                extra={"event": "repair", "slot": key, "suppressed": suppressed},
            )  # fmt: skip
            self._repair_logged[key] = (now, 0)
