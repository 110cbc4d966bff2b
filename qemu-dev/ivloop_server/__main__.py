"""Command line of ivloop-server (also ``python -m ivloop_server``).

Exit status: 0 after a clean stop (SIGTERM/SIGINT) or a dump, 1 when the
server cannot run (socket in use, path not a socket, no memory...), 2 for
invalid options.  Errors are one line on stderr; logs go to stderr; stdout
stays empty except for --dump.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, abi
from .errors import ConfigError, IvloopServerError
from .nic import load_nic_map
from .region import Region, find_server_region, format_size, is_power_of_two
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

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_SHIFTS = {"": 0, "k": 10, "m": 20, "g": 30}


def parse_size(text: str) -> int:
    """Parse 4096, 64K, 32M, 1G (also 32MiB, 32mb): binary multiples."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 4096, 256K, 32M, 1G)")
    return int(match.group(1)) << _SHIFTS[match.group(2).lower()]


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="ivshmem server for ivloop: creates the shared region, speaks QEMU's "
        "ivshmem server protocol on a UNIX socket and keeps the peer directory.",
        epilog="QEMU side: -chardev socket,path=PATH,id=ivl "
        "-device ivshmem-doorbell,chardev=ivl,vectors=N (N = --vectors).",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-S", "--socket", type=Path, metavar="PATH", help="listening socket")
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
        help=f"region size, a power of two, suffixes K/M/G (default {format_size(DEFAULT_SIZE)})",
    )
    parser.add_argument(
        "-n",
        "--max-peers",
        type=_int_in(2, abi.IVL_MAX_PEERS),
        default=DEFAULT_MAX_PEERS,
        metavar="N",
        help=f"peer slots, 2..{abi.IVL_MAX_PEERS} (default {DEFAULT_MAX_PEERS})",
    )
    parser.add_argument(
        "--vectors",
        type=_int_in(abi.IVL_NR_VECTORS, MAX_VECTORS),
        default=DEFAULT_VECTORS,
        metavar="N",
        help=f"doorbell vectors per peer, {abi.IVL_NR_VECTORS}..{MAX_VECTORS} "
        f"(default {DEFAULT_VECTORS}); must match QEMU's vectors=",
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
    parser.add_argument("-p", "--pidfile", type=Path, metavar="PATH", help="write the PID here")
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


def setup_logging(fmt: str, verbose: bool) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    return handler


# -- running ---------------------------------------------------------------


def _write_pidfile(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)


def _remove_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()


def _signal_ready(fd: int) -> None:
    try:
        os.write(fd, b"READY\n")
    finally:
        os.close(fd)


async def serve(
    config: ServerConfig,
    pidfile: Path | None,
    ready_fd: int | None,
    nic_macs: Path | None = None,
) -> int:
    """Run a server until SIGTERM or SIGINT; SIGHUP rereads the ``nic_macs`` file."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = ["stop requested"]
    server = IvshmemServer(config)

    def on_signal(sig: signal.Signals) -> None:
        reason[0] = f"received {sig.name}"
        stop.set()

    def on_hup() -> None:
        if nic_macs is None:
            log.info("SIGHUP: no --nic-macs file to reread", extra={"event": "reload"})
            return
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

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await server.start()
        if pidfile is not None:
            _write_pidfile(pidfile)
        if ready_fd is not None:
            _signal_ready(ready_fd)
        await stop.wait()
    finally:
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def usage_error(message: str) -> int:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return EXIT_USAGE

    if args.dump is not None:
        try:
            return dump(args.dump)
        except IvloopServerError as exc:
            sys.stderr.write(f"{PROG}: error: {exc}\n")
            return EXIT_FAILURE
    if args.socket is None:
        return usage_error("--socket PATH is required")
    nic_macs: dict[str, bytes] = {}
    if args.nic_macs is not None:
        try:
            nic_macs = load_nic_map(args.nic_macs)
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

    handler = setup_logging(args.log_format, args.verbose)
    try:
        return asyncio.run(serve(config, args.pidfile, args.ready_fd, args.nic_macs))
    except IvloopServerError as exc:
        log.error("%s", exc, extra={"event": "error", "reason": str(exc)})
        return EXIT_FAILURE
    except OSError as exc:
        log.error("%s", exc, extra={"event": "error", "reason": str(exc)})
        return EXIT_FAILURE
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
