"""Command line of ivloop-server (also ``python -m ivloop_server``).

Its short options are those of QEMU's contrib ``ivshmem-server``, with the
same meanings (``-S`` socket, ``-l`` size, ``-n`` vectors, ``-F``
foreground, ``-p`` pidfile, ``-v`` verbose, ``-m`` hugetlbfs directory);
each also has a long option.  One rule decides whether the server
daemonizes: ``-S PATH`` is ivshmem-server's command line, and like
ivshmem-server it daemonizes unless ``-F`` is given (pidfile
/run/ivloop-server.pid unless ``-p``); ``--socket PATH`` is ivloop-server's
own and stays in the foreground unless ``--daemon`` is given.  A service
manager (``Type=notify``) or the harness uses ``--socket``.

Exit status: 0 after a clean stop (SIGTERM/SIGINT), a dump or a printed
unit, and in the process that started a daemon once the daemon accepts
connections; 1 when the server cannot run (socket in use, path not a
socket, no memory...), 2 for invalid options.  Errors are one line on
stderr; logs go to stderr; stdout stays empty except for --dump and
--print-unit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import grp
import importlib.resources
import json
import logging
import logging.handlers
import os
import re
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, Final, NoReturn

from . import __version__, abi
from .errors import ConfigError, IvloopServerError, PidfileError
from .nic import load_nic_map
from .region import Region, find_server_region, format_size, is_power_of_two
from .sdnotify import Notifier
from .server import (
    DEFAULT_MAX_PEERS,
    DEFAULT_SIZE,
    DEFAULT_VECTORS,
    MAX_VECTORS,
    SOCKET_MODE,
    IvshmemServer,
    ServerConfig,
)

PROG = "ivloop-server"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("ivloop_server")

#: QEMU's size syntax (qemu_strtosz, which ivshmem-server's -l uses): a
#: number, possibly with a fraction, and one of B K M G T P E; ours adds
#: KiB/KB-style spellings.  Binary multiples throughout.
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgtpe])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_SHIFTS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE_EXAMPLES = "examples: 4096, 256K, 4M, 1.5G"


def parse_size(text: str) -> int:
    """Parse 4096, 64K, 32M, 1G, 1.5G, 0x400000 (also 32MiB, 32mb): binary multiples."""
    if text.strip().lower().startswith("0x"):
        try:
            return int(text.strip(), 16)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a size ({_SIZE_EXAMPLES})") from None
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size ({_SIZE_EXAMPLES})")
    value = Fraction(match.group(1)) * (1 << _SHIFTS[(match.group(2) or "").lower()])
    if value.denominator != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes")
    return int(value)


def _power_of_two_size(text: str) -> int:
    value = parse_size(text)
    if not is_power_of_two(value):
        raise argparse.ArgumentTypeError(
            f"{text} is not a power of two (try {format_size(1 << max(value, 1).bit_length())})"
        )
    return value


def _socket_mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0660") from None


def _group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {text!r}") from None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


DAEMON_PIDFILE: Final = Path("/run/ivloop-server.pid")
SYSLOG_SOCKET: Final = "/dev/log"
UNIT_FILES: Final = ("ivloop-server.service", "ivloop-server@.service", "ivloop-server.default")
#: The binary the shipped unit files name; --print-unit puts this installation's.
UNIT_BINARY: Final = "/usr/bin/ivloop-server"


class _SocketAction(argparse.Action):
    """--socket or -S; remembers the spelling (it decides the daemon default)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None,
                 option_string: str | None = None) -> None:  # fmt: skip
        previous = getattr(namespace, "socket_option", None)
        if previous is not None and previous != option_string:
            parser.error(f"give the socket once: {previous} or {option_string}, not both")
        namespace.socket = Path(str(values))
        namespace.socket_option = option_string


class _RefusedOption(argparse.Action):
    """An ivshmem-server short option whose meaning this server cannot have."""

    def __init__(self, option_strings: Sequence[str], dest: str, why: str = "",
                 **kwargs: Any) -> None:  # fmt: skip
        self.why = why
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None,
                 option_string: str | None = None) -> None:  # fmt: skip
        parser.error(f"{option_string} {values}: {self.why}")


def _vectors(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < abi.IVL_NR_VECTORS:
        raise argparse.ArgumentTypeError(
            f"{value} vectors is too few for ivloop, which needs {abi.IVL_NR_VECTORS} (0: "
            f"membership, 1: data): use {abi.IVL_NR_VECTORS}, and vectors={abi.IVL_NR_VECTORS} on "
            "QEMU's ivshmem-doorbell"
        )
    if value > MAX_VECTORS:
        raise argparse.ArgumentTypeError(f"{value} is outside {abi.IVL_NR_VECTORS}..{MAX_VECTORS}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="ivshmem server for ivloop: creates the shared region, speaks QEMU's "
        "ivshmem server protocol on a UNIX socket and keeps the peer directory. "
        "The short options are those of QEMU's contrib ivshmem-server, with the same "
        "meanings; with -S the server daemonizes unless -F, as ivshmem-server does, with "
        "--socket it stays in the foreground unless --daemon.",
        epilog="QEMU side: -chardev socket,path=PATH,id=ivl "
        "-device ivshmem-doorbell,chardev=ivl,vectors=N (N = --vectors). "
        "Under systemd: ivloop-server --print-unit.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-S", "--socket", action=_SocketAction, metavar="PATH",
                        help="listening socket (-S: daemonize unless -F, like ivshmem-server; "
                        "--socket: stay in the foreground unless --daemon)")  # fmt: skip
    parser.set_defaults(socket=None, socket_option=None)
    parser.add_argument(
        "--socket-mode",
        type=_socket_mode,
        default=SOCKET_MODE,
        metavar="MODE",
        help=f"the socket's permission bits, octal (default {SOCKET_MODE:04o}); nothing for "
        "others: who may connect joins the region",
    )
    parser.add_argument(
        "--socket-group",
        type=_group,
        metavar="GROUP",
        help="give the socket this group (name or GID), e.g. the one QEMU runs as, with "
        "--socket-mode 0660",
    )
    parser.add_argument(
        "-l",
        "--size",
        type=_power_of_two_size,
        default=DEFAULT_SIZE,
        metavar="SIZE",
        help="region size, a power of two, suffixes K/M/G/T as in ivshmem-server "
        f"(default {format_size(DEFAULT_SIZE)})",
    )
    parser.add_argument(
        "-n",
        "--vectors",
        type=_vectors,
        default=DEFAULT_VECTORS,
        metavar="N",
        help=f"doorbell vectors per peer, {abi.IVL_NR_VECTORS}..{MAX_VECTORS} "
        f"(default {DEFAULT_VECTORS}, what ivloop uses); must match QEMU's vectors=",
    )
    parser.add_argument(
        "--max-peers",
        type=_int_in(2, abi.IVL_MAX_PEERS),
        default=DEFAULT_MAX_PEERS,
        metavar="N",
        help=f"peer slots, 2..{abi.IVL_MAX_PEERS} (default {DEFAULT_MAX_PEERS}); no short "
        "option: ivshmem-server's -n is the vectors",
    )
    parser.add_argument(
        "--ring-size",
        type=_power_of_two_size,
        default=None,
        metavar="SIZE",
        help="data bytes per ring (default: the largest that fits, at most "
        f"{format_size(abi.IVL_RING_MAX_SIZE)})",
    )
    parser.add_argument(
        "-m",
        "--hugetlbfs",
        type=Path,
        metavar="DIR",
        help="where to create the shared memory, as ivshmem-server's -m: a hugetlbfs mount "
        "(e.g. /dev/hugepages), for a region of huge pages of that mount's size (still a "
        "sealed memfd); other directories are refused, the default memfd being the same "
        "memory, sealed",
    )
    parser.add_argument(
        "-M",
        action=_RefusedOption,
        metavar="NAME",
        why="ivloop-server does not put its region in a named POSIX shared memory object: "
        "the region is a sealed memfd that only connected QEMUs receive (anyone who can open "
        "/dev/shm/NAME could read, write or shrink it under the guests); drop -M "
        "(ivloop-server --dump PID shows the region)",
        help="refused: ivshmem-server's POSIX shm object (see the error for why)",
    )
    parser.add_argument(
        "--leave-notices",
        action="store_true",
        help="tell clients when a peer leaves (the protocol's ID-without-fd message); off by "
        "default because QEMU's ivshmem double-frees on it when its device is later unplugged",
    )
    parser.add_argument(
        "--nic-macs",
        type=Path,
        metavar="FILE",
        help="data-NIC MAC of QEMUs whose command line does not tell (several NICs, or a NIC "
        "without mac=): lines 'NAME MAC', NAME being QEMU's -name (guest=NAME or NAME), '#' "
        "comments; the map wins over the command line; SIGHUP rereads it",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-F", "--foreground", action="store_true", default=None,
                      help="do not daemonize (the default with --socket)")  # fmt: skip
    mode.add_argument("--daemon", action="store_true", default=None,
                      help="daemonize (the default with -S): the starting process exits 0 once "
                      "the daemon accepts connections, 1 if it cannot start")  # fmt: skip
    parser.add_argument("-p", "--pidfile", type=Path, metavar="PATH",
                        help=f"write the PID here (daemon default {DAEMON_PIDFILE}); refused if "
                        "it names another running ivloop-server")  # fmt: skip
    parser.add_argument(
        "--ready-fd",
        type=_int_in(0, 1 << 20),
        metavar="FD",
        help='write "READY\\n" to FD and close it once connections are accepted',
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--dump",
        metavar="SOURCE",
        help="print the header and directory of a region as JSON and exit; SOURCE is a "
        "server PID, /proc/PID/fd/N, or a file holding a region",
    )
    parser.add_argument(
        "--print-unit",
        nargs="?",
        const=UNIT_FILES[0],
        choices=UNIT_FILES,
        metavar="FILE",
        help="print a systemd unit file (ExecStart naming this installation's ivloop-server) "
        f"or the defaults file, and exit: {', '.join(UNIT_FILES)} (default {UNIT_FILES[0]})",
    )
    return parser


# -- logging ---------------------------------------------------------------

_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                obj[key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup_logging(fmt: str, verbose: bool, *, syslog: bool = False) -> logging.Handler:
    """Log to stderr, or to syslog (a daemon whose stderr was no file)."""
    handler = _syslog_handler() if syslog else logging.StreamHandler(sys.stderr)
    if syslog:
        handler.setFormatter(logging.Formatter(f"{PROG}[%(process)d]: %(levelname)s "
                                               "%(name)s: %(message)s"))  # fmt: skip
    elif fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    return handler


def _syslog_handler() -> logging.Handler:
    if Path(SYSLOG_SOCKET).exists():
        with contextlib.suppress(OSError):
            return logging.handlers.SysLogHandler(
                address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON
            )
    return logging.NullHandler()  # no syslog: as quiet as ivshmem-server's daemon


# -- running ---------------------------------------------------------------


def _pidfile_owner(path: Path) -> int | None:
    """PID of a running ivloop-server other than this process named by ``path``."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None  # gone (or not ours to see): a stale pidfile
    return pid if b"ivloop" in cmdline else None


def _write_pidfile(path: Path) -> None:
    owner = _pidfile_owner(path)
    if owner is not None:
        raise PidfileError(
            f"pidfile {path} names ivloop-server process {owner}, still running; stop it "
            "or choose another --pidfile"
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror or exc}") from exc


def _remove_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()


class Readiness:
    """Whoever waits for the server to accept connections: --ready-fd, the
    process that started a daemon, the service manager (sd_notify)."""

    def __init__(self, fds: Sequence[int], notifier: Notifier, *, daemon_fd: int | None = None,
                 mainpid: int | None = None) -> None:  # fmt: skip
        self.fds = list(fds)
        self.notifier = notifier
        #: The pipe to the process that daemonized us (also in ``fds``).
        self.daemon_fd = daemon_fd
        self.mainpid = mainpid

    def ready(self, status: str) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.write(fd, b"READY\n")
            except OSError as exc:
                log.warning("cannot report readiness on fd %d: %s", fd, exc.strerror)
            finally:
                os.close(fd)
        self.daemon_fd = None
        self.notifier.ready(status, mainpid=self.mainpid)

    def failed(self, message: str) -> bool:
        """Report a start-up failure; True if the daemon's parent will print it."""
        self.notifier.notify(f"STATUS=failed: {' '.join(message.split())[:400]}")
        told = False
        if self.daemon_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.daemon_fd, f"ERROR {message}\n".encode())
                told = True
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)
        self.daemon_fd = None
        return told


async def serve(
    config: ServerConfig,
    pidfile: Path | None,
    ready_fd: int | None = None,
    nic_macs: Path | None = None,
    *,
    readiness: Readiness | None = None,
) -> int:
    """Run a server until SIGTERM or SIGINT; SIGHUP rereads the ``nic_macs`` file.

    Readiness (``ready_fd``, ``readiness``: the daemon's parent, sd_notify)
    is reported once connections are accepted and the pidfile is written.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = ["stop requested"]
    if readiness is None:
        readiness = Readiness([] if ready_fd is None else [ready_fd], Notifier(None))
    elif ready_fd is not None:
        readiness.fds.append(ready_fd)
    notifier = readiness.notifier
    server = IvshmemServer(config)
    watchdog: list[asyncio.TimerHandle] = []

    def on_signal(sig: signal.Signals) -> None:
        reason[0] = f"received {sig.name}"
        notifier.stopping(f"stopping: {reason[0]}, dropping {len(server.peers())} peers")
        stop.set()

    def on_hup() -> None:
        if nic_macs is None:
            log.info("SIGHUP: no --nic-macs file to reread", extra={"event": "reload"})
            return
        notifier.reloading()
        try:
            try:
                mapping = load_nic_map(nic_macs)
            except ConfigError as exc:
                log.error("SIGHUP: %s; keeping the previous map", exc,
                          extra={"event": "reload", "reason": str(exc)})  # fmt: skip
                return
            server.set_nic_map(mapping)
            log.info(
                "SIGHUP: reread %s: %d QEMUs mapped (applies to QEMUs that connect from now on)",
                nic_macs,
                len(mapping),
                extra={"event": "reload", "entries": len(mapping)},
            )
        finally:
            notifier.ready(server.status_text())

    def ping() -> None:
        notifier.watchdog()
        if interval is not None and not stop.is_set():
            watchdog[:] = [loop.call_later(interval, ping)]

    interval = notifier.watchdog_interval
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await server.start()
        if pidfile is not None:
            _write_pidfile(pidfile)
        def on_change() -> None:
            notifier.status(server.status_text())

        server.on_change = on_change
        readiness.ready(server.status_text())
        if interval is not None:
            ping()
        await stop.wait()
    finally:
        for handle in watchdog:
            handle.cancel()
        await server.stop(reason[0])
        if pidfile is not None:
            _remove_pidfile(pidfile)
        for sig in (*signals, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return EXIT_OK


def dump(source: str) -> int:
    target: str | Path = find_server_region(int(source)) if source.isdigit() else source
    with Region.attach(target) as region:
        sys.stdout.write(json.dumps(region.as_dict(), indent=2) + "\n")
    return EXIT_OK


# -- daemon ------------------------------------------------------------------


def daemonize() -> tuple[int | None, int]:
    """Fork into a daemon, as ivshmem-server does without -F.

    The calling process waits until the daemon reports (the returned pipe
    end, written by :class:`Readiness`) and returns its own exit status:
    0 once the daemon accepts connections, 1 if it could not start (its
    message printed as one line): ``(status, -1)``.  In the daemon -- the
    grandchild, in its own session, stdin and stdout on /dev/null, stderr
    kept for the log, working directory / -- it returns ``(None, fd)``, fd
    being the pipe for ``Readiness.daemon_fd``.
    """
    rfd, wfd = os.pipe()
    child = os.fork()
    if child > 0:
        os.close(wfd)
        os.waitpid(child, 0)  # the session leader in between exits at once
        data = b""
        with os.fdopen(rfd, "rb") as pipe:
            data = pipe.read()
        if data.startswith(b"READY"):
            return EXIT_OK, -1
        text = data.decode(errors="replace").strip()
        if text.startswith("ERROR "):
            sys.stderr.write(f"{PROG}: error: {text[6:]}\n")
        else:
            sys.stderr.write(f"{PROG}: error: the daemon exited before it accepted "
                             "connections (its log, on stderr, says why)\n")  # fmt: skip
        return EXIT_FAILURE, -1
    # Child: a new session, then a second fork so the daemon is no session
    # leader and can never get a controlling terminal back.
    os.close(rfd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if not stat.S_ISREG(os.fstat(2).st_mode):
        # A terminal or a pipe would tie the daemon to its caller (a shell's
        # $(...) or ssh would wait for it); the log goes to syslog instead.
        os.dup2(null, 2)
    os.close(null)
    return None, wfd


def _unit_binary() -> str:
    """This installation's ivloop-server executable, for the unit's ExecStart."""
    candidates = [Path(sys.executable).with_name(PROG)]
    if Path(sys.argv[0]).name == PROG:
        candidates.insert(0, Path(sys.argv[0]))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate.absolute())
    return UNIT_BINARY


def unit_text(name: str, binary: str | None = None) -> str:
    """A shipped unit or defaults file, with ExecStart naming ``binary``."""
    text = (importlib.resources.files(__package__) / "systemd" / name).read_text()
    return text.replace(UNIT_BINARY, binary or _unit_binary())


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(os.path.abspath(path))


def _hugetlbfs_page_size(directory: Path) -> int:
    """Huge page size of the hugetlbfs mount ``directory`` is in, or ConfigError."""
    try:
        real = directory.resolve(strict=True)
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"-m {directory}: {exc.strerror or exc}") from exc
    best, fstype = "", ""
    for line in mounts:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        inside = str(real) == point or str(real).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, line.split(" - ", 1)[1].split()[0]
    if fstype != "hugetlbfs":
        raise ConfigError(
            f"-m {directory}: not a hugetlbfs mount ({fstype or 'unknown'} at {best or '?'}); "
            "ivloop-server keeps its region in a sealed memfd, so -m only makes sense for huge "
            "pages (mount -t hugetlbfs none DIR); drop -m otherwise"
        )
    return os.statvfs(real).f_bsize


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def usage_error(message: str) -> int:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return EXIT_USAGE

    if args.print_unit is not None:
        sys.stdout.write(unit_text(args.print_unit))
        return EXIT_OK
    if args.dump is not None:
        try:
            return dump(args.dump)
        except IvloopServerError as exc:
            sys.stderr.write(f"{PROG}: error: {exc}\n")
            return EXIT_FAILURE
    if args.socket is None:
        return usage_error("--socket PATH (or -S PATH) is required")
    # -S is ivshmem-server's command line, and daemonizes unless -F like it.
    daemon = args.daemon or (args.socket_option == "-S" and not args.foreground)
    pidfile = args.pidfile if args.pidfile is not None or not daemon else DAEMON_PIDFILE
    nic_macs: dict[str, bytes] = {}
    if args.nic_macs is not None:
        try:
            nic_macs = load_nic_map(args.nic_macs)
        except ConfigError as exc:
            return usage_error(str(exc))
    hugepage_size = None
    if args.hugetlbfs is not None:
        try:
            hugepage_size = _hugetlbfs_page_size(args.hugetlbfs)
        except ConfigError as exc:
            return usage_error(str(exc))
    config = ServerConfig(
        socket_path=args.socket,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        size=args.size,
        max_peers=args.max_peers,
        vectors=args.vectors,
        ring_size=args.ring_size,
        hugepage_size=hugepage_size,
        leave_notices=args.leave_notices,
        nic_macs=nic_macs,
    )
    try:
        config.validate()
    except ConfigError as exc:
        return usage_error(str(exc))
    if args.ready_fd is not None:
        try:
            os.fstat(args.ready_fd)
        except OSError:
            return usage_error(f"--ready-fd {args.ready_fd} is not an open file descriptor")

    notifier = Notifier.from_environ()
    fds = [] if args.ready_fd is None else [args.ready_fd]
    readiness = Readiness(fds, notifier)
    if daemon:
        # Paths are resolved before the daemon leaves the working directory.
        # (Only then: a relative socket path may be what keeps it within
        # AF_UNIX's 108 bytes.)
        pidfile, nic_path = _absolute(pidfile), _absolute(args.nic_macs)
        config = dataclasses.replace(config, socket_path=Path(os.path.abspath(args.socket)))
        status, pipe = daemonize()
        if status is not None:
            return status
        readiness = Readiness([*fds, pipe], notifier, daemon_fd=pipe, mainpid=os.getpid())
    else:
        nic_path = args.nic_macs
    handler = setup_logging(args.log_format, args.verbose,
                            syslog=daemon and not stat.S_ISREG(os.fstat(2).st_mode))  # fmt: skip
    if daemon:
        log.info("daemonized (pid %d, pidfile %s)%s", os.getpid(), pidfile,
                 " as ivshmem-server does with -S and no -F" if not args.daemon else "",
                 extra={"event": "daemon", "pid": os.getpid()})  # fmt: skip
    try:
        return asyncio.run(serve(config, pidfile, None, nic_path, readiness=readiness))
    except (IvloopServerError, OSError) as exc:
        if not readiness.failed(str(exc)):
            log.error("%s", exc, extra={"event": "error", "reason": str(exc)})
        return EXIT_FAILURE
    finally:
        notifier.close()
        log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
