"""Continuous traffic between two VMs, with a timeline of which path carried it.

``Watch`` starts an iperf3 TCP stream and a 20 ms ping from the source VM
(which must stay put) to the destination, samples the source driver's
per-path counters every half second, and on exit collects everything into a
:class:`Timeline`, written as JSON and as a PNG with the events marked.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

from harness.errors import GuestError, HarnessError
from harness.lab import paths, vms
from harness.lab.guest import Guest
from harness.lab.state import StateDir

log = logging.getLogger(__name__)

PING_INTERVAL = 0.02
SAMPLE_INTERVAL = 0.5
#: Seconds the iperf3 client gets past the watch to end by itself.
CLIENT_GRACE = 15.0
#: iperf3's error for a client ended by SIGINT (3.x).
IPERF_INTERRUPTED = "interrupt - the client has terminated"
#: glibc's last words when iperf3 dies of the SIGINT the watch sent it: its
#: handler longjmp()s out of whatever it interrupted (esnet/iperf#257 shows
#: the longjmp), malloc included, and allocates again to print its report
#: ("malloc(): ... assertion failure in sysmalloc", seen once in 2026-12).
_IPERF_ABORT = re.compile(r"malloc|free\(\)|corrupted|assertion")
#: Bytes the source must have sent in the last sample before the end for a
#: stream to count as alive then (a 20 ms ping alone sends about 2.5 KB).
_ALIVE_BYTES = 100_000
_PING_RE = re.compile(r"seq=(\d+) .*time=([\d.]+) ms")
#: The guests' TCP MIB counters a watch reports the change of, on both ends:
#: when a stream dies they say which side reset it and why (an application
#: that closed with data unread, memory pressure, a timeout, a bad segment).
TCP_COUNTERS = ("Tcp:OutRsts", "Tcp:EstabResets", "Tcp:InErrs", "Tcp:RetransSegs",
                "TcpExt:TCPAbortOnData", "TcpExt:TCPAbortOnClose",
                "TcpExt:TCPAbortOnMemory", "TcpExt:TCPAbortOnTimeout",
                "TcpExt:TCPAbortOnLinger", "TcpExt:TCPAbortFailed",
                "TcpExt:TCPChallengeACK", "TcpExt:TCPSYNChallenge",
                "TcpExt:TCPRcvQDrop", "TcpExt:TCPOFODrop", "TcpExt:PruneCalled")
#: Read at both ends when the traffic starts and stops: the guest's clock
#: (uptime), then the TCP MIBs.
_SNAPSHOT_FILES = "/proc/uptime /proc/net/snmp /proc/net/netstat"
#: Where images/init's `iperf3 -s` logs; a Debian guest's iperf3.service logs
#: to the journal.
_SERVER_LOG = ("tail -n 25 /tmp/iperf3-server.log 2>/dev/null || "
               "journalctl -u iperf3 -n 25 --no-pager 2>/dev/null; true")


@dataclass
class Sample:
    t: float
    shm_tx_bytes: int
    lower_tx_bytes: int
    shm_rx_bytes: int
    lower_rx_bytes: int


@dataclass
class Timeline:
    source: str
    destination: str
    duration: float
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    iperf_intervals: list[tuple[float, float, float]] = field(default_factory=list)
    iperf_ok: bool = False
    iperf_error: str = ""
    iperf_bytes: int = 0
    ping_sent: int = 0
    ping_lost: int = 0
    lost_at: list[float] = field(default_factory=list)
    rtt_ms: list[tuple[float, float]] = field(default_factory=list)
    #: The end of iperf3's last complete interval: when a failed stream died.
    iperf_last_s: float = 0.0
    #: The watch ended the stream before its duration, as end_after() asked.
    iperf_ended_early: bool = False
    #: iperf3 died of that interrupt (its own defect: see _IPERF_ABORT) while
    #: the stream was moving; its last words.  The stream counts as ended early.
    iperf_aborted: str = ""
    #: Per VM (source, destination), how much each of TCP_COUNTERS moved.
    tcp: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Per VM, how many seconds more its clock advanced than the host's over
    #: the watch: a migrated guest lags by its downtime (a few -0.1 s); a
    #: jump forward of seconds fires the timers of whatever runs in it.
    clock_skew_s: dict[str, float] = field(default_factory=dict)
    #: The end of the destination's iperf3 server log, read when the stream
    #: failed: the server's side of the story.
    server_log: str = ""

    def stream_failure(self) -> str:
        """Why the stream failed, when, and what each end's TCP counted."""
        if self.iperf_ok:
            return ""
        skew = ", ".join(f"{vm} {s:+.2f} s" for vm, s in self.clock_skew_s.items())
        text = (f"{self.iperf_error or 'no data'} (after {self.iperf_last_s:.1f} s of "
                f"{self.duration:g}; TCP counters {self.tcp_summary() or 'not read'}; "
                f"guest clocks against the host's {skew or 'not read'})")
        if self.server_log:
            text += f"\n{self.destination}'s iperf3 server log ends:\n{self.server_log}"
        return text

    def tcp_summary(self) -> str:
        """The TCP counters that moved, e.g. for an assertion message."""
        return "; ".join(f"{vm}: " + (", ".join(f"{k} +{v}" for k, v in c.items() if v)
                                      or "no change")
                         for vm, c in self.tcp.items())

    def path_bytes(self) -> dict[str, int]:
        if len(self.samples) < 2:
            return {"shm": 0, "lower": 0}
        first, last = self.samples[0], self.samples[-1]
        return {"shm": last.shm_tx_bytes - first.shm_tx_bytes,
                "lower": last.lower_tx_bytes - first.lower_tx_bytes}

    def path_at(self) -> list[tuple[float, str, float]]:
        """(t, dominant path, Mbit/s on the wire from counters) per sample interval."""
        out = []
        for a, b in zip(self.samples, self.samples[1:], strict=False):
            dt = b.t - a.t
            shm = b.shm_tx_bytes - a.shm_tx_bytes
            lower = b.lower_tx_bytes - a.lower_tx_bytes
            path = "shm" if shm > lower else ("lower" if lower > 0 else "idle")
            out.append((b.t, path, (shm + lower) * 8 / dt / 1e6 if dt > 0 else 0.0))
        return out

    def to_json(self) -> str:
        data = asdict(self)
        data["path_bytes"] = self.path_bytes()
        data["path_at"] = self.path_at()
        return json.dumps(data, indent=2)


def parse_mib(text: str) -> dict[str, int]:
    """``Section:Name`` -> value from /proc/net/snmp or /proc/net/netstat
    text, whose sections are a header line of names then a line of values."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for head, vals in itertools.pairwise(lines):
        hs, vs = head.split(), vals.split()
        if len(hs) < 2 or len(hs) != len(vs) or hs[0] != vs[0] or not hs[0].endswith(":"):
            continue
        if hs[1].lstrip("-").isdigit() or not all(v.lstrip("-").isdigit() for v in vs[1:]):
            continue
        for name, value in zip(hs[1:], vs[1:], strict=False):
            out[hs[0] + name] = int(value)
    return out


@dataclass(frozen=True)
class _Snapshot:
    host_s: float  # time.monotonic() when it was read
    uptime_s: float | None
    mib: dict[str, int]


def parse_snapshot(text: str, host_s: float) -> _Snapshot:
    """/proc/uptime then the MIB files, as `cat _SNAPSHOT_FILES` prints them."""
    first = text.split(None, 1)
    try:
        uptime: float | None = float(first[0]) if first else None
    except ValueError:
        uptime = None
    mib = parse_mib(text)
    return _Snapshot(host_s, uptime, {k: mib[k] for k in TCP_COUNTERS if k in mib})


def _running(pid: int | str, comm: str) -> str:
    """A guest shell test: *pid* is still a live (not zombie) *comm* process,
    so a PID the kernel has since given to another process is left alone."""
    return (f'[ "$(cat /proc/{pid}/comm 2>/dev/null)" = {comm} ] && '
            f"! grep -q '^State:.*Z' /proc/{pid}/status 2>/dev/null")


class Watch:
    """Traffic from *src* to *dst* for at most *duration* seconds."""

    def __init__(self, sd: StateDir, src: str, dst: str, duration: float = 60,
                 out_dir: Path | None = None) -> None:
        state = sd.load()
        topo = vms.topology_of(state)
        topo.vm(src)
        self.dst_ip = topo.vm(dst).ip
        if src == dst:
            raise HarnessError("watch needs two different VMs")
        self.sd = sd
        self.src = src
        self.dst = dst
        self.duration = duration
        self.out_dir = out_dir or sd.file("watch")
        self.timeline = Timeline(src, dst, duration)
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._guest: Guest | None = None
        self._sampler_guest: Guest | None = None
        #: The guest PIDs of the iperf3 client and the ping this watch started.
        self._pids: dict[str, int] = {}
        #: Each end's clock and TCP_COUNTERS when the traffic started.
        self._snap0: dict[str, _Snapshot] = {}
        #: end_after() asked for the end: interrupt the client, as planned.
        self._end_now = False
        self.t0 = 0.0

    def mark(self, label: str) -> None:
        self.timeline.events.append((round(self.now(), 3), label))

    def progress(self, phase: str, info: dict[str, object]) -> None:
        """A migrate() progress callback: phases become timeline events."""
        if phase not in ("transfer", "migration"):
            self.mark(phase)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def __enter__(self) -> Watch:
        state = self.sd.load()
        self._guest = vms.guest(self.sd, state, self.src)
        self._sampler_guest = vms.guest(self.sd, state, self.src)
        g = self._guest
        # Stop only a previous watch's own client and ping (their PIDs are on
        # record): the guest's `iperf3 -s` serves other tests and users.
        g.run(" ; ".join(f"p=$(cat /tmp/watch-{n}.pid 2>/dev/null) && "
                         f"{{ {_running('$p', n)} ; }} && kill -INT $p"
                         for n in ("iperf3", "ping")) + " ; rm -f /tmp/watch-*; true")
        secs = int(self.duration) + 1
        count = int(self.duration / PING_INTERVAL)
        out = g.run(f"iperf3 -c {self.dst_ip} -t {secs} -J > /tmp/watch-iperf.json 2>&1 "
                    "</dev/null & echo $! > /tmp/watch-iperf3.pid ; "
                    f"ping -i {PING_INTERVAL} -c {count} -W 1 {self.dst_ip} > /tmp/watch-ping.log "
                    "2>&1 </dev/null & echo $! > /tmp/watch-ping.pid ; "
                    "cat /tmp/watch-iperf3.pid /tmp/watch-ping.pid")
        pids = out.split()
        if len(pids) != 2 or not all(p.isdigit() for p in pids):
            raise GuestError(self.src, "start iperf3 and ping", None,
                             f"expected two PIDs, got {out!r}")
        self._pids = {"iperf3": int(pids[0]), "ping": int(pids[1])}
        # Time 0 is the client's start, as in its own report: the snapshots
        # (a new SSH session to the destination) take a second or more.
        self.t0 = time.monotonic()
        self.mark("traffic started")
        self._snap0 = {vm: snap for vm in (self.src, self.dst)
                       if (snap := self._snapshot(vm, g if vm == self.src else None))}
        self._sampler = threading.Thread(target=self._sample, name="watch-sampler", daemon=True)
        self._sampler.start()
        return self

    def _on(self, vm: str, g: Guest | None, command: str) -> str | None:
        """*command*'s output on *vm*, None (and a warning) when it cannot
        run.  Without *g*, over a connection to wherever the state says *vm*
        runs now."""
        try:
            if g is not None:
                return g.run(command, timeout=10)
            with vms.guest(self.sd, self.sd.load(), vm) as other:
                return other.run(command, timeout=10)
        except HarnessError as exc:
            log.warning("%s: %s failed: %s", vm, command.split(maxsplit=1)[0], exc)
            return None

    def _snapshot(self, vm: str, g: Guest | None) -> _Snapshot | None:
        text = self._on(vm, g, f"cat {_SNAPSHOT_FILES}")
        return None if text is None else parse_snapshot(text, time.monotonic())

    def _sample(self) -> None:
        assert self._sampler_guest is not None
        while not self._stop.is_set():
            try:
                c = paths.counters(self._sampler_guest)
            except HarnessError as exc:
                log.warning("counter sample failed: %s", exc)
            else:
                self.timeline.samples.append(Sample(
                    t=round(self.now(), 3), shm_tx_bytes=c.get("shm_tx_bytes", 0),
                    lower_tx_bytes=c.get("lower_tx_bytes", 0),
                    shm_rx_bytes=c.get("shm_rx_bytes", 0),
                    lower_rx_bytes=c.get("lower_rx_bytes", 0)))  # fmt: skip
            self._stop.wait(SAMPLE_INTERVAL)

    def wait(self) -> None:
        """Let the traffic run to its end."""
        left = self.duration - self.now()
        if left > 0:
            time.sleep(left)

    def end_after(self, seconds: float) -> None:
        """Let the traffic run *seconds* more (never past its duration), then
        end it: the watch interrupts its own iperf3 client, which is not a
        failure.  For traffic that must outlast steps of unknown length
        (migrations on a loaded machine): a generous duration, then this."""
        time.sleep(max(0.0, min(seconds, self.duration - self.now())))
        self._end_now = True

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._sampler:
            self._sampler.join(timeout=15)
        self.mark("traffic stopped")
        g = self._guest
        try:
            if g is not None:
                self._collect(g)
        finally:
            for guest in (self._guest, self._sampler_guest):
                if guest is not None:
                    guest.close()
        self.write()

    def _sent_in_last_sample(self) -> int:
        """Bytes the source sent (both paths) between its last two samples."""
        samples = self.timeline.samples
        if len(samples) < 2:
            return 0
        a, b = samples[-2], samples[-1]
        return (b.shm_tx_bytes - a.shm_tx_bytes) + (b.lower_tx_bytes - a.lower_tx_bytes)

    def _sent_over_the_watch(self) -> int:
        samples = self.timeline.samples
        if len(samples) < 2:
            return 0
        a, b = samples[0], samples[-1]
        return (b.shm_tx_bytes - a.shm_tx_bytes) + (b.lower_tx_bytes - a.lower_tx_bytes)

    def _collect(self, g: Guest) -> None:
        # iperf3 ends by itself; give it its last seconds, then stop both.  Only
        # the PIDs this watch started: the guest's own `iperf3 -s` must live.
        client = self._pids.get("iperf3")
        deadline = time.monotonic() + (0 if self._end_now else CLIENT_GRACE)
        interrupted = False
        while client is not None:
            code, _ = g.status(_running(client, "iperf3"), timeout=10)
            if code != 0:
                break
            if time.monotonic() >= deadline:
                interrupted = self._end_now
                break
            time.sleep(0.5)
        if self._pids:
            # then up to 10 s for them to write their reports and exit
            alive = " || ".join(f"{{ {_running(pid, name)} ; }}"
                                for name, pid in self._pids.items())
            g.status(" ; ".join(f"{{ {_running(pid, name)} ; }} && kill -INT {pid}"
                                for name, pid in self._pids.items())
                     + f" ; i=0; while [ $i -lt 50 ] && {{ {alive} ; }}; do sleep 0.2; "
                     "i=$((i+1)); done; true", timeout=20)
        tl = self.timeline
        raw = g.run("cat /tmp/watch-iperf.json", timeout=30)
        try:
            result = json.loads(raw)
        except ValueError:
            moved = self._sent_in_last_sample()
            if interrupted and _IPERF_ABORT.search(raw) and moved >= _ALIVE_BYTES:
                # Our SIGINT killed iperf3, not the path: the stream was
                # moving up to it.  What the source sent stands for it.
                log.warning("%s: iperf3 aborted on the watch's SIGINT (%s); the stream was "
                            "moving (%d bytes in the last sample)", self.src,
                            raw.strip()[-120:], moved)  # fmt: skip
                tl.iperf_aborted, tl.iperf_ended_early = raw.strip()[-200:], True
                tl.iperf_bytes = self._sent_over_the_watch()
                tl.iperf_ok = tl.iperf_bytes > 0
            else:
                tl.iperf_error = f"no JSON from iperf3: {raw[-200:]}"
        else:
            tl.iperf_error = str(result.get("error", ""))
            for interval in result.get("intervals", []):
                s = interval["sum"]
                tl.iperf_intervals.append((s["start"], s["end"], s["bits_per_second"] / 1e6))
            end = result.get("end", {})
            tl.iperf_bytes = int(end.get("sum_received", {}).get("bytes", 0))
            if interrupted and tl.iperf_error == IPERF_INTERRUPTED:
                # Ended by end_after(): the server never sent its count, so
                # what was sent stands for what arrived.
                tl.iperf_error, tl.iperf_ended_early = "", True
                tl.iperf_bytes = int(end.get("sum_sent", {}).get("bytes", 0))
            tl.iperf_ok = not tl.iperf_error and tl.iperf_bytes > 0
            tl.iperf_last_s = tl.iperf_intervals[-1][1] if tl.iperf_intervals else 0.0
        for vm, before in self._snap0.items():
            after = self._snapshot(vm, g if vm == self.src else None)
            if after is None:
                continue
            tl.tcp[vm] = {k: after.mib[k] - v for k, v in before.mib.items() if k in after.mib}
            if before.uptime_s is not None and after.uptime_s is not None:
                tl.clock_skew_s[vm] = round((after.uptime_s - before.uptime_s)
                                            - (after.host_s - before.host_s), 3)
        if not tl.iperf_ok:
            tl.server_log = (self._on(self.dst, None, _SERVER_LOG) or "").strip()
        self._parse_ping(g.run("cat /tmp/watch-ping.log", timeout=30))

    def _parse_ping(self, text: str) -> None:
        tl = self.timeline
        seen = {}
        for m in _PING_RE.finditer(text):
            seen[int(m.group(1))] = float(m.group(2))
        total = re.search(r"(\d+) packets transmitted", text)
        sent = int(total.group(1)) if total else (max(seen) + 1 if seen else 0)
        tl.ping_sent = sent
        tl.ping_lost = sent - len(seen)
        tl.lost_at = [round(seq * PING_INTERVAL, 3) for seq in range(sent) if seq not in seen]
        tl.rtt_ms = [(round(seq * PING_INTERVAL, 3), rtt) for seq, rtt in sorted(seen.items())]

    def write(self) -> tuple[Path, Path | None]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        js = self.out_dir / "timeline.json"
        js.write_text(self.timeline.to_json())
        png = self.out_dir / "timeline.png"
        try:
            plot(self.timeline, png)
        except (ImportError, ValueError, OSError) as exc:
            log.warning("could not draw %s: %s", png, exc)
            return js, None
        return js, png


def plot(tl: Timeline, path: Path) -> None:
    # Imported here: matplotlib costs a second of start-up that only plots need.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    pts = tl.path_at()
    for name, colour in (("shm", "tab:green"), ("lower", "tab:orange")):
        xs = [t for t, p, _ in pts if p == name]
        ys = [v for t, p, v in pts if p == name]
        ax.bar(xs, ys, width=-0.45, align="edge", color=colour, alpha=0.6,
               label=f"{name} path (driver counters)")
    if tl.iperf_intervals:
        ax.step([e for _, e, _ in tl.iperf_intervals], [v for _, _, v in tl.iperf_intervals],
                where="pre", color="black", lw=1, label="iperf3 goodput")
    ax.set_ylabel("Mbit/s")
    ax.set_title(f"{tl.source} -> {tl.destination}: TCP stream and 20 ms ping "
                 f"({tl.ping_lost}/{tl.ping_sent} pings lost, "
                 f"stream {'survived' if tl.iperf_ok else 'FAILED'})")
    if tl.rtt_ms:
        ax2.plot([t for t, _ in tl.rtt_ms], [r for _, r in tl.rtt_ms], ".", ms=2,
                 color="tab:blue", label="ping RTT")
    if tl.lost_at:
        ax2.plot(tl.lost_at, [0] * len(tl.lost_at), "x", color="red", label="lost ping")
    ax2.set_ylabel("RTT ms")
    ax2.set_xlabel("seconds")
    # Shade each migration (its first phase to "source stopped") and name it
    # once; the phases in between are thin lines, too close to label.
    start: tuple[float, str] | None = None
    for t, label in tl.events:
        if label.startswith("migrate "):
            start = (t, label.removeprefix("migrate "))
        elif label == "source stopped" and start is not None:
            for a in (ax, ax2):
                a.axvspan(start[0], t, color="grey", alpha=0.15, lw=0)
            ax.annotate(f"migration {start[1]}\n{t - start[0]:.1f} s", (start[0], 0),
                        xytext=(2, 4), textcoords="offset points", fontsize=8,
                        color="dimgrey", rotation=90, va="bottom")
            start = None
        elif label not in ("traffic started", "traffic stopped"):
            for a in (ax, ax2):
                a.axvline(t, color="grey", ls=":", lw=0.6)
    ax.legend(loc="lower right", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def require_ok(tl: Timeline) -> None:
    if not tl.iperf_ok:
        raise GuestError(tl.source, "iperf3 stream", None, tl.stream_failure())
