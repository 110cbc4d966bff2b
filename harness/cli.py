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

from . import bench as bench_mod
from . import bench_report, cluster
from . import demo as demo_mod
from . import migrate as migrate_mod
from . import soak as soak_mod
from . import topology as topology_mod
from . import watch as watch_mod
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

    s = sub.add_parser("migrate", help="live-migrate a VM to another host")
    s.add_argument("vm", nargs="?", default=None,
                   help="VM to move (default: the one VM marked mobile on --from)")
    s.add_argument("--from", dest="source", required=True, metavar="HOST")
    s.add_argument("--to", dest="dest", required=True, metavar="HOST")
    s.add_argument("--timeout", type=_positive, default=120.0, help="seconds (default 120)")
    s.add_argument("--max-bandwidth", type=_positive_int, default=None, metavar="MIB",
                   help="cap the migration stream (MiB/s)")
    s.add_argument("--json", type=Path, default=None, help="also write the report here")

    s = sub.add_parser("watch", help="run a TCP stream and a 20 ms ping; plot the path")
    s.add_argument("src", help="VM that sends (must not migrate meanwhile)")
    s.add_argument("dst")
    s.add_argument("--duration", type=_positive, default=30.0, help="seconds (default 30)")
    s.add_argument("--out", type=Path, default=None, help="directory for timeline.json/.png")

    s = sub.add_parser("demo", help="the whole story: up, shared path, migrate there and back")
    s.add_argument("--duration", type=_positive, default=40.0,
                   help="seconds of traffic around the migrations (default 40)")
    s.add_argument("--out", type=Path, default=Path("build/demo"),
                   help="directory for the timeline (default build/demo)")
    s.add_argument("--accel", choices=["kvm", "tcg"], default=None)

    s = sub.add_parser("bench", help="benchmark shm vs forced lower path vs the wire, "
                                     "and the native ring")
    s.add_argument("--reps", type=_positive_int, default=5,
                   help="interleaved repetitions per path and workload (default 5)")
    s.add_argument("--quick", action="store_true",
                   help="1 s samples, 1 repetition, fewer workloads (a smoke run)")
    s.add_argument("--out", type=Path, default=None,
                   help="directory for bench.json, bench.md and the PNGs (default "
                        "bench-results; with --report-only: the JSON's directory)")
    s.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                   help="do not measure: validate JSON and write the report from it")
    s.add_argument("--no-native", action="store_true", help="skip the native ring benchmark")
    s.add_argument("--native-json", type=Path, default=None, metavar="JSON",
                   help="use these bench-native results instead of running it with the VMs up")

    s = sub.add_parser("soak", help="migrate a VM back and forth N times with traffic "
                                    "running; count lost connections and kernel warnings")
    s.add_argument("vm", nargs="?", default=None,
                   help="VM to move (default: the one VM marked mobile on --from)")
    s.add_argument("--from", dest="source", required=True, metavar="HOST")
    s.add_argument("--to", dest="dest", required=True, metavar="HOST")
    s.add_argument("--count", type=_positive_int, default=20, help="moves (default 20)")
    s.add_argument("--peer", default=None,
                   help="VM on --from that sends the traffic (default: the first one)")
    s.add_argument("--window", type=_positive, default=25.0,
                   help="seconds of traffic around each move (default 25)")
    s.add_argument("--json", type=Path, default=None, help="also write the report here")

    s = sub.add_parser("server-restart",
                       help="start a new ivloop-server for a host and re-plug its VMs")
    s.add_argument("host")

    s = sub.add_parser("restart", help="boot a VM again (e.g. after its QEMU died)")
    s.add_argument("vm")

    for name, help_ in (("plug", "hot-add a VM's ivshmem device"),
                        ("unplug", "hot-remove a VM's ivshmem device")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("vm")
    return p


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: '{text}'")
    return value


def _positive_int(text: str) -> int:
    value = _positive(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number: '{text}'")
    return int(value)


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


def cmd_migrate(args: argparse.Namespace, sd: StateDir) -> int:
    with sd, out.status("migrating...") as spinner:
        def progress(phase: str, info: dict[str, object]) -> None:
            t = float(info.get("t", 0.0))  # type: ignore[arg-type]
            if phase == "transfer":
                spinner.update(f"[{t:5.1f} s] migrating: {info['status']}, "
                               f"{float(info['mib']):.0f} MiB sent")  # type: ignore[arg-type]
            elif phase != "migration":
                out.print(f"[{t:5.1f} s] {phase}")
        report = migrate_mod.migrate(sd, args.vm, args.source, args.dest,
                                     timeout=args.timeout,
                                     max_bandwidth_mib=args.max_bandwidth,
                                     progress=progress)
    table = Table(title=f"{report.vm}: {report.source} -> {report.destination}")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for label, value in (("unplug ivshmem (source)", report.unplug_s),
                         ("start destination", report.dest_start_s),
                         ("migrate", report.migrate_s),
                         ("plug ivshmem (destination)", report.plug_s),
                         ("total (QEMU)", report.total_s)):
        table.add_row(label, f"{value:.3f}")
    table.add_row("downtime", "-" if report.downtime_ms is None
                  else f"{report.downtime_ms / 1000:.3f}")
    table.add_row("RAM transferred (MiB)", f"{report.transferred_mib:.1f}")
    out.print(table)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    return 0


def _print_timeline(tl: watch_mod.Timeline) -> None:
    pb = tl.path_bytes()
    table = Table(title=f"{tl.source} -> {tl.destination}")
    table.add_column("what")
    table.add_column("value")
    table.add_row("TCP stream", "survived" if tl.iperf_ok else f"FAILED {tl.iperf_error}")
    table.add_row("bytes on shm / lower",
                  f"{pb['shm'] / 2**20:.1f} / {pb['lower'] / 2**20:.1f} MiB")
    table.add_row("pings lost", f"{tl.ping_lost} of {tl.ping_sent}")
    out.print(table)


def cmd_watch(args: argparse.Namespace, sd: StateDir) -> int:
    w = watch_mod.Watch(sd, args.src, args.dst, duration=args.duration, out_dir=args.out)
    with out.status(f"watching {args.src} -> {args.dst} for {args.duration:.0f} s"), w:
        w.wait()
    _print_timeline(w.timeline)
    js, png = w.write()
    out.print(f"timeline: {js}" + (f", plot: {png}" if png else ""))
    return 0 if w.timeline.iperf_ok else 1


def cmd_demo(args: argparse.Namespace, sd: StateDir) -> int:
    result = demo_mod.run(sd, out.print, args.out, duration=args.duration,
                          accel=args.accel)
    table = Table(title="ivloop demo")
    table.add_column("measure")
    table.add_column("value")
    for k, v in demo_mod.summary_rows(result):
        table.add_row(k, v)
    out.print(table)
    ok = result.timeline is not None and result.timeline.iperf_ok and len(result.migrations) == 2
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace, sd: StateDir) -> int:
    if args.report_only:
        json_path = args.report_only
    else:
        with sd:
            json_path = bench_mod.run(
                sd, reps=1 if args.quick else args.reps, quick=args.quick,
                out_dir=args.out or Path("bench-results"), with_native=not args.no_native,
                native_json=args.native_json,
                say=lambda text: out.print(text, markup=False, highlight=False))
    written = bench_report.write(json_path, args.out)
    out.print(written[0].read_text(), markup=False, highlight=False)
    out.print("wrote " + ", ".join(str(p) for p in [json_path, *written]))
    return 0


def cmd_soak(args: argparse.Namespace, sd: StateDir) -> int:
    vm = args.vm or migrate_mod.pick_vm(sd.load(), args.source)
    report = soak_mod.run(sd, vm, args.source, args.dest, args.count, peer=args.peer,
                          window=args.window,
                          say=lambda text: out.print(text, markup=False, highlight=False))
    table = Table(title=f"soak: {report.vm} {args.source} <-> {args.dest} "
                        f"(traffic from {report.peer})")
    for col in ("move", "ok", "downtime s", "switch src s", "switch dst s", "stream",
                "pings lost"):
        table.add_column(col)
    for m in report.moves:
        table.add_row(f"{m.index} {m.source}->{m.destination}", "yes" if m.ok else "NO",
                      soak_mod._s(m.downtime_ms, 1e-3), soak_mod._s(m.switch_source_s),
                      soak_mod._s(m.switch_dest_s), "ok" if m.stream_ok else "LOST",
                      f"{m.ping_lost}/{m.ping_sent}")
    out.print(table)
    warned = {vm: lines for vm, lines in report.kernel_warnings.items() if lines}
    out.print(f"lost connections: {report.lost_connections}, failed moves: "
              f"{report.failed_moves}, kernel warnings: "
              f"{sum(len(v) for v in warned.values())}")
    for vm_name, lines in warned.items():
        for line in lines[:5]:
            out.print(f"  {vm_name}: {line}", markup=False, highlight=False)
    mem = report.memory
    if mem is None:
        out.print(f"{report.vm}'s memory: NOT CHECKED: {report.memory_error}",
                  markup=False, highlight=False)
    else:
        out.print(f"{report.vm}'s memory: {mem.sweeps} sweeps of {mem.pages} pages, "
                  f"{mem.lost} writes lost, {mem.stray} stray")
        if not mem.ok:
            out.print(mem.detail, markup=False, highlight=False)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    return 0 if report.ok else 1


def cmd_server_restart(args: argparse.Namespace, sd: StateDir) -> int:
    with sd:
        moved = cluster.restart_server(sd, args.host)
    out.print(f"{args.host}: new ivloop-server; re-plugged " + (", ".join(moved) or "no VM"))
    return 0


def cmd_restart(args: argparse.Namespace, sd: StateDir) -> int:
    with sd:
        cluster.restart_vm(sd, args.vm)
    out.print(f"{args.vm}: running again")
    return 0


COMMANDS = {"up": cmd_up, "status": cmd_status, "ssh": cmd_ssh, "down": cmd_down,
            "plug": cmd_plug, "unplug": cmd_plug, "migrate": cmd_migrate,
            "watch": cmd_watch, "demo": cmd_demo, "bench": cmd_bench, "soak": cmd_soak,
            "server-restart": cmd_server_restart, "restart": cmd_restart}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    sd = StateDir(args.state_dir)
    try:
        return COMMANDS[args.command](args, sd)
    except HarnessError as exc:
        lines = str(exc).splitlines() or [exc.__class__.__name__]
        err.print(f"harness: error: {lines[0]}", markup=False, highlight=False, soft_wrap=True)
        for line in lines[1:]:
            err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("harness: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
