"""The ``harness`` command: argument parsing and output over the library.

Each subcommand calls one module: :mod:`harness.cluster` (up, down, status,
plug, unplug, restart, server-restart), :mod:`harness.migrate`, or one of
:mod:`harness.experiments` (watch, demo, bench, soak); guests are reached
through :mod:`harness.lab.vms` and :mod:`harness.lab.guest`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from harness import __version__, cluster
from harness import migrate as migrate_mod
from harness.errors import (
    GuestError,
    HarnessError,
    IncompleteMigrationError,
    MigrationError,
    StateError,
)
from harness.experiments import bench as bench_mod
from harness.experiments import bench_report
from harness.experiments import demo as demo_mod
from harness.experiments import soak as soak_mod
from harness.experiments import watch as watch_mod
from harness.lab import accel as accel_mod
from harness.lab import topology as topology_mod
from harness.lab import vms
from harness.lab.state import StateDir, VMState, VMStatus

out = Console()
err = Console(stderr=True)
if not out.is_terminal:  # pipes and CI logs: do not squeeze tables into 80 columns
    out.width = 200


def _add_report_options(s: argparse.ArgumentParser) -> None:
    """--json and --json-out, meaning the same for every command with a report."""
    s.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (progress goes to stderr)")
    s.add_argument("--json-out", type=Path, default=None, metavar="PATH",
                   help="also write the JSON report to PATH")


STDIN_NOTE = ("\n\nStandard input, when it is a pipe or a file, becomes the command's "
              "(closed at its end, as ssh does); a terminal is not forwarded, except to the "
              "interactive shell that no command opens.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness",
        description="Boot ivloop VMs on simulated hosts, migrate them, check the path.",
        epilog="example:\n  harness up && harness status && harness down",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the harness version and exit")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="runtime state directory (default $IVLOOP_STATE_DIR or /run/ivloop)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log output (-v: info, -vv: debug, including paramiko)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, example: str, more: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_,
                              description=help_[:1].upper() + help_[1:] + "." + more,
                              epilog="example:\n  " + example,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def vm_arg(s: argparse.ArgumentParser) -> None:
        s.add_argument("vm", help="VM name, as in the topology (e.g. vm1)")

    s = add("up", "create the hosts and boot the VMs", "harness up --topology my.toml")
    s.add_argument("--topology", type=Path, default=None, help="topology TOML file")
    s.add_argument("--accel", choices=["kvm", "tcg"], default=None,
                   help="force the accelerator (default: detect)")
    s.add_argument("--no-ivshmem", action="store_true",
                   help="boot without ivloop servers and ivshmem devices")
    s.add_argument("--no-driver", action="store_true",
                   help="do not load ivloop.ko in the guests (IP on eth0)")
    s.add_argument("--qemu", default=None, metavar="PATH",
                   help="QEMU binary every VM runs (default $IVLOOP_QEMU, else "
                        "qemu-system-x86_64 from PATH; e.g. build/qemu-10/bin/"
                        "qemu-system-x86_64 after 'make qemu-10'); later commands reuse it")
    s.add_argument("--backend", choices=["qemu", "libvirt"], default="qemu",
                   help="who runs the VMs: QEMU started by the harness (default), or a real "
                        "libvirtd per simulated host with the VMs as libvirt domains "
                        "(plug, unplug and migrate then go through ivloop-libvirt)")

    s = add("status", "show hosts, VMs and their network path", "harness status --json")
    s.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
    s.add_argument("--no-probe", action="store_true", help="do not ask the guests")

    s = add("ssh", "run a shell command in a VM, or open a shell; like ssh, the words "
                   "after -- are joined with spaces into one command line for the "
                   "guest's shell (use 'exec' to keep argument boundaries)",
            "harness ssh vm1 -- 'ip -s link show ivl0 | head -n 4'", STDIN_NOTE)
    vm_arg(s)
    s.add_argument("cmd", nargs=argparse.REMAINDER,
                   help="-- COMMAND [ARGS...], joined with spaces as ssh does")

    s = add("exec", "run a program in a VM with its arguments kept apart (each is "
                    "shell-quoted), like kubectl exec; stdout and stderr stream "
                    "separately and the exit status is the program's",
            "harness exec vm1 -- sh -c 'echo one; echo two >&2'\n"
            "  head -c 1M /dev/urandom | tee /tmp/x | harness exec vm1 -- sha256sum",
            STDIN_NOTE)
    vm_arg(s)
    s.add_argument("cmd", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")

    add("down", "stop and remove everything the harness started", "harness down")

    s = add("migrate", "live-migrate a VM to another host", "harness migrate vm2 --to B")
    s.add_argument("vm", nargs="?", default=None,
                   help="VM to move (default: the one VM marked mobile on --from)")
    s.add_argument("--from", dest="source", default=None, metavar="HOST",
                   help="host the VM runs on (default: the one the state records; "
                        "checked when given)")
    s.add_argument("--to", dest="dest", required=True, metavar="HOST", help="destination host")
    s.add_argument("--timeout", type=_positive, default=120.0, help="seconds (default 120)")
    s.add_argument("--max-bandwidth", type=_positive_int, default=None, metavar="MIB",
                   help="cap the migration stream (MiB/s)")
    s.add_argument("--qemu", default=None, metavar="PATH",
                   help="QEMU for the destination; must be the one the VM runs (the "
                        "default: the one 'harness up' chose)")
    _add_report_options(s)

    s = add("watch", "run a TCP stream and a 20 ms ping; plot the path",
            "harness watch vm1 vm2 --duration 20 --out build/watch")
    s.add_argument("src", help="VM that sends (must not migrate meanwhile)")
    s.add_argument("dst", help="VM that receives")
    s.add_argument("--duration", type=_positive, default=30.0, help="seconds (default 30)")
    s.add_argument("--out", type=Path, default=None, help="directory for timeline.json/.png")

    s = add("demo", "the whole story: up, shared path, migrate there and back",
            "harness demo --duration 40 --out build/demo")
    s.add_argument("--duration", type=_positive, default=40.0,
                   help="seconds of traffic around the migrations (default 40)")
    s.add_argument("--out", type=Path, default=Path("build/demo"),
                   help="directory for the timeline (default build/demo)")
    s.add_argument("--accel", choices=["kvm", "tcg"], default=None,
                   help="force the accelerator (default: detect)")

    s = add("bench", "benchmark shm vs forced lower path vs the wire, and the native ring",
            "harness bench --quick --out build/bench")
    s.add_argument("--reps", type=_positive_int, default=None,
                   help="interleaved repetitions per path and workload (default 5; with "
                        "--quick 1)")
    s.add_argument("--quick", action="store_true",
                   help="1 s samples, 1 repetition unless --reps, fewer workloads (a smoke "
                        "run)")
    s.add_argument("--out", type=Path, default=None,
                   help="directory for bench.json, bench.md and the PNGs (default "
                        "bench-results; with --report-only: the JSON's directory)")
    s.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                   help="do not measure: validate JSON and write the report from it")
    s.add_argument("--no-native", action="store_true", help="skip the native ring benchmark")
    s.add_argument("--native-json", type=Path, default=None, metavar="JSON",
                   help="use these bench-native results instead of running it with the VMs up")
    s.add_argument("--suite", choices=bench_report.SUITES, default=bench_report.CLASSIC_SUITE,
                   help="paths: shm vs lower vs wire (default); smp: 2-vCPU guests, 1 vs 4 "
                        "streams, ivl0 vs no driver across hosts, a mixture (needs "
                        "harness/topologies/bench-smp.toml up; no native benchmark); pairs: "
                        "1, 2 and 4 co-resident pairs at once, aggregate shm vs lower (needs "
                        "harness/topologies/many.toml up; no native benchmark)")

    s = add("soak", "migrate a VM back and forth N times with traffic running; count "
                    "lost connections and kernel warnings",
            "harness soak vm2 --to B --count 20 --json-out build/soak.json")
    s.add_argument("vm", nargs="?", default=None,
                   help="VM to move (default: the one VM marked mobile, on --from if given)")
    s.add_argument("--from", dest="source", default=None, metavar="HOST",
                   help="host the VM starts on and the traffic comes from (default: the "
                        "one the state records; checked when given)")
    s.add_argument("--to", dest="dest", required=True, metavar="HOST",
                   help="the other host of each round trip")
    s.add_argument("--count", type=_positive_int, default=20, help="moves (default 20)")
    s.add_argument("--peer", default=None,
                   help="VM on --from that sends the traffic (default: the first one)")
    s.add_argument("--window", type=_positive, default=25.0,
                   help="seconds of traffic around each move (default 25)")
    _add_report_options(s)

    s = add("server-restart", "start a new ivloop-server for a host and re-plug its VMs",
            "harness server-restart A; harness server-restart --hand-over A")
    s.add_argument("host", help="host name, as in the topology (e.g. A)")
    s.add_argument("--hand-over", action="store_true",
                   help="the new server takes the running one's region and members over "
                        "(what an ivloop-host upgrade does): no re-plug, guests stay on "
                        "shared memory")

    s = add("restart", "boot a VM again (e.g. after its QEMU died)", "harness restart vm2")
    vm_arg(s)

    for name, help_ in (("plug", "hot-add a VM's ivshmem device (also what finishes a "
                                 "migration reported incomplete)"),
                        ("unplug", "hot-remove a VM's ivshmem device")):
        s = add(name, help_, f"harness {name} vm2")
        vm_arg(s)
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
                           driver=not args.no_driver, qemu_path=args.qemu,
                           backend=args.backend)
    out.print(f"[green]up[/]: {len(state.vms)} VMs on {len(state.hosts)} hosts "
              f"(accelerator {state.accel}, {escape(state.qemu_banner)}; data NICs "
              f"{accel_mod.lower_path(state.accel, state.vhost_net)}); state in {sd.path}")
    return 0


def cmd_status(args: argparse.Namespace, sd: StateDir) -> int:
    # Read-only: no lock, so it works while a migration or a bench holds it.
    rows = cluster.status(sd, probe=not args.no_probe)
    if args.json:
        sys.stdout.write(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        return 0
    table = Table(title=f"ivloop topology ({sd.path})")
    for col in ("host", "VM", "IP", "MAC", "accel", "QEMU", "pid", "status", "ivshmem", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.host, r.vm, r.ip, r.mac, r.accel, r.qemu, str(r.pid or "-"), r.status,
                      r.ivshmem, r.path)
    out.print(table)
    for path in sorted({r.qemu_path for r in rows if r.qemu_path != "-"}):
        out.print(f"QEMU {path} runs {', '.join(r.vm for r in rows if r.qemu_path == path)}",
                  markup=False, highlight=False)
    return 0


def _remote_command(args: argparse.Namespace) -> list[str]:
    return args.cmd[1:] if args.cmd[:1] == ["--"] else list(args.cmd)


def cmd_ssh(args: argparse.Namespace, sd: StateDir) -> int:
    """Like ssh: the words are joined with spaces into one shell command line."""
    words = _remote_command(args)
    return _run_in_guest(args.vm, sd, " ".join(words) if words else None)


def cmd_exec(args: argparse.Namespace, sd: StateDir) -> int:
    """Like kubectl exec: each argument reaches the program as it was given."""
    argv = _remote_command(args)
    if not argv:
        raise StateError("exec needs a program: harness exec VM -- PROGRAM [ARGS...]")
    return _run_in_guest(args.vm, sd, shlex.join(argv))


def _stdin_to_forward() -> BinaryIO | None:
    """Local stdin when it is a pipe or a file, which ssh and exec forward;
    None for a terminal (the command reads no input from it, as before) or
    when there is no real stdin (closed, or a test's stand-in)."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    if os.isatty(fd):
        return None
    return sys.stdin.buffer


def _why_lost(sd: StateDir, was: VMState, was_alive: bool) -> str:
    """What the state says became of the QEMU a lost SSH session went through.

    The management NIC is that QEMU's user-mode network: its connections do
    not move with the guest, so a migration ends every session to the VM
    while the commands keep running in the guest."""
    try:
        now = sd.load().vms.get(was.name)
    except HarnessError:
        return ""  # the loss is the news; the state is only a hint
    if now is not None and (now.generation != was.generation or now.host != was.host):
        return (f"; {was.name} migrated to host {now.host} meanwhile, which ends SSH "
                f"sessions to it (the command may still be running there)")
    if now is not None and now.status == VMStatus.MIGRATING:
        return f"; {was.name} is migrating, which ends SSH sessions to it"
    if was_alive and was.proc is not None and not was.proc.alive():
        return f"; {was.name}'s QEMU is gone ('harness status' shows the VM)"
    return ""


def _run_in_guest(vm: str, sd: StateDir, command: str | None) -> int:
    """Run *command* (None: a shell) in *vm*, streaming its output; its exit status.

    Local stdin, when it is not a terminal, becomes the command's stdin (and
    its end closes that, as with ssh), so `cat f | harness exec vm1 -- sha256sum`
    works.  Read-only: takes no lock.  A lost connection is one line and
    status 255, as with ssh."""
    state = sd.load()
    stdin = _stdin_to_forward()
    with vms.guest(sd, state, vm) as g:
        was = state.vms[vm]
        was_alive = was.proc is not None and was.proc.alive()
        try:
            if command is None and stdin is None:
                return g.shell()
            if command is None:
                command = "exec sh"  # as ssh runs the login shell on piped input
            if stdin is None:
                return g.stream(command, sys.stdout, sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            return g.pipe(command, stdin, sys.stdout.buffer, sys.stderr.buffer)
        except GuestError as exc:
            if exc.exitcode is not None:
                raise
            sys.stdout.flush()
            err.print(f"harness: {vm}: {exc.output}{_why_lost(sd, was, was_alive)}",
                      markup=False, highlight=False, soft_wrap=True)
            return 255
        except BrokenPipeError:
            # Our reader went away (`| head`): stop quietly, as ssh killed by
            # SIGPIPE does; point stdout at /dev/null so exit's flush is silent.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE


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


def _resolve_source(sd: StateDir, vm: str | None, source: str | None) -> tuple[str | None, str]:
    """The VM and its host for migrate/soak: --from defaults to where the state
    records the VM; when given, it must agree with the state."""
    if source is not None and vm is None:
        return None, source  # migrate picks the one mobile VM on it
    state = sd.load()
    topo = vms.topology_of(state)
    if vm is None:
        mobile = [v.name for v in topo.vms.values() if v.mobile and v.name in state.vms]
        if len(mobile) != 1:
            raise StateError(f"name the VM to move (or --from HOST): {len(mobile)} VMs are "
                             "marked mobile" + (f" ({', '.join(mobile)})" if mobile else ""))
        vm = mobile[0]
    topo.vm(vm)  # unknown VM -> TopologyError
    if source is not None:
        topo.host(source)  # unknown host -> TopologyError
    vs = state.vms.get(vm)
    if vs is None:
        raise StateError(f"VM {vm} is not recorded in {sd.path}; give --from HOST")
    if source is not None and source != vs.host:
        raise StateError(f"VM {vm} runs on host {vs.host}, not {source}; "
                         f"drop --from or give --from {vs.host}")
    return vm, vs.host


def _write_json(args: argparse.Namespace, data: dict[str, object]) -> None:
    text = json.dumps(data, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    if args.json:
        sys.stdout.write(text + "\n")


def cmd_migrate(args: argparse.Namespace, sd: StateDir) -> int:
    args.vm, args.source = _resolve_source(sd, args.vm, args.source)
    human = err if args.json else out  # --json: stdout carries only the JSON
    with sd, human.status("migrating...") as spinner:
        def progress(phase: str, info: dict[str, object]) -> None:
            t = float(info.get("t", 0.0))  # type: ignore[arg-type]
            if phase == "transfer":
                spinner.update(f"[{t:5.1f} s] migrating: {info['status']}, "
                               f"{float(info['mib']):.0f} MiB sent")  # type: ignore[arg-type]
            elif phase != "migration":
                human.print(f"[{t:5.1f} s] {phase}")
        try:
            report = migrate_mod.migrate(sd, args.vm, args.source, args.dest,
                                         timeout=args.timeout,
                                         max_bandwidth_mib=args.max_bandwidth,
                                         progress=progress, qemu_path=args.qemu)
        except MigrationError as exc:
            if exc.report is not None:
                _write_json(args, exc.report.as_dict())
            raise
    table = Table(title=f"{report.vm}: {report.source} -> {report.destination} "
                        f"({report.backend})")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for step, seconds in report.rows():
        table.add_row(step, seconds)
    human.print(table)
    _write_json(args, report.as_dict())
    return 0


def _print_timeline(tl: watch_mod.Timeline) -> None:
    pb = tl.path_bytes()
    table = Table(title=f"{tl.source} -> {tl.destination}")
    table.add_column("what")
    table.add_column("value")
    table.add_row("TCP stream", "survived" if tl.iperf_ok else f"FAILED {tl.stream_failure()}")
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
                sd, reps=args.reps or (1 if args.quick else 5), quick=args.quick,
                out_dir=args.out or Path("bench-results"), with_native=not args.no_native,
                native_json=args.native_json, suite=args.suite,
                say=lambda text: out.print(text, markup=False, highlight=False))
    written = bench_report.write(json_path, args.out)
    out.print(written[0].read_text(), markup=False, highlight=False)
    out.print("wrote " + ", ".join(str(p) for p in [json_path, *written]))
    return 0


def cmd_soak(args: argparse.Namespace, sd: StateDir) -> int:
    vm, args.source = _resolve_source(sd, args.vm, args.source)
    if vm is None:  # --from HOST and no VM: the one mobile VM there
        state = sd.load()
        vms.topology_of(state).host(args.source)  # unknown host -> TopologyError
        vm = migrate_mod.pick_vm(state, args.source)
    human = err if args.json else out  # --json: stdout carries only the JSON
    report = soak_mod.run(sd, vm, args.source, args.dest, args.count, peer=args.peer,
                          window=args.window,
                          say=lambda text: human.print(text, markup=False, highlight=False))
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
    human.print(table)
    warned = {vm: lines for vm, lines in report.kernel_warnings.items() if lines}
    human.print(f"lost connections: {report.lost_connections}, failed moves: "
              f"{report.failed_moves}, kernel warnings: "
              f"{sum(len(v) for v in warned.values())}")
    for vm_name, lines in warned.items():
        for line in lines[:5]:
            human.print(f"  {vm_name}: {line}", markup=False, highlight=False)
    mem = report.memory
    if mem is None:
        human.print(f"{report.vm}'s memory: NOT CHECKED: {report.memory_error}",
                  markup=False, highlight=False)
    else:
        human.print(f"{report.vm}'s memory: {mem.sweeps} sweeps of {mem.pages} pages, "
                  f"{mem.lost} writes lost, {mem.stray} stray")
        if not mem.ok:
            human.print(mem.detail, markup=False, highlight=False)
    _write_json(args, report.as_dict())
    return 0 if report.ok else 1


def cmd_server_restart(args: argparse.Namespace, sd: StateDir) -> int:
    if args.hand_over:
        with sd:
            old, new = cluster.hand_over_server(sd, args.host)
        out.print(f"{args.host}: ivloop-server {old} handed its region and members over to {new}")
        return 0
    with sd:
        moved = cluster.restart_server(sd, args.host)
    out.print(f"{args.host}: new ivloop-server; re-plugged " + (", ".join(moved) or "no VM"))
    return 0


def cmd_restart(args: argparse.Namespace, sd: StateDir) -> int:
    with sd:
        cluster.restart_vm(sd, args.vm)
    out.print(f"{args.vm}: running again")
    return 0


COMMANDS = {"up": cmd_up, "status": cmd_status, "ssh": cmd_ssh, "exec": cmd_exec,
            "down": cmd_down,
            "plug": cmd_plug, "unplug": cmd_plug, "migrate": cmd_migrate,
            "watch": cmd_watch, "demo": cmd_demo, "bench": cmd_bench, "soak": cmd_soak,
            "server-restart": cmd_server_restart, "restart": cmd_restart}


#: ``harness migrate``: the VM moved but runs without shared memory (as
#: ``ivloop-libvirt migrate`` says it); every other error is 1.
EXIT_INCOMPLETE = 3


def _print_error(exc: HarnessError) -> None:
    lines = str(exc).splitlines() or [exc.__class__.__name__]
    err.print(f"harness: error: {lines[0]}", markup=False, highlight=False, soft_wrap=True)
    for line in lines[1:]:
        err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    sd = StateDir(args.state_dir)
    try:
        return COMMANDS[args.command](args, sd)
    except IncompleteMigrationError as exc:
        _print_error(exc)
        return EXIT_INCOMPLETE
    except HarnessError as exc:
        _print_error(exc)
        return 1
    except KeyboardInterrupt:
        err.print("harness: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
