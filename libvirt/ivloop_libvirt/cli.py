"""The ``ivloop-libvirt`` command: a thin layer over this package's functions.

Exit status: 0 done; 1 the operation failed and was rolled back (the VM
keeps running where it was, with its device); 2 invalid options or a
request that does not fit (unknown domain, no device, unreachable URI),
nothing changed; 3 the VM runs but without shared memory (moved without a
device on the destination, or the source could not get its device back):
the message says which ``ivloop-libvirt plug`` fixes it; 130 interrupted.
Errors are one line on stderr (a second one says what to do next);
``--json`` puts only the JSON report on stdout.  Plain text: the package
needs nothing but libvirt-python.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import Any, TextIO
from urllib.parse import urlsplit

from . import __version__, lv, plug, restart, shmem
from . import migrate as migrate_mod
from .errors import (
    IncompleteMigrationError,
    IvloopLibvirtError,
    MigrationError,
    RequestError,
    ServerRestartError,
)
from .reports import MigrationReport
from .shmem import DEFAULT_NAME, PciAddress

PROG = "ivloop-libvirt"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_SHM = 3


def _say(stream: TextIO, text: str) -> None:
    print(text, file=stream, flush=True)


def _default_socket() -> str:
    return os.environ.get("IVLOOP_SERVER_SOCKET", shmem.DEFAULT_SOCKET)


def _abs_path(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"must be an absolute path, not {text!r}")
    return os.path.normpath(text)


def _migrate_uri(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("tcp", "rdma", "unix") or \
            (parts.scheme != "unix" and not parts.hostname):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a migration URI; use tcp://HOST[:PORT] (or rdma://, unix://)")
    if parts.scheme != "unix":
        try:
            _ = parts.port
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: bad port") from exc
    return text


def _libvirt_uri(text: str) -> str:
    if "://" not in text or text.startswith("://"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a libvirt URI; e.g. qemu+ssh://host-b/system or "
            "qemu+unix:///system?socket=/run/libvirt/libvirt-sock")
    return text


def _address(text: str) -> PciAddress:
    try:
        bus, slot = (int(x, 16) for x in text.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not BUS:SLOT in hex, e.g. 00:05 (pc) or 0a:00 (q35 root port)"
        ) from exc
    if not (0 <= bus <= 0xFF and 0 <= slot <= 0x1F):
        raise argparse.ArgumentTypeError(f"{text!r}: bus 00-ff, slot 00-1f")
    return PciAddress(bus=bus, slot=slot)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _bandwidth(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB/s") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Manage ivloop's shared-memory device in libvirt domains: plug, unplug, "
        "live-migrate around it, restart the host's ivloop-server.",
        epilog="Exit status: 0 done, 1 failed and rolled back, 2 bad request (nothing "
        "changed), 3 the VM runs without shared memory (re-plug it).")
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("-c", "--connect", type=_libvirt_uri, default=None, metavar="URI",
                       help="libvirt URI of this host (default: libvirt's, "
                       "$LIBVIRT_DEFAULT_URI or qemu:///system)")
        s.add_argument("--name", default=DEFAULT_NAME,
                       help=f"the <shmem> device's name (default {DEFAULT_NAME})")
        return s

    s = add("plug", "hot-plug the ivloop device into a running domain")
    s.add_argument("domain", help="domain name or UUID")
    s.add_argument("--socket", type=_abs_path, default=None, metavar="PATH",
                   help="the host's ivloop-server socket (default $IVLOOP_SERVER_SOCKET or "
                   f"{shmem.DEFAULT_SOCKET})")
    s.add_argument("--address", type=_address, default=None, metavar="BUS:SLOT",
                   help="guest PCI address (default 00:05 on pc, the empty pcie-root-port "
                   "on q35)")
    s.add_argument("--config", action="store_true",
                   help="also add it to a persistent domain's definition")

    s = add("unplug", "hot-unplug the ivloop device from a running domain")
    s.add_argument("domain", help="domain name or UUID")
    s.add_argument("--config", action="store_true",
                   help="also remove it from a persistent domain's definition")
    s.add_argument("--timeout", type=_positive, default=plug.UNPLUG_TIMEOUT, metavar="S",
                   help="how long the guest may take to release it (default %(default)s)")

    s = add("migrate", "live-migrate a domain: unplug, migrate, plug on the destination")
    s.add_argument("domain", help="domain name or UUID")
    s.add_argument("--to", required=True, type=_libvirt_uri, metavar="URI",
                   help="libvirt URI of the destination host")
    s.add_argument("--migrate-uri", type=_migrate_uri, default=None, metavar="URI",
                   help="where QEMU sends the stream, tcp://HOST[:PORT] (default: libvirt "
                   "picks the destination's hostname and a port)")
    s.add_argument("--dest-socket", type=_abs_path, default=None, metavar="PATH",
                   help="the destination's ivloop-server socket (default: the source's path)")
    s.add_argument("--timeout", type=_positive, default=migrate_mod.DEFAULT_TIMEOUT,
                   metavar="S", help="abort the migration after S seconds (default "
                   "%(default)s)")
    s.add_argument("--max-bandwidth", type=_bandwidth, default=None, metavar="MIB",
                   help="cap the migration stream (MiB/s)")
    s.add_argument("--keep-source-definition", action="store_true",
                   help="a persistent domain stays defined on the source too (default: its "
                   "definition moves)")
    s.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (progress goes to stderr)")

    s = add("server-restart", "restart the host's ivloop-server and re-plug its domains")
    s.add_argument("--socket", type=_abs_path, default=None, metavar="PATH",
                   help="the server's socket: the domains using it are re-plugged (default "
                   f"$IVLOOP_SERVER_SOCKET or {shmem.DEFAULT_SOCKET})")
    s.add_argument("--command", type=shlex.split, default=None, metavar="CMD",
                   help="how this host restarts its server, e.g. 'systemctl restart "
                   "ivloop-server' (default: none, re-plug against the running server)")
    s.add_argument("--socket-wait", type=float, default=restart.SOCKET_WAIT, metavar="S",
                   help="wait up to S s for the command to create a new socket (0: do not "
                   "look; default %(default)s)")
    s.add_argument("--json", action="store_true", help="print the report as JSON on stdout")

    s = sub.add_parser("xml", help="print the device XML (for virsh attach-device or a "
                       "domain definition)")
    s.add_argument("--socket", type=_abs_path, default=None, metavar="PATH",
                   help=f"the server's socket (default {shmem.DEFAULT_SOCKET})")
    s.add_argument("--name", default=DEFAULT_NAME)
    s.add_argument("--machine", choices=("pc", "q35"), default="pc")
    s.add_argument("--port-index", type=int, default=10, metavar="N",
                   help="q35: index of the pcie-root-port printed with it (default 10)")
    return p


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)-8s %(message)s", stream=sys.stderr)


def _fail(message: str, hint: str = "") -> None:
    lines = message.splitlines() or ["failed"]
    _say(sys.stderr, f"{PROG}: error: {lines[0]}")
    for line in [*lines[1:], *([hint] if hint else [])]:
        _say(sys.stderr, f"  {line}")


def cmd_plug(args: argparse.Namespace) -> int:
    conn = lv.connect(args.connect)
    dom = lv.lookup(conn, args.domain)
    socket = args.socket or _default_socket()
    done = plug.plug(dom, socket, name=args.name, address=args.address, config=args.config)
    addr = done.device.address
    where = f" at {addr.bus:02x}:{addr.slot:02x}" if addr else ""
    _say(sys.stdout, f"{done.domain}: {args.name} plugged on {socket}{where} "
         f"({done.seconds:.3f} s)")
    return 0


def cmd_unplug(args: argparse.Namespace) -> int:
    conn = lv.connect(args.connect)
    dom = lv.lookup(conn, args.domain)
    done = plug.unplug(dom, name=args.name, config=args.config, timeout=args.timeout)
    _say(sys.stdout, f"{done.domain}: {args.name} unplugged ({done.seconds:.3f} s)")
    return 0


def _migration_table(report: MigrationReport) -> str:
    """The report's rows under a title: steps left-aligned, seconds right-aligned."""
    rows = [("step", "seconds"), *report.rows()]
    left = max(len(step) for step, _ in rows)
    right = max(len(seconds) for _, seconds in rows)
    lines = [f"{report.vm}: {report.source} -> {report.destination}"]
    lines += [f"  {step:<{left}}  {seconds:>{right}}" for step, seconds in rows]
    return "\n".join(lines)


def cmd_migrate(args: argparse.Namespace) -> int:
    human = sys.stderr if args.json else sys.stdout
    if args.connect and args.connect == args.to:
        raise RequestError(f"--to {args.to} is the source itself (--connect)")
    sconn = lv.connect(args.connect)
    dom = lv.lookup(sconn, args.domain)
    dconn = lv.connect(args.to)

    def progress(phase: str, info: dict[str, Any]) -> None:
        t = float(info.get("t", 0.0))
        if phase == "transfer":
            _say(human, f"[{t:5.1f} s] migrating: {float(info['mib']):.0f} MiB sent")
        else:
            _say(human, f"[{t:5.1f} s] {phase}")

    try:
        report = migrate_mod.migrate(
            dom, dconn, migrate_uri=args.migrate_uri, dest_socket=args.dest_socket,
            name=args.name, timeout=args.timeout, max_bandwidth_mib=args.max_bandwidth,
            keep_source_definition=args.keep_source_definition, progress=progress)
    except MigrationError as exc:
        if args.json:
            sys.stdout.write(json.dumps(exc.report.as_dict(), indent=2) + "\n")
        raise
    _say(human, _migration_table(report))
    if args.json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0


def cmd_server_restart(args: argparse.Namespace) -> int:
    conn = lv.connect(args.connect)
    socket = args.socket or _default_socket()
    human = sys.stderr if args.json else sys.stdout

    def progress(what: str, info: dict[str, Any]) -> None:
        _say(human, f"{what} {info.get('domain', shlex.join(info.get('command', [])))}")

    try:
        report = restart.server_restart(conn, socket, command=args.command, name=args.name,
                                        socket_wait=args.socket_wait, progress=progress)
    except ServerRestartError as exc:
        if args.json:
            sys.stdout.write(json.dumps(exc.report.as_dict(), indent=2) + "\n")
        raise
    if args.json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        names = ", ".join(r.domain for r in report.domains) or "no domain"
        _say(sys.stdout, f"{socket}: re-plugged {names}")
    return 0


def cmd_xml(args: argparse.Namespace) -> int:
    socket = args.socket or _default_socket()
    if args.machine == "q35":
        sys.stdout.write(shmem.root_port_xml(args.port_index) + "\n")
        address = PciAddress(bus=args.port_index, slot=0)
    else:
        address = PciAddress()
    sys.stdout.write(shmem.shmem_xml(socket, name=args.name, address=address) + "\n")
    return 0


COMMANDS = {"plug": cmd_plug, "unplug": cmd_unplug, "migrate": cmd_migrate,
            "server-restart": cmd_server_restart, "xml": cmd_xml}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except IncompleteMigrationError as exc:
        _fail(str(exc), exc.report.hint)
        return EXIT_NO_SHM
    except MigrationError as exc:
        _fail(str(exc))
        return EXIT_FAILED
    except RequestError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except IvloopLibvirtError as exc:
        _fail(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _say(sys.stderr, f"{PROG}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
