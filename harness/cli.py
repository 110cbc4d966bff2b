"""The ``harness`` command: a thin layer over :mod:`harness.cluster`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from . import cluster
from . import topology as topology_mod
from .errors import HarnessError
from .state import StateDir

out = Console()
err = Console(stderr=True)
if not out.is_terminal:  # pipes and CI logs: do not squeeze tables into 80 columns
    out.width = 200


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness",
        description="Boot ivloop VMs on simulated hosts, migrate them, check the path.",
    )
    p.add_argument("--state-dir", type=Path, default=None,
                   help="runtime state directory (default $IVLOOP_STATE_DIR or /run/ivloop)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("up", help="create the hosts and boot the VMs")
    s.add_argument("--topology", type=Path, default=None, help="topology TOML file")
    s.add_argument("--accel", choices=["kvm", "tcg"], default=None,
                   help="force the accelerator (default: detect)")
    s.add_argument("--no-ivshmem", action="store_true",
                   help="boot without ivloop servers and ivshmem devices")
    s.add_argument("--no-driver", action="store_true",
                   help="do not load ivloop.ko in the guests (IP on eth0)")

    s = sub.add_parser("status", help="show hosts, VMs and their network path")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--no-probe", action="store_true", help="do not ask the guests")

    s = sub.add_parser("ssh", help="run a command in a VM, or open a shell")
    s.add_argument("vm")
    s.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    sub.add_parser("down", help="stop and remove everything the harness started")

    for name, help_ in (("plug", "hot-add a VM's ivshmem device"),
                        ("unplug", "hot-remove a VM's ivshmem device")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("vm")
    return p


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)])
    # paramiko logs every refused connection attempt while a guest boots.
    quiet = logging.DEBUG if verbose >= 2 else logging.CRITICAL
    for noisy in ("paramiko", "invoke", "fabric", "qemu", "asyncio", "pyroute2"):
        logging.getLogger(noisy).setLevel(quiet)


def cmd_up(args: argparse.Namespace, sd: StateDir) -> int:
    topo = topology_mod.load(args.topology)
    with sd:
        state = cluster.up(sd, topo, args.accel, ivshmem=not args.no_ivshmem,
                           driver=not args.no_driver)
    out.print(f"[green]up[/]: {len(state.vms)} VMs on {len(state.hosts)} hosts "
              f"(accelerator {state.accel}); state in {sd.path}")
    return 0


def cmd_status(args: argparse.Namespace, sd: StateDir) -> int:
    with sd:
        rows = cluster.status(sd, probe=not args.no_probe)
    if args.json:
        out.print_json(json.dumps([asdict(r) for r in rows]))
        return 0
    table = Table(title=f"ivloop topology ({sd.path})")
    for col in ("host", "VM", "IP", "MAC", "accel", "pid", "status", "ivshmem", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.host, r.vm, r.ip, r.mac, r.accel, str(r.pid or "-"), r.status,
                      r.ivshmem, r.path)
    out.print(table)
    return 0


def cmd_ssh(args: argparse.Namespace, sd: StateDir) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    state = sd.load()
    with cluster.guest(sd, state, args.vm) as g:
        if not cmd:
            return g.shell()
        code, text = g.status(" ".join(cmd), timeout=None)
    sys.stdout.write(text)
    return code


def cmd_down(args: argparse.Namespace, sd: StateDir) -> int:
    with sd:
        removed = cluster.down(sd)
    for item in removed:
        out.print(f"removed {item}")
    out.print("[green]down[/]" if removed else "nothing was up")
    return 0


def cmd_plug(args: argparse.Namespace, sd: StateDir) -> int:
    with sd:
        cluster.set_ivshmem(sd, args.vm, attached=args.command == "plug")
    out.print(f"{args.vm}: ivshmem {'attached' if args.command == 'plug' else 'detached'}")
    return 0


COMMANDS = {"up": cmd_up, "status": cmd_status, "ssh": cmd_ssh, "down": cmd_down,
            "plug": cmd_plug, "unplug": cmd_plug}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    sd = StateDir(args.state_dir)
    try:
        return COMMANDS[args.command](args, sd)
    except HarnessError as exc:
        lines = str(exc).splitlines() or [exc.__class__.__name__]
        err.print(f"harness: error: {lines[0]}", markup=False, highlight=False)
        for line in lines[1:]:
            err.print(f"  {line}", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("harness: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
