"""scripts/bench-webrtc: aiortc peers one worker sustains, and the memory of one headless-Chromium peer.

What it measures, one step at a time (two cores: never two runs at once):

1. aiortc peers per worker. For each N of `--peers` (default 5,10,15,20,25) a real headless harness run
   of the `webrtc-room` profile with only its `peers` group (`webrtc-peer`, one worker process, N
   users, the catalyst routine, the embedded lighthouse's default min 4 / max 8 connections). From the
   run's database, over the steady part (the ramp-up, the peers' start jitter and the stop left out):
     - the worker's CPU (`health.cpu_percent`: psutil, the process's CPU time, not wall time), mean
       and p90; its RSS (and PSS, sampled here) and RSS / N; its loop lag (p90 of each second's max);
     - the ticker: routine ticks per second per peer. The peers run `bench_webrtc:counted_catalyst`,
       the built-in catalyst routine plus one `metrics.counter` per tick (`--plain-routine`: the
       built-in, no tick rate);
     - `deliver position` p50/p95/p99 (merged from the steady seconds' histograms) and chat p95;
     - from the data points: packets received/s and sent/s per peer, connections per peer, and
       whether every one of the N peers published at its stats interval (no gap > 1.5 intervals).
   N is *sustained* when CPU p90 < `--cpu-limit` (80%), loop lag p90 <= `--max-lag-ms`, position
   delivery p95 <= `--max-deliver-ms`, the ticker runs at >= `--min-tick-ratio` of its rate, every peer
   publishes on time and the error rate is below 1%. The steps stop after the first N that fails
   (`--all-steps` runs them all); the result is the largest sustained N before it.
2. Memory per browser peer. For each K of `--browsers` (default 1,2,3) a run of the same profile with
   `--room-peers` aiortc peers (4) and K `webrtc-browser` users (one peer per headless Chromium); the
   `browser_memory_mb` gauge (PSS of the worker's Chromium process trees, ChromeDriver excluded) is
   read after the browsers settle (median of the readings with K browsers open). Reported: the first
   browser's PSS, the marginal PSS per additional browser (least-squares slope over K), and how many
   aiortc peers fit in the memory of one browser peer (marginal browser PSS / worker RSS per peer at
   the largest sustained N; also against the worker's marginal RSS per peer).

Contamination: another process on the machine skews CPU numbers. Before each step the machine must
be quiet (system CPU over 2 s below `--busy-limit` cores; waits up to `--max-wait` s); during each step
the CPU used by processes other than this benchmark's (system busy time minus the run's process tree)
is measured over the steady part, and a step with more than `--foreign-limit` cores of it is retried
(`--retries`, default 1) and flagged if it stays contaminated.

Prints rich tables and writes JSON (`--json FILE`, default harness-data/bench/webrtc-<time>.json).
Exit codes: 0 measured (whatever the result), 1 a measurement failed, 2 bad flags or missing tools.
Only 127.0.0.1 is contacted; every run is bounded by a timeout, runs in its own process group and is
stopped at the end (also on Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from bench import Sampler  # this folder: the process-tree sampler of scripts/bench

ROOT = Path(__file__).resolve().parents[2]
LIB = Path(__file__).resolve().parent
PYTHON = ROOT / ".venv" / "bin" / "python"
PROFILE = ROOT / "harness" / "profiles" / "webrtc-room.yaml"
MB = 1e6
"""Megabytes as `browser_memory_mb` counts them (10^6 bytes); every MB here is that."""
TICK_COUNTER = "bench ticks"
COUNTED_ROUTINE = "bench_webrtc:counted_catalyst"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


# -- the routine the aiortc peers run ---------------------------------------------------------------


def counted_catalyst(options: Any, peer: Any) -> Any:
    """The built-in catalyst routine, counting each tick in the counter `bench ticks` (a routine
    factory: `routines: {"bench_webrtc:counted_catalyst": 1}` with scripts/bench_lib on PYTHONPATH)."""
    from simulators.webrtc.routines import catalyst

    inner = catalyst(options)
    counter = peer.metrics.counter

    def routine(elapsed_ms: float, delta_ms: float, p: Any) -> None:
        counter(TICK_COUNTER)
        inner(elapsed_ms, delta_ms, p)

    return routine


counted_catalyst.factory = True  # type: ignore[attr-defined]


class BenchError(Exception):
    """A measurement could not be taken."""


# -- processes -------------------------------------------------------------------------------------


def kill_group(proc: subprocess.Popen[Any], grace: float = 5.0, first: int = signal.SIGTERM) -> None:
    """Stop a process started in its own session, and everything left in its process group."""
    for sig, wait in ((first, grace), (signal.SIGKILL, 2.0)):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.1)


def system_busy_s() -> float:
    """CPU seconds processes on the machine have used (all cores)."""
    ct = psutil.cpu_times()
    # user (guest included), nice and system: processes' time. irq and softirq (loopback traffic is
    # mostly softirq, not charged to the processes sending it) and steal (the hypervisor) are left out.
    return float(ct.user + ct.system + getattr(ct, "nice", 0.0))


class Probe(Sampler):
    """During one run: the CPU seconds of its process tree (and of this process), the machine's busy
    CPU seconds, and the memory (RSS, PSS) of the worker of one group."""

    def __init__(self, pid: int, db: Path, group: str, interval: float = 0.5) -> None:
        super().__init__(pid, interval)
        self.db = db
        self.group = group
        self.samples: list[tuple[float, float, float]] = []  # type: ignore[assignment]  # (t, cpu s, busy s)
        self.memory: list[tuple[float, int, int]] = []  # (epoch, worker rss, worker pss)
        self.worker_pid: int | None = None
        self._cpu: dict[int, float] = {}
        self._self = psutil.Process()
        self._next_memory = 0.0
        self._next_lookup = 0.0

    def _lookup_worker(self) -> None:
        if not self.db.exists():
            return
        with (
            contextlib.suppress(sqlite3.Error),
            contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1)) as conn,
        ):
            row = conn.execute(
                'SELECT pid FROM worker WHERE "group"=? AND ended_at IS NULL ORDER BY id DESC LIMIT 1',
                (self.group,),
            ).fetchone()
            if row and row[0]:
                self.worker_pid = int(row[0])

    def sample(self) -> None:
        now = time.time()
        for proc in self._tree():
            with contextlib.suppress(psutil.Error):
                cpu = proc.cpu_times()
                self._cpu[proc.pid] = cpu.user + cpu.system
        own = self._self.cpu_times()
        ours = sum(self._cpu.values()) + own.user + own.system
        self.samples.append((now, ours, system_busy_s()))
        if self.worker_pid is None and now >= self._next_lookup:
            self._next_lookup = now + 1.0
            self._lookup_worker()
        if self.worker_pid is not None and now >= self._next_memory:
            self._next_memory = now + 2.0
            with contextlib.suppress(psutil.Error):
                info = psutil.Process(self.worker_pid).memory_full_info()
                self.memory.append((now, int(info.rss), int(getattr(info, "pss", 0))))

    def _at(self, t: float) -> tuple[float, float, float] | None:
        return min(self.samples, key=lambda s: abs(s[0] - t), default=None)

    def cpu_cores(self, t0: float, t1: float) -> tuple[float | None, float | None]:
        """(ours, foreign) CPU in cores between two epoch times: this run's processes, everything else."""
        a, b = self._at(t0), self._at(t1)
        if a is None or b is None or b[0] - a[0] < 1.0:
            return None, None
        dt = b[0] - a[0]
        ours = (b[1] - a[1]) / dt
        return ours, max(0.0, (b[2] - a[2]) / dt - ours)

    def worker_memory(self, t0: float, t1: float) -> tuple[int | None, int | None]:
        """The worker's highest RSS and PSS sampled between two epoch times."""
        inside = [m for m in self.memory if t0 <= m[0] <= t1] or self.memory[-1:]
        if not inside:
            return None, None
        return max(m[1] for m in inside), max(m[2] for m in inside) or None


def busy_cores(seconds: float = 2.0) -> float:
    """Cores the machine keeps busy over `seconds` (this benchmark runs nothing meanwhile)."""
    b0, t0 = system_busy_s(), time.monotonic()
    time.sleep(seconds)
    return (system_busy_s() - b0) / max(1e-6, time.monotonic() - t0)


def busiest(seconds: float = 1.0, top: int = 3) -> str:
    """The processes using the most CPU over `seconds`, e.g. `pytest (123) 95%, chromium (456) 10%`."""
    before: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            cpu = proc.cpu_times()
            before[proc.pid] = (proc.info["name"] or "?", cpu.user + cpu.system)
    time.sleep(seconds)
    used = []
    for pid, (name, cpu0) in before.items():
        with contextlib.suppress(psutil.Error):
            cpu = psutil.Process(pid).cpu_times()
            used.append((cpu.user + cpu.system - cpu0, name, pid))
    used.sort(reverse=True)
    return (
        ", ".join(f"{name} ({pid}) {100 * u / seconds:.0f}%" for u, name, pid in used[:top] if u > 0) or "?"
    )


def wait_quiet(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    """Wait (up to `--max-wait` s) until the machine is quiet enough to measure CPU."""
    began = time.monotonic()
    busy = busy_cores()
    while busy > args.busy_limit and time.monotonic() - began < args.max_wait:
        say(f"[bench-webrtc]   machine busy ({busy:.2f} cores in use by others: {busiest()}); waiting")
        time.sleep(8)
        busy = busy_cores()
    return {
        "busy_cores_before": round(busy, 3),
        "waited_s": round(time.monotonic() - began - 2.0, 1),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "quiet": busy <= args.busy_limit,
    }


# -- one harness run --------------------------------------------------------------------------------


@dataclass
class RunResult:
    folder: Path
    code: int
    probe: Probe
    summary: dict[str, Any]
    wall_s: float

    @property
    def db(self) -> Path:
        return self.folder / "harness.db"


def base_profile() -> dict[str, Any]:
    return yaml.safe_load(PROFILE.read_text())


def run_harness(folder: Path, profile: dict[str, Any], group: str, timeout: float) -> RunResult:
    """One headless harness run of a generated profile; always leaves nothing running."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "profile.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    report = folder / "report"
    cmd = [
        str(PYTHON),
        "-m",
        "harness",
        "--log-level",
        "WARNING",
        "start",
        "--profile",
        str(path),
        "--headless",
        "--quiet",
        "--db",
        str(folder / "harness.db"),
        "--report-dir",
        str(report),
    ]
    pythonpath = os.pathsep.join(p for p in (str(LIB), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "HARNESS_DB": str(folder / "harness.db")}
    log = folder / "harness.log"
    with log.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True
        )
    probe = Probe(proc.pid, folder / "harness.db", group)
    probe.start()
    try:
        while proc.poll() is None:
            if time.monotonic() - started > timeout:
                raise BenchError(f"harness run timed out after {timeout:.0f}s (log: {log})")
            time.sleep(0.2)
    finally:
        probe.stop()
        kill_group(proc, grace=5.0)
    code = proc.returncode if proc.returncode is not None else -9
    summary_path = report / "summary.json"
    if code not in (0, 1) or not summary_path.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise BenchError(
            f"harness exited {code} ({'no' if not summary_path.exists() else 'with'} summary.json); "
            f"last lines of {log}:\n{tail}"
        )
    return RunResult(folder, code, probe, json.loads(summary_path.read_text()), time.monotonic() - started)


def rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql, params).fetchall()


def run_window(db: Path) -> tuple[str, float, float]:
    """(run id, epoch start, epoch of `stopping`) of the database's one run."""
    found = rows(db, "SELECT id, started_at, ended_at FROM run ORDER BY started_at DESC LIMIT 1")
    if not found:
        raise BenchError(f"no run in {db}")
    run_id, started, ended = found[0]
    stop = rows(db, "SELECT MIN(t) FROM event WHERE run_id=? AND type='stopping'", run_id)
    stopping = float(stop[0][0]) if stop and stop[0][0] is not None else float(ended)  # epoch, as `t`s are
    return str(run_id), float(started), stopping


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100.0 * len(ordered)) - 1)]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x (None with fewer than two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def latency(db: Path, run_id: str, group: str, name: str, t0: float, t1: float) -> dict[str, Any]:
    """Count, rate and p50/p95/p99 (ms) of one request name over the seconds [t0, t1)."""
    from harness.metrics import merge_into, new_histogram, percentiles_ms

    hist = new_histogram()
    count = failures = 0
    for c, f, encoded in rows(
        db,
        'SELECT count, failures, hist FROM window WHERE run_id=? AND "group"=? AND name=? AND t>=? AND t<?',
        run_id,
        group,
        name,
        math.ceil(t0),
        math.floor(t1),
    ):
        count += int(c)
        failures += int(f)
        merge_into(hist, encoded)
    pct = percentiles_ms(hist, (50, 95, 99))
    seconds = max(1, math.floor(t1) - math.ceil(t0))
    return {
        "count": count,
        "failures": failures,
        "per_s": count / seconds,
        "p50_ms": pct[50] if count else None,
        "p95_ms": pct[95] if count else None,
        "p99_ms": pct[99] if count else None,
    }


# -- step 1: aiortc peers per worker ----------------------------------------------------------------


@dataclass
class PeerStep:
    users: int
    sustained: bool = False
    failed: list[str] = field(default_factory=list)
    steady_s: float = 0.0
    cpu_mean: float | None = None
    cpu_p90: float | None = None
    cpu_max: float | None = None
    rss_bytes: int | None = None
    pss_bytes: int | None = None
    rss_per_peer_bytes: float | None = None
    lag_p90_ms: float | None = None
    lag_mean_ms: float | None = None
    dropped: int = 0
    tick_hz: float | None = None
    tick_target_hz: float = 60.0
    deliver_position: dict[str, Any] = field(default_factory=dict)
    deliver_chat_p95_ms: float | None = None
    summary_position_p95_ms: float | None = None
    received_per_peer_s: float | None = None
    sent_per_peer_s: float | None = None
    connections_per_peer: float | None = None
    publishing_peers: int = 0
    late_peers: int = 0
    max_gap_s: float | None = None
    requests: int = 0
    failures: int = 0
    error_rate: float = 0.0
    run_cpu_cores: float | None = None
    foreign_cores: float | None = None
    contaminated: bool = False
    attempts: int = 1
    quiet: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def peers_profile(args: argparse.Namespace, users: int) -> dict[str, Any]:
    profile = base_profile()
    profile["name"] = f"bench-webrtc-peers-{users}"
    profile["description"] = f"scripts/bench-webrtc: {users} aiortc peers in one worker"
    profile["duration"] = f"{args.duration:g}s"
    peers = profile["groups"]["peers"]
    peers["users"] = users
    peers["processes"] = 1
    if not args.plain_routine:
        peers.setdefault("options", {})["routines"] = {COUNTED_ROUTINE: 1}
    profile["groups"] = {"peers": peers}
    return profile


def measure_peers(args: argparse.Namespace, work: Path, users: int, attempt: int) -> PeerStep:
    profile = peers_profile(args, users)
    peers = profile["groups"]["peers"]
    options = peers.get("options", {})
    interval = _seconds(options.get("stats_interval", 2.0))
    spawn_rate = float(peers.get("spawn_rate") or users)
    jitter = _seconds(options.get("start_jitter", 3.0))
    step = PeerStep(users, tick_target_hz=float(options.get("tick_hz", 60.0)))
    run = run_harness(
        work / f"peers-{users}-{attempt}", profile, "peers", timeout=args.duration + args.warmup + 120
    )
    step.exit_code, step.wall_s = run.code, round(run.wall_s, 1)
    db = run.db
    run_id, started, stopping = run_window(db)
    warmup = math.ceil(users / spawn_rate) + jitter + args.warmup
    t0, t1 = started + warmup, stopping - 1.0
    if t1 - t0 < 2 * interval:
        raise BenchError(
            f"{users} peers: steady part of {t1 - t0:.1f}s is too short (duration {args.duration:g}s, "
            f"warm-up {warmup:.0f}s); raise --duration"
        )
    step.steady_s = round(t1 - t0, 1)

    health = rows(
        db,
        "SELECT cpu_percent, rss_bytes, loop_lag_max_ms, loop_lag_mean_ms, dropped FROM health "
        'WHERE run_id=? AND "group"=? AND t>=? AND t<=? ORDER BY t',
        run_id,
        "peers",
        t0,
        t1,
    )
    if not health:
        raise BenchError(f"{users} peers: no worker health in the steady part")
    cpu = [float(h[0]) for h in health]
    step.cpu_mean, step.cpu_p90, step.cpu_max = mean(cpu), percentile(cpu, 90), max(cpu)
    step.lag_p90_ms = percentile([float(h[2]) for h in health], 90)
    step.lag_mean_ms = mean([float(h[3]) for h in health])
    step.dropped = sum(int(h[4]) for h in health)
    step.rss_bytes = max(int(h[1]) for h in health)
    rss_probe, step.pss_bytes = run.probe.worker_memory(t0, t1)
    if not step.rss_bytes and rss_probe:
        step.rss_bytes = rss_probe
    step.rss_per_peer_bytes = step.rss_bytes / users if step.rss_bytes else None

    if not args.plain_routine:
        ticks = rows(
            db,
            'SELECT SUM(value) FROM metric WHERE run_id=? AND "group"=? AND name=? AND t>=? AND t<?',
            run_id,
            "peers",
            TICK_COUNTER,
            math.ceil(t0),
            math.floor(t1),
        )
        seconds = max(1, math.floor(t1) - math.ceil(t0))
        step.tick_hz = float(ticks[0][0] or 0.0) / seconds / users

    step.deliver_position = latency(db, run_id, "peers", "deliver position", t0, t1)
    step.deliver_chat_p95_ms = latency(db, run_id, "peers", "deliver chat", t0, t1)["p95_ms"]
    for endpoint in run.summary.get("endpoints") or []:
        if endpoint.get("group") == "peers" and endpoint.get("name") == "deliver position":
            step.summary_position_p95_ms = endpoint.get("p95_ms")
    totals = run.summary.get("totals") or {}
    step.requests, step.failures = int(totals.get("requests") or 0), int(totals.get("failures") or 0)
    step.error_rate = float(totals.get("error_rate") or 0.0)

    points = rows(
        db,
        'SELECT entity, t, values_json FROM datapoint WHERE run_id=? AND "group"=? AND t>=? AND t<=? '
        "ORDER BY t",
        run_id,
        "peers",
        t0,
        t1,
    )
    by_peer: dict[str, list[float]] = {}
    received: list[float] = []
    sent: list[float] = []
    connections: list[float] = []
    for entity, t, values_json in points:
        by_peer.setdefault(entity, []).append(float(t))
        values = json.loads(values_json)
        received.append(_rate(values, "received", interval))
        sent.append(_rate(values, "sent", interval))
        connected = values.get("connectedPeers")
        if isinstance(connected, list):
            connections.append(float(len(connected)))
        elif isinstance(connected, (int, float)):
            connections.append(float(connected))
    step.received_per_peer_s, step.sent_per_peer_s = mean(received), mean(sent)
    step.connections_per_peer = mean(connections)
    step.publishing_peers = len(by_peer)
    allowed_gap = 1.5 * interval + 0.5
    gaps = []
    for times in by_peer.values():
        edges = [times[0] - t0, *(b - a for a, b in itertools.pairwise(times)), t1 - times[-1]]
        gaps.append(max(edges))
    step.max_gap_s = max(gaps) if gaps else None
    step.late_peers = sum(1 for g in gaps if g > allowed_gap)

    ours, foreign = run.probe.cpu_cores(t0, t1)
    step.run_cpu_cores, step.foreign_cores = ours, foreign
    step.contaminated = foreign is not None and foreign > args.foreign_limit

    # the verdict
    if step.cpu_p90 is not None and step.cpu_p90 >= args.cpu_limit:
        step.failed.append(f"CPU p90 {step.cpu_p90:.0f}% >= {args.cpu_limit:g}%")
    if step.lag_p90_ms is not None and step.lag_p90_ms > args.max_lag_ms:
        step.failed.append(f"loop lag p90 {step.lag_p90_ms:.0f} ms > {args.max_lag_ms:g} ms")
    p95 = step.deliver_position.get("p95_ms")
    if p95 is None:
        step.failed.append("no position delivered")
    elif p95 > args.max_deliver_ms:
        step.failed.append(f"position p95 {p95:.0f} ms > {args.max_deliver_ms:g} ms")
    if step.tick_hz is not None and step.tick_hz < args.min_tick_ratio * step.tick_target_hz:
        step.failed.append(
            f"ticker {step.tick_hz:.0f} Hz < {args.min_tick_ratio:.0%} of {step.tick_target_hz:g}"
        )
    if step.publishing_peers != users:
        step.failed.append(f"{step.publishing_peers} of {users} peers published")
    if step.late_peers:
        step.failed.append(f"{step.late_peers} peers missed a stats interval (gap {step.max_gap_s:.1f}s)")
    if step.error_rate > 0.01:
        step.failed.append(f"error rate {step.error_rate:.1%}")
    step.sustained = not step.failed
    if step.dropped:
        step.notes.append(f"{step.dropped} dropped")
    if step.failures:
        step.notes.append(f"{step.failures} failures")
    return step


def _seconds(value: Any) -> float:
    from harness.durations import parse_duration

    return float(parse_duration(value)) if isinstance(value, str) else float(value)


def _rate(values: dict[str, Any], family: str, interval: float) -> float:
    per_s = values.get(f"{family}PerSecond")
    if isinstance(per_s, (int, float)):
        return float(per_s)
    return float(values.get(family) or 0) / interval


def run_peer_steps(args: argparse.Namespace, work: Path, data: dict[str, Any], say: Any) -> None:
    for users in args.peers:
        step: PeerStep | None = None
        for attempt in range(1, args.retries + 2):
            quiet = wait_quiet(args, say)
            say(f"[bench-webrtc] {users} aiortc peers, {args.duration:g}s (attempt {attempt})")
            try:
                this = measure_peers(args, work, users, attempt)
            except BenchError as exc:
                data["errors"].append(f"{users} peers: {exc}")
                this = PeerStep(users, failed=[str(exc).splitlines()[0]])
                step = this
                break
            this.quiet, this.attempts = quiet, attempt
            if not quiet["quiet"]:
                this.notes.append(f"machine busy before ({quiet['busy_cores_before']:.2f} cores)")
            if step is None or (this.foreign_cores or 0.0) < (step.foreign_cores or 0.0):
                step = this
            if not this.contaminated:
                break
            say(
                f"[bench-webrtc]   other processes used {this.foreign_cores:.2f} cores meanwhile: "
                "contaminated"
            )
        assert step is not None
        if step.attempts > 1:
            step.notes.append(f"retried: {step.attempts - 1} contaminated attempt(s)")
        if step.contaminated:
            step.notes.append(f"CONTAMINATED: others used {step.foreign_cores:.2f} cores")
        data["peers"].append(vars(step))
        say(
            f"[bench-webrtc]   {'sustained' if step.sustained else 'NOT sustained'}: CPU p90 "
            f"{_f(step.cpu_p90, '{:.0f}%')}, position p95 "
            f"{_f(step.deliver_position.get('p95_ms'), '{:.1f}')} ms, ticker {_f(step.tick_hz, '{:.0f}')} Hz"
            + (f" ({'; '.join(step.failed)})" if step.failed else "")
        )
        if not step.sustained and not args.all_steps:
            break
    sustained = 0
    for step_data in data["peers"]:
        if not step_data["sustained"]:
            break
        sustained = step_data["users"]
    data["peers_sustained"] = sustained


# -- step 2: memory per browser peer ----------------------------------------------------------------


def browsers_profile(args: argparse.Namespace, browsers: int) -> dict[str, Any]:
    profile = base_profile()
    profile["name"] = f"bench-webrtc-browsers-{browsers}"
    profile["description"] = f"scripts/bench-webrtc: {browsers} headless Chromium peers"
    profile["duration"] = f"{args.browser_duration:g}s"
    profile["groups"]["peers"]["users"] = args.room_peers
    group = profile["groups"]["browsers"]
    group["users"] = browsers
    group["processes"] = 1
    group.setdefault("options", {})["memory_interval"] = f"{args.memory_interval:g}s"
    if args.room_peers == 0:
        del profile["groups"]["peers"]
        profile["thresholds"] = [t for t in profile.get("thresholds", []) if "peers." not in t]
    return profile


def measure_browsers(args: argparse.Namespace, work: Path, browsers: int) -> dict[str, Any]:
    run = run_harness(
        work / f"browsers-{browsers}",
        browsers_profile(args, browsers),
        "browsers",
        timeout=args.browser_duration + 120,
    )
    run_id, _started, stopping = run_window(run.db)
    gauges: dict[int, dict[str, float]] = {}
    for t, name, value in rows(
        run.db,
        'SELECT t, name, value FROM metric WHERE run_id=? AND "group"=? AND type=? '
        "AND name IN ('browsers', 'browser_memory_mb') ORDER BY t",
        run_id,
        "browsers",
        "gauge",
    ):
        gauges.setdefault(int(t), {})[name] = float(value)
    readings = [
        (t, g["browser_memory_mb"])
        for t, g in sorted(gauges.items())
        if g.get("browsers") == browsers and g.get("browser_memory_mb") and t < stopping - 1
    ]
    if not readings:
        raise BenchError(
            f"{browsers} browsers: never all open with a memory reading "
            f"(browsers open at most {max((g.get('browsers', 0) for g in gauges.values()), default=0):g})"
        )
    settled = [m for t, m in readings if t >= readings[0][0] + args.settle]
    notes = []
    if not settled:
        settled = [m for _, m in readings]
        notes.append("not settled: all readings used")
    points = rows(
        run.db,
        'SELECT t, entity, values_json FROM datapoint WHERE run_id=? AND "group"=? ORDER BY t',
        run_id,
        "browsers",
    )
    latest: dict[str, dict[str, Any]] = {}
    connected: list[float] = []
    for t, entity, values_json in points:
        values = json.loads(values_json)
        if values.get("memoryMB") is not None:
            latest[entity] = values
        peers = values.get("connectedPeers")
        if readings[0][0] + args.settle <= t < stopping - 1:
            connected.append(float(len(peers) if isinstance(peers, list) else peers or 0))
    starts: dict[str, Any] = next(
        (
            e
            for e in run.summary.get("endpoints") or []
            if e.get("group") == "browsers" and e.get("name") == "browser start"
        ),
        {},
    )
    settled.sort()
    return {
        "browsers": browsers,
        "room_peers": args.room_peers,
        "total_mb": settled[len(settled) // 2],
        "peak_mb": max(m for _, m in readings),
        "readings": len(settled),
        "per_browser_mb": [v.get("memoryMB") for v in latest.values()],
        "connections_per_browser": mean(connected),
        "browser_start_p50_ms": starts.get("p50_ms"),
        "failures": int((run.summary.get("totals") or {}).get("failures") or 0),
        "exit_code": run.code,
        "wall_s": round(run.wall_s, 1),
        "notes": notes,
    }


def run_browser_steps(args: argparse.Namespace, work: Path, data: dict[str, Any], say: Any) -> None:
    for browsers in args.browsers:
        wait_quiet(args, say)
        say(
            f"[bench-webrtc] {browsers} browser(s) + {args.room_peers} aiortc peers, "
            f"{args.browser_duration:g}s"
        )
        try:
            entry = measure_browsers(args, work, browsers)
        except BenchError as exc:
            data["errors"].append(f"{browsers} browsers: {exc}")
            data["browsers"].append({"browsers": browsers, "error": str(exc).splitlines()[0]})
            continue
        say(f"[bench-webrtc]   {entry['total_mb']:.0f} MB PSS for {browsers} browser(s)")
        data["browsers"].append(entry)


def memory_result(data: dict[str, Any]) -> dict[str, Any]:
    """First browser, marginal browser, aiortc RSS per peer and the ratio."""
    ok = [b for b in data["browsers"] if not b.get("error")]
    points = [(float(b["browsers"]), float(b["total_mb"])) for b in ok]
    result: dict[str, Any] = {
        "first_browser_mb": None,
        "per_additional_browser_mb": None,
        "increments_mb": [],
        "memory_per_browser_mb": None,
        "aiortc_users": None,
        "aiortc_rss_per_peer_mb": None,
        "aiortc_marginal_rss_per_peer_mb": None,
        "aiortc_peers_per_browser": None,
        "aiortc_peers_per_browser_marginal": None,
    }
    first = next((b for b in ok if b["browsers"] == 1), None)
    if first is not None:
        result["first_browser_mb"] = first["total_mb"]
    elif ok:
        smallest = min(ok, key=lambda b: b["browsers"])
        result["first_browser_mb"] = smallest["total_mb"] / smallest["browsers"]
    result["per_additional_browser_mb"] = slope(points)
    ordered = sorted(ok, key=lambda b: b["browsers"])
    result["increments_mb"] = [
        (b["total_mb"] - a["total_mb"]) / (b["browsers"] - a["browsers"])
        for a, b in itertools.pairwise(ordered)
    ]
    result["memory_per_browser_mb"] = result["per_additional_browser_mb"] or result["first_browser_mb"]

    sustained = [p for p in data["peers"] if p["sustained"] and p["rss_bytes"]]
    reference = max(sustained, key=lambda p: p["users"], default=None)
    if reference is None:  # nothing sustained: the smallest step measured
        reference = min((p for p in data["peers"] if p["rss_bytes"]), key=lambda p: p["users"], default=None)
    if reference is not None:
        result["aiortc_users"] = reference["users"]
        result["aiortc_rss_per_peer_mb"] = reference["rss_bytes"] / reference["users"] / MB
    marginal = slope([(float(p["users"]), p["rss_bytes"] / MB) for p in data["peers"] if p["rss_bytes"]])
    if marginal is not None and marginal > 0:
        result["aiortc_marginal_rss_per_peer_mb"] = marginal
    browser = result["memory_per_browser_mb"]
    if browser and result["aiortc_rss_per_peer_mb"]:
        result["aiortc_peers_per_browser"] = browser / result["aiortc_rss_per_peer_mb"]
    if browser and result["aiortc_marginal_rss_per_peer_mb"]:
        result["aiortc_peers_per_browser_marginal"] = browser / result["aiortc_marginal_rss_per_peer_mb"]
    return result


# -- output ----------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = "{:,.0f}", empty: str = "-") -> str:
    return empty if value is None else fmt.format(value)


def render(data: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, shutil.get_terminal_size((150, 20)).columns), highlight=False)
    env, limits = data["env"], data["limits"]
    console.print(
        f"[bold]scripts/bench-webrtc[/]  {env['cpus']} cpus, load avg {env['loadavg'][0]:.2f}; "
        f"{env['duration_s']:g}s per peers run, {env['browser_duration_s']:g}s per browsers run"
    )
    console.print("  " + "  ".join(f"{k} {v}" for k, v in env["versions"].items()))
    table = Table(
        title="aiortc peers in one worker (webrtc-room, catalyst routine, lighthouse min 4 / max 8)",
        box=box.SIMPLE_HEAD,
        caption=f"Steady part only. Sustained: CPU p90 < {limits['cpu_limit']:g}%, loop lag p90 <= "
        f"{limits['max_lag_ms']:g} ms, position p95 <= {limits['max_deliver_ms']:g} ms, ticker >= "
        f"{limits['min_tick_ratio']:.0%} of its rate, every peer publishing each stats interval, "
        "errors < 1%. "
        "CPU: the worker's CPU time (health); run CPU: the whole run (controller, lighthouse, worker) in "
        "cores; others: other processes meanwhile (cores); conns: connections per peer.",
    )
    for col, justify in (
        ("peers", "right"),
        ("sustained", "left"),
        ("CPU mean/p90", "right"),
        ("lag p90 ms", "right"),
        ("ticker Hz", "right"),
        ("pos p50/p95 ms", "right"),
        ("recv/s per peer", "right"),
        ("conns", "right"),
        ("RSS MB", "right"),
        ("RSS/N MB", "right"),
        ("run CPU", "right"),
        ("others", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    footnotes = []
    for p in data["peers"]:
        deliver = p["deliver_position"] or {}
        verdict = "[green]yes[/]" if p["sustained"] else "[red]no[/]"
        if p["failed"] or p["notes"]:
            verdict += " *"
            footnotes.append(f"  * {p['users']} peers: " + "; ".join(p["failed"] + p["notes"]))
        table.add_row(
            str(p["users"]),
            verdict,
            f"{_f(p['cpu_mean'], '{:.0f}%')}/{_f(p['cpu_p90'], '{:.0f}%')}",
            _f(p["lag_p90_ms"], "{:.0f}"),
            _f(p["tick_hz"], "{:.0f}"),
            f"{_f(deliver.get('p50_ms'), '{:.1f}')}/{_f(deliver.get('p95_ms'), '{:.1f}')}",
            _f(p["received_per_peer_s"], "{:.0f}"),
            _f(p["connections_per_peer"], "{:.1f}"),
            _f(p["rss_bytes"] and p["rss_bytes"] / MB, "{:.0f}"),
            _f(p["rss_per_peer_bytes"] and p["rss_per_peer_bytes"] / MB, "{:.1f}"),
            _f(p["run_cpu_cores"], "{:.2f}"),
            _f(p["foreign_cores"], "{:.2f}"),
        )
    console.print(table)
    for line in footnotes:
        console.print(line)

    if data["browsers"]:
        t2 = Table(
            title="Memory of headless Chromium peers "
            "(PSS of the browsers' process trees, ChromeDriver excluded)",
            box=box.SIMPLE_HEAD,
            caption="total: median of the browser_memory_mb gauge once all K browsers are open and settled",
        )
        for col, justify in (
            ("browsers", "right"),
            ("total PSS MB", "right"),
            ("peak MB", "right"),
            ("each (memoryMB)", "left"),
            ("conns /browser", "right"),
            ("start p50 ms", "right"),
            ("notes", "left"),
        ):
            t2.add_column(col, justify=justify)  # type: ignore[arg-type]
        for b in data["browsers"]:
            if b.get("error"):
                t2.add_row(str(b["browsers"]), "[red]ERROR[/]", "", "", "", "", b["error"])
                continue
            t2.add_row(
                str(b["browsers"]),
                _f(b["total_mb"]),
                _f(b["peak_mb"]),
                ", ".join(_f(m) for m in b["per_browser_mb"]),
                _f(b["connections_per_browser"], "{:.1f}"),
                _f(b["browser_start_p50_ms"]),
                "; ".join(b["notes"]),
            )
        console.print(t2)

    mem = data["memory"]
    console.print("[bold]Results[/]")
    console.print(
        f"  aiortc peers one worker sustains (CPU p90 < {limits['cpu_limit']:g}%): "
        f"[bold]{data['peers_sustained']}[/]"
        + (
            ""
            if not data["peers"] or data["peers"][-1]["sustained"]
            else f" (next step, {data['peers'][-1]['users']}: {'; '.join(data['peers'][-1]['failed'])})"
        )
    )
    if mem["first_browser_mb"] is not None:
        console.print(
            f"  memory per browser peer: first {mem['first_browser_mb']:.0f} MB PSS"
            + (
                f", each additional {mem['per_additional_browser_mb']:.0f} MB"
                if mem["per_additional_browser_mb"] is not None
                else " (one browser only: no marginal figure)"
            )
        )
    if mem["aiortc_peers_per_browser"] is not None:
        console.print(
            f"  one browser peer ({mem['memory_per_browser_mb']:.0f} MB) ≈ "
            f"[bold]{mem['aiortc_peers_per_browser']:.0f}[/] aiortc peers at RSS / N "
            f"({mem['aiortc_rss_per_peer_mb']:.1f} MB each at N={mem['aiortc_users']})"
            + (
                f", ≈ {mem['aiortc_peers_per_browser_marginal']:.0f} at the worker's marginal "
                f"{mem['aiortc_marginal_rss_per_peer_mb']:.1f} MB per peer"
                if mem["aiortc_peers_per_browser_marginal"] is not None
                else ""
            )
        )
    for err in data["errors"]:
        console.print(f"[red]error:[/] {err}")
    if data.get("json"):
        console.print(f"  JSON: {data['json']}")


# -- main ------------------------------------------------------------------------------------------


def _ints(text: str, what: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{what} takes integers, e.g. 5,10,15")
    if not values or min(values) < 1:
        parser.error(f"{what} must be integers >= 1")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-webrtc",
        description="How many aiortc peers one worker sustains at the default routine (CPU below 80%), "
        "and the memory of a headless-Chromium browser peer.",
        epilog="exit codes: 0 measured, 1 a measurement failed, 2 bad flags or missing tools",
    )
    parser.add_argument("--peers", default=None, help="aiortc peer counts, in order (default 5,10,15,20,25)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per peers run (default 60)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds left out after the ramp (N / spawn_rate) and the start jitter (default 5)",
    )
    parser.add_argument("--all-steps", action="store_true", help="do not stop after the first failing N")
    parser.add_argument("--cpu-limit", type=float, default=80.0, help="worker CPU p90 limit, %% (80)")
    parser.add_argument("--max-lag-ms", type=float, default=50.0, help="loop lag p90 limit (50 ms)")
    parser.add_argument(
        "--max-deliver-ms", type=float, default=100.0, help="deliver position p95 limit (100 ms)"
    )
    parser.add_argument(
        "--min-tick-ratio", type=float, default=0.8, help="ticker rate / tick_hz at least (0.8)"
    )
    parser.add_argument(
        "--plain-routine",
        action="store_true",
        help="run the built-in catalyst routine itself (no tick counter: no ticker rate)",
    )
    parser.add_argument("--browsers", default=None, help="browser counts (default 1,2,3)")
    parser.add_argument(
        "--browser-duration", type=float, default=None, help="seconds per browsers run (default 30)"
    )
    parser.add_argument(
        "--room-peers", type=int, default=4, help="aiortc peers in the room with the browsers (4)"
    )
    parser.add_argument(
        "--memory-interval", type=float, default=None, help="browser memory reading every (default 3 s)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds after the K-th browser opened before readings count (default 8)",
    )
    parser.add_argument("--skip-peers", action="store_true", help="no aiortc peers steps")
    parser.add_argument("--skip-browsers", action="store_true", help="no browser memory steps")
    parser.add_argument(
        "--busy-limit",
        type=float,
        default=0.5,
        help="before each step, wait until other processes use fewer cores than this (0.5)",
    )
    parser.add_argument("--max-wait", type=float, default=180.0, help="longest such wait, s (180)")
    parser.add_argument(
        "--foreign-limit",
        type=float,
        default=0.35,
        help="a step during which other processes used more cores than this is contaminated (0.35)",
    )
    parser.add_argument("--retries", type=int, default=1, help="retries of a contaminated step (1)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a fast check (about a minute): peers 4,8 for 12 s, one browser for 15 s",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="where the JSON goes")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (databases, logs)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.peers = _ints(args.peers or ("4,8" if quick else "5,10,15,20,25"), "--peers", parser)
    args.browsers = _ints(args.browsers or ("1" if quick else "1,2,3"), "--browsers", parser)
    args.duration = args.duration if args.duration is not None else (12.0 if quick else 60.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if quick else 5.0)
    args.browser_duration = args.browser_duration or (15.0 if quick else 30.0)
    args.memory_interval = args.memory_interval or (2.0 if quick else 3.0)
    args.settle = args.settle if args.settle is not None else (6.0 if quick else 8.0)
    if args.duration <= 0 or args.browser_duration <= 0 or args.room_peers < 0 or args.retries < 0:
        parser.error("durations must be > 0, --room-peers and --retries >= 0")
    if args.json is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.json = ROOT / "harness-data" / "bench" / f"webrtc-{stamp}.json"
    return args


def versions() -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (proc.stdout or proc.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "?"

    found: dict[str, str] = {"python": platform.python_version()}
    for name in ("harness", "aiortc", "uvloop"):
        with contextlib.suppress(Exception):
            module = __import__(name)
            found[name] = str(getattr(module, "__version__", "?"))
    found["chromium"] = out([CHROMIUM, "--version"]).removeprefix("Chromium ").split(" ")[0]
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        import aiortc  # noqa: F401
    except ImportError:
        say("[bench-webrtc] aiortc is not installed: scripts/setup dev,webrtc")
        return 2
    if not args.skip_browsers and not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        say(
            f"[bench-webrtc] {CHROMIUM} and {CHROMEDRIVER} are needed (scripts/install-system), "
            "or --skip-browsers"
        )
        return 2
    sys.path.insert(0, str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="harness-bench-webrtc-"))
    data: dict[str, Any] = {
        "env": {
            "cpus": psutil.cpu_count(),
            "loadavg": list(os.getloadavg()),
            "duration_s": args.duration,
            "browser_duration_s": args.browser_duration,
            "quick": args.quick,
            "versions": versions(),
            "work_dir": str(work) if args.keep else None,
            "routine": "catalyst" if args.plain_routine else f"catalyst ({COUNTED_ROUTINE})",
        },
        "limits": {
            "cpu_limit": args.cpu_limit,
            "max_lag_ms": args.max_lag_ms,
            "max_deliver_ms": args.max_deliver_ms,
            "min_tick_ratio": args.min_tick_ratio,
            "foreign_limit_cores": args.foreign_limit,
        },
        "peers": [],
        "peers_sustained": 0,
        "browsers": [],
        "memory": {},
        "errors": [],
    }
    try:
        if not args.skip_peers:
            run_peer_steps(args, work, data, say)
        if not args.skip_browsers:
            run_browser_steps(args, work, data, say)
    except KeyboardInterrupt:
        say("[bench-webrtc] interrupted")
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    data["memory"] = memory_result(data)
    data["json"] = str(args.json)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    render(data)
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
