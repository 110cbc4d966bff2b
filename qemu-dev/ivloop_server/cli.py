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

This module parses the options, prints what the user asked for (errors,
``--dump``, ``--print-unit``), sets up logging and chooses the exit
status; :mod:`~ivloop_server.daemon` runs the server, and
:mod:`~ivloop_server.options` parses the option values.

Exit status: 0 after a clean stop (SIGTERM/SIGINT), a dump or a printed
unit, and in the process that started a daemon once the daemon accepts
connections; 1 when the server cannot run (socket in use, path not a
socket, no memory...), 2 for invalid options, 75 after a hand-over to the
next server process (SIGUSR2 under systemd; the unit restarts it).  Errors are one line on
stderr; logs go to stderr; stdout stays empty except for --dump and
--print-unit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import logging.handlers
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

from . import __version__, abi, handoff, options
from .daemon import DaemonStartError, Readiness, daemonize, serve
from .errors import ConfigError, IvloopServerError
from .nic import load_nic_map
from .region import Region, find_server_region, format_size, min_region_size
from .sdnotify import Notifier
from .server import (
    DEFAULT_MAX_PEERS,
    DEFAULT_SIZE,
    DEFAULT_VECTORS,
    MAX_VECTORS,
    SOCKET_MODE,
    ServerConfig,
)
from .unitfiles import UNIT_FILES, unit_text

PROG = "ivloop-server"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: The server handed its region and members over (SIGUSR2): restart it.
EXIT_HANDED_OFF = handoff.EXIT_HANDED_OFF

log = logging.getLogger("ivloop_server")

#: The pidfile of a daemon started without -p (ivshmem-server: /var/run/ivshmem-server.pid).
DAEMON_PIDFILE: Final = Path("/run/ivloop-server.pid")
SYSLOG_SOCKET: Final = "/dev/log"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


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
        type=options.socket_mode,
        default=SOCKET_MODE,
        metavar="MODE",
        help=f"the socket's permission bits, octal (default {SOCKET_MODE:04o}); nothing for "
        "others: who may connect joins the region",
    )
    parser.add_argument(
        "--socket-group",
        type=options.group,
        metavar="GROUP",
        help="give the socket this group (name or GID), e.g. the one QEMU runs as, with "
        "--socket-mode 0660",
    )
    parser.add_argument(
        "-l",
        "--size",
        type=options.power_of_two_size,
        default=None,
        metavar="SIZE",
        help="region size, a power of two, suffixes K/M/G/T as in ivshmem-server "
        f"(default: {format_size(DEFAULT_SIZE)}, or the smallest size whose rings each "
        "hold the largest frame twice if --max-peers needs more: 128M for 16 peers, "
        "2G for 64)",
    )
    parser.add_argument(
        "-n",
        "--vectors",
        type=options.vectors,
        default=DEFAULT_VECTORS,
        metavar="N",
        help=f"doorbell vectors per peer, {abi.IVL_NR_VECTORS}..{MAX_VECTORS} "
        f"(default {DEFAULT_VECTORS}, what ivloop uses); must match QEMU's vectors=",
    )
    parser.add_argument(
        "--max-peers",
        type=options.int_in(2, abi.IVL_MAX_PEERS),
        default=DEFAULT_MAX_PEERS,
        metavar="N",
        help=f"peer slots, 2..{abi.IVL_MAX_PEERS} (default {DEFAULT_MAX_PEERS}); no short "
        "option: ivshmem-server's -n is the vectors",
    )
    parser.add_argument(
        "--ring-size",
        type=options.power_of_two_size,
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
        type=options.int_in(0, 1 << 20),
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


def dump(source: str) -> int:
    target: str | Path = find_server_region(int(source)) if source.isdigit() else source
    with Region.attach(target) as region:
        sys.stdout.write(json.dumps(region.as_dict(), indent=2) + "\n")
    return EXIT_OK


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(os.path.abspath(path))


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
            hugepage_size = options.hugetlbfs_page_size(args.hugetlbfs)
        except ConfigError as exc:
            return usage_error(str(exc))
    size = args.size
    if size is None:
        size = max(DEFAULT_SIZE, min_region_size(args.max_peers,
                                                 args.ring_size or abi.IVL_RING_MIN_SIZE))
    config = ServerConfig(
        socket_path=args.socket,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        size=size,
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
        try:
            pipe = daemonize()
        except DaemonStartError as exc:
            sys.stderr.write(f"{PROG}: error: {exc}\n")
            return EXIT_FAILURE
        if pipe is None:  # the starting process: the daemon accepts connections
            return EXIT_OK
        readiness = Readiness([*fds, pipe], notifier, daemon_fd=pipe, mainpid=os.getpid())
    else:
        nic_path = args.nic_macs
    handler = setup_logging(args.log_format, args.verbose,
                            syslog=daemon and not stat.S_ISREG(os.fstat(2).st_mode))  # fmt: skip
    if args.size is None and size != DEFAULT_SIZE:
        log.info("region size %s picked for %d peers (--size sets it)", format_size(size),
                 args.max_peers, extra={"event": "size", "size": size})
    if daemon:
        log.info("daemonized (pid %d, pidfile %s)%s", os.getpid(), pidfile,
                 " as ivshmem-server does with -S and no -F" if not args.daemon else "",
                 extra={"event": "daemon", "pid": os.getpid()})  # fmt: skip
    try:
        handed_off = asyncio.run(serve(config, pidfile, None, nic_path, readiness=readiness))
    except (IvloopServerError, OSError) as exc:
        if not readiness.failed(str(exc)):
            log.error("%s", exc, extra={"event": "error", "reason": str(exc)})
        return EXIT_FAILURE
    finally:
        notifier.close()
        log.removeHandler(handler)
    return EXIT_HANDED_OFF if handed_off else EXIT_OK
