"""scripts/bench: harness's `http` simulator vs Locust FastHttpUser and k6, one core each, one nginx.

What it measures, in one run:

1. Requests/s on one core. nginx (`worker_processes 1`, `return 200 "ok\\n"`, no access log) runs
   pinned to one core; each load generator in turn runs pinned to another core with the same number
   of users, no think time, keep-alive, for `--duration` seconds:
     - harness: `python -m harness start` with one `http` group, `processes: 1`; the controller,
       forkserver and worker all share the one core (`taskset`), as Locust's single process does;
     - Locust `FastHttpUser` (`wait_time = constant(0)`, one task GET /);
     - k6 with `GOMAXPROCS=1`.
   The table shows rps, p50/mean latency, the generator's and nginx's CPU, and the ratio to Locust.
2. Memory per idle virtual user: the harness worker's peak RSS with `--idle-users` users (each does
   one request, then thinks for an hour) minus a 1-user baseline. Locust's and k6's are measured the
   same way (smaller counts, single process RSS) unless `--skip-competitor-idle`.

Targets (from the issue): harness ≥ 2× Locust FastHttpUser per core; 100,000 idle users in one
worker within 1 GiB. A missed target prints MISSED and still exits 0; a broken measurement
(a tool that failed to run, a missing summary) exits 1; bad flags or missing tools exit 2.

Only 127.0.0.1 is ever contacted. nginx and every tool are started in their own process group and
stopped at the end (also on Ctrl-C / SIGTERM), so nothing is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
LIB = Path(__file__).resolve().parent
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
GIB = 1024**3
MIB = 1024**2
IDLE_TARGET_USERS = 100_000
IDLE_TARGET_BYTES = GIB
RPS_TARGET_RATIO = 2.0

# Reference figures from the issue, shown (labelled) when a competitor's idle memory is not measured.
REFERENCE_IDLE_KB = {"locust": 21.0, "k6": 162.0}


class BenchError(Exception):
    """A measurement could not be taken."""


class SetupError(Exception):
    """A tool is missing and could not be installed, or the flags are wrong."""


# -- processes -------------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples CPU seconds and RSS of a process tree every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.25, children: bool = True) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.children = children
        self.samples: list[tuple[float, float, int, int]] = []  # (t, cpu_s, rss_sum, rss_max_one)
        self._cpu_last: dict[int, float] = {}
        self._stop_event = threading.Event()
        self._procs: dict[int, psutil.Process] = {}

    def _tree(self) -> list[psutil.Process]:
        try:
            root = self._procs.get(self.pid) or psutil.Process(self.pid)
            self._procs[self.pid] = root
            procs = [root]
            if self.children:
                for child in root.children(recursive=True):
                    procs.append(self._procs.setdefault(child.pid, child))
            return procs
        except psutil.Error:
            return []

    def sample(self) -> None:
        rss_sum = rss_max = 0
        for proc in self._tree():
            try:
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    rss = proc.memory_info().rss
            except psutil.Error:
                continue
            self._cpu_last[proc.pid] = cpu.user + cpu.system
            rss_sum += rss
            rss_max = max(rss_max, rss)
        if rss_sum:
            self.samples.append((time.monotonic(), sum(self._cpu_last.values()), rss_sum, rss_max))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(2)

    def cpu_percent(self, t0: float, t1: float) -> float | None:
        """Mean CPU % of the tree between two monotonic times (nearest samples)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            inside = self.samples[:1] + self.samples[-1:] if len(self.samples) >= 2 else []
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return 100.0 * (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    @property
    def rss_peak_one(self) -> int:
        """Highest RSS of any single process of the tree."""
        return max((s[3] for s in self.samples), default=0)

    @property
    def rss_peak_sum(self) -> int:
        """Highest summed RSS of the tree."""
        return max((s[2] for s in self.samples), default=0)


def pin(cpu: int | None) -> list[str]:
    """The `taskset` prefix that pins a command to one CPU (nothing if not pinning)."""
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def kill_group(proc: subprocess.Popen[Any], grace: float = 5.0, first: int = signal.SIGTERM) -> None:
    """Stop a process we started in its own session, and everything in its process group."""
    pgid = proc.pid
    for sig, wait in ((first, grace), (signal.SIGKILL, 2.0)):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
    # leftovers of the group (e.g. a forkserver that outlived its parent)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.1)


@dataclass
class ToolRun:
    """A finished tool process."""

    code: int
    wall: float
    started: float
    ended: float
    sampler: Sampler
    log: Path

    def mid_cpu(self) -> float | None:
        """The tool's CPU % over the middle of its run (start-up and shutdown left out)."""
        t0 = self.started + max(1.5, 0.25 * self.wall)
        t1 = self.ended - max(1.0, 0.15 * self.wall)
        if t1 - t0 < 0.5:
            t0, t1 = self.started, self.ended
        return self.sampler.cpu_percent(t0, t1)

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def run_tool(
    cmd: list[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float,
    cwd: Path | None = None,
    stop_when_flat: tuple[float, float] | None = None,
) -> ToolRun:
    """Run a command in its own session, sampling its process tree; always leaves nothing behind.

    `stop_when_flat=(min_s, max_s)`: stop it (SIGINT, then SIGTERM) once its RSS has been flat for 3 s
    after at least `min_s` seconds, or at `max_s` (used for the idle-memory measurements).
    """
    full_env = {**os.environ, **(env or {})}
    with log.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True
        )
    sampler = Sampler(proc.pid)
    sampler.start()
    try:
        deadline = started + timeout
        while proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                kill_group(proc)
                raise BenchError(
                    f"{Path(cmd[0]).name if cmd[0] != 'taskset' else cmd[3]} timed out "
                    f"after {timeout:.0f}s (log: {log})"
                )
            if stop_when_flat is not None and _flat(sampler, started, *stop_when_flat):
                kill_group(proc, grace=15.0, first=signal.SIGINT)
                break
            time.sleep(0.1)
        ended = time.monotonic()
    except BaseException:
        kill_group(proc, grace=3.0)
        raise
    finally:
        sampler.stop()
    kill_group(proc, grace=1.0)  # the group may still hold children of the tool
    return ToolRun(
        proc.returncode if proc.returncode is not None else -9, ended - started, started, ended, sampler, log
    )


def _flat(sampler: Sampler, started: float, min_s: float, max_s: float) -> bool:
    now = time.monotonic()
    if now - started >= max_s:
        return True
    if now - started < min_s:
        return False
    recent = [s[3] for s in sampler.samples if s[0] >= now - 3.0]
    earlier = [s[3] for s in sampler.samples if s[0] < now - 3.0]
    if len(recent) < 5 or not earlier:
        return False
    return max(recent) <= max(earlier) * 1.01


# -- nginx -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Nginx:
    """A private nginx master in a temporary prefix, pinned to one core, answering 'ok'."""

    def __init__(self, binary: str, prefix: Path, cpu: int | None) -> None:
        self.binary = binary
        self.prefix = prefix
        self.cpu = cpu
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: Sampler | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        for attempt in range(5):
            self.port = free_port()
            for sub in ("logs", "tmp_body", "tmp_proxy", "tmp_fcgi", "tmp_uwsgi", "tmp_scgi"):
                (self.prefix / sub).mkdir(parents=True, exist_ok=True)
            conf = (LIB / "nginx.conf.tmpl").read_text()
            conf = conf.replace("@PREFIX@", str(self.prefix)).replace("@PORT@", str(self.port))
            conf_path = self.prefix / "nginx.conf"
            conf_path.write_text(conf)
            err = self.prefix / "logs" / "stderr.log"
            with err.open("wb") as out:
                self.proc = subprocess.Popen(
                    [
                        *pin(self.cpu),
                        self.binary,
                        "-c",
                        str(conf_path),
                        "-p",
                        str(self.prefix),
                        "-e",
                        str(self.prefix / "logs" / "error.log"),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                    self.sampler = Sampler(self.proc.pid)  # the master and its worker
                    self.sampler.start()
                    return
                time.sleep(0.05)
            log = self.prefix / "logs" / "error.log"
            text = log.read_text(errors="replace") if log.exists() else err.read_text(errors="replace")
            self.stop()
            if "Address already in use" in text and attempt < 4:
                continue
            raise BenchError(f"nginx did not start on 127.0.0.1:{self.port}: {text.strip()[-500:]}")

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc, grace=5.0, first=signal.SIGQUIT)  # graceful nginx shutdown
        self.proc = None


# -- the three generators --------------------------------------------------------------------------


@dataclass
class Result:
    tool: str
    users: int
    rps: float = 0.0
    requests: int = 0
    failures: int = 0
    p50_ms: float | None = None
    mean_ms: float | None = None
    gen_cpu: float | None = None
    nginx_cpu: float | None = None
    rss_bytes: int = 0
    error: str | None = None
    ratio: float | None = None
    summary_rps: float | None = None
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, nginx: Nginx) -> None:
        self.args = args
        self.work = work
        self.nginx = nginx
        self.errors: list[str] = []

    def _nginx_cpu(self, run: ToolRun) -> float | None:
        if self.nginx.sampler is None:
            return None
        t0 = run.started + max(1.5, 0.25 * run.wall)
        t1 = run.ended - max(1.0, 0.15 * run.wall)
        return self.nginx.sampler.cpu_percent(t0, t1) if t1 > t0 else None

    # harness ------------------------------------------------------------------------------------
    def harness(
        self,
        name: str,
        users: int,
        duration: float,
        think: str,
        connections: int,
        timeout: float,
        spawn_rate: float | None = None,
    ) -> tuple[dict[str, Any], ToolRun]:
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        profile = folder / "profile.yaml"
        profile.write_text(
            "\n".join(
                [
                    f"name: bench-{name}",
                    f"duration: {duration:g}s",
                    "stop_grace: 5s",
                    "seed: 1",
                    f'targets: {{nginx: {{url: "{self.nginx.url}"}}}}',
                    "groups:",
                    f"  load: {{simulator: http, users: {users}, processes: 1, think_time: {think},"
                    + (f" spawn_rate: {spawn_rate:g}," if spawn_rate else ""),
                    f"         options: {{connections: {connections}, requests: [{{name: ok, url: /}}]}}}}",
                    "",
                ]
            )
        )
        report = folder / "report"
        cmd = [
            *pin(self.args.gen_cpu),
            str(PYTHON),
            "-m",
            "harness",
            "--log-level",
            "WARNING",
            "start",
            "--profile",
            str(profile),
            "--headless",
            "--quiet",
            "--db",
            str(folder / "harness.db"),
            "--report-dir",
            str(report),
        ]
        run = run_tool(
            cmd,
            folder / "harness.log",
            timeout=timeout,
            cwd=folder,
            env={"HARNESS_DB": str(folder / "harness.db")},
        )
        summary_path = report / "summary.json"
        if run.code not in (0, 1) or not summary_path.exists():
            raise BenchError(
                f"harness exited {run.code} ({'no' if not summary_path.exists() else 'with'} "
                f"summary.json); last lines of {run.log}:\n{run.tail()}"
            )
        summary = json.loads(summary_path.read_text())
        return summary, run

    def harness_rps(self, users: int) -> Result:
        result = Result("harness http", users)
        summary, run = self.harness(
            f"harness-rps-{users}",
            users,
            self.args.duration,
            "0",
            max(users, 10),
            timeout=self.args.duration + 90,
        )
        totals = summary.get("totals", {})
        health = summary.get("health", {})
        # summary.json's rps divides by the whole run (worker boot and stop included, ~1 s); Locust and
        # k6 divide by their active period. Compare like with like: the mean of the full seconds.
        result.summary_rps = float(totals.get("rps") or 0.0)
        steady = steady_rps(self.work / f"harness-rps-{users}" / "harness.db", summary.get("run_id"))
        result.rps = steady if steady is not None else result.summary_rps
        result.notes.append(
            f"summary rps {result.summary_rps:,.0f}" + ("" if steady is not None else " (used)")
        )
        result.requests = int(totals.get("requests") or 0)
        result.failures = int(totals.get("failures") or 0)
        result.p50_ms = totals.get("p50_ms")
        result.mean_ms = totals.get("mean_ms")
        result.gen_cpu = run.mid_cpu()
        result.nginx_cpu = self._nginx_cpu(run)
        result.rss_bytes = int(health.get("rss_max_bytes") or run.sampler.rss_peak_one)
        if result.failures:
            result.notes.append(f"{result.failures} failures")
        return result

    def harness_idle(self, users: int) -> dict[str, Any]:
        # one request per user at start (through a pool of 100 connections), then an hour of think time
        duration = self.args.idle_duration
        summary, run = self.harness(
            f"harness-idle-{users}",
            users,
            duration,
            "1h",
            100,
            timeout=duration + 180,
            spawn_rate=self.args.idle_spawn_rate,
        )
        health = summary.get("health", {})
        rss = int(health.get("rss_max_bytes") or 0)
        if not rss:
            raise BenchError(f"harness idle run with {users} users reported no worker RSS")
        totals = summary.get("totals", {})
        users_max = max((g.get("users_max", 0) for g in (summary.get("groups") or {}).values()), default=0)
        return {
            "users": users,
            "rss_bytes": rss,
            "requests": int(totals.get("requests") or 0),
            "failures": int(totals.get("failures") or 0),
            "users_max": users_max,
            "tree_rss_peak_bytes": run.sampler.rss_peak_sum,
            "cpu_max": health.get("cpu_max"),
            "duration_s": duration,
        }

    # locust -------------------------------------------------------------------------------------
    def locust_cmd(self, users: int, duration: str, csv_prefix: Path | None) -> list[str]:
        cmd = [
            *pin(self.args.gen_cpu),
            str(VENV_BIN / "locust"),
            "-f",
            str(LIB / "locustfile.py"),
            "--headless",
            "-u",
            str(users),
            "-r",
            str(users),
            "-t",
            duration,
            "-H",
            self.nginx.url,
            "--only-summary",
            "--loglevel",
            "WARNING",
            "--stop-timeout",
            "0",
        ]
        if csv_prefix is not None:
            cmd += ["--csv", str(csv_prefix)]
        return cmd

    def locust_rps(self, users: int) -> Result:
        result = Result("locust FastHttpUser", users)
        folder = self.work / f"locust-rps-{users}"
        folder.mkdir(parents=True, exist_ok=True)
        prefix = folder / "stats"
        run = run_tool(
            self.locust_cmd(users, f"{self.args.duration:g}s", prefix),
            folder / "locust.log",
            env={"BENCH_WAIT": "0"},
            timeout=self.args.duration + 60,
            cwd=folder,
        )
        stats = folder / "stats_stats.csv"
        if not stats.exists():
            raise BenchError(f"locust exited {run.code} without {stats.name}; last lines:\n{run.tail()}")
        with stats.open(newline="") as handle:
            rows = {row["Name"]: row for row in csv.DictReader(handle)}
        row = rows.get("Aggregated")
        if row is None:
            raise BenchError(f"no 'Aggregated' row in {stats}")
        result.rps = float(row["Requests/s"])
        result.requests = int(row["Request Count"])
        result.failures = int(row["Failure Count"])
        result.p50_ms = _num(row.get("50%") or row.get("Median Response Time"))
        result.notes.append("p50 in whole ms")
        result.mean_ms = _num(row.get("Average Response Time"))
        result.gen_cpu = run.mid_cpu()
        result.nginx_cpu = self._nginx_cpu(run)
        result.rss_bytes = run.sampler.rss_peak_one
        if result.failures:
            result.notes.append(f"{result.failures} failures")
        if run.code not in (0, 1):
            result.notes.append(f"locust exited {run.code}")
        return result

    def locust_idle(self, users: int) -> dict[str, Any]:
        folder = self.work / f"locust-idle-{users}"
        folder.mkdir(parents=True, exist_ok=True)
        run = run_tool(
            self.locust_cmd(users, "10m", None),
            folder / "locust.log",
            env={"BENCH_WAIT": "3600"},
            timeout=240,
            cwd=folder,
            stop_when_flat=(8.0, 90.0),
        )
        rss = run.sampler.rss_peak_one
        if not rss:
            raise BenchError(f"could not read locust's RSS; last lines:\n{run.tail()}")
        return {"users": users, "rss_bytes": rss}

    # k6 -----------------------------------------------------------------------------------------
    def k6_env(self, pause: float) -> dict[str, str]:
        return {
            "K6_NO_USAGE_REPORT": "true",
            "GOMAXPROCS": "1",
            "BENCH_URL": self.nginx.url + "/",
            "BENCH_SLEEP": f"{pause:g}",
        }

    def k6_rps(self, users: int) -> Result:
        result = Result("k6", users)
        folder = self.work / f"k6-rps-{users}"
        folder.mkdir(parents=True, exist_ok=True)
        export = folder / "summary.json"
        cmd = [
            *pin(self.args.gen_cpu),
            str(VENV_BIN / "k6"),
            "run",
            "--no-usage-report",
            "--quiet",
            "--vus",
            str(users),
            "--duration",
            f"{self.args.duration:g}s",
            "--summary-export",
            str(export),
            str(LIB / "k6.js"),
        ]
        run = run_tool(
            cmd, folder / "k6.log", env=self.k6_env(0), timeout=self.args.duration + 60, cwd=folder
        )
        if not export.exists():
            raise BenchError(f"k6 exited {run.code} without a summary export; last lines:\n{run.tail()}")
        metrics = json.loads(export.read_text()).get("metrics", {})
        reqs = metrics.get("http_reqs", {})
        duration = metrics.get("http_req_duration", {})
        failed = metrics.get("http_req_failed", {})
        result.rps = float(reqs.get("rate") or 0.0)
        result.requests = int(reqs.get("count") or 0)
        result.failures = int(failed.get("passes") or 0)  # k6 counts 'true' (failed) as passes of the rate
        result.p50_ms = duration.get("med")
        result.mean_ms = duration.get("avg")
        result.gen_cpu = run.mid_cpu()
        result.nginx_cpu = self._nginx_cpu(run)
        result.rss_bytes = run.sampler.rss_peak_one
        if result.failures:
            result.notes.append(f"{result.failures} failures")
        if run.code != 0:
            result.notes.append(f"k6 exited {run.code}")
        return result

    def k6_idle(self, users: int) -> dict[str, Any]:
        folder = self.work / f"k6-idle-{users}"
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            *pin(self.args.gen_cpu),
            str(VENV_BIN / "k6"),
            "run",
            "--no-usage-report",
            "--quiet",
            "--vus",
            str(users),
            "--duration",
            "10m",
            str(LIB / "k6.js"),
        ]
        run = run_tool(
            cmd, folder / "k6.log", env=self.k6_env(3600), timeout=240, cwd=folder, stop_when_flat=(8.0, 90.0)
        )
        rss = run.sampler.rss_peak_one
        if not rss:
            raise BenchError(f"could not read k6's RSS; last lines:\n{run.tail()}")
        return {"users": users, "rss_bytes": rss}


def steady_rps(db: Path, run_id: str | None) -> float | None:
    """Mean requests/s over the run's full seconds (the first and last, partial, seconds left out)."""
    if not db.exists() or not run_id:
        return None
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT t, SUM(count) FROM window WHERE run_id=? AND kind != 'error' GROUP BY t ORDER BY t",
            (run_id,),
        ).fetchall()
    counts = [int(c) for t, c in rows]
    if len(rows) < 3 or rows[-1][0] - rows[0][0] != len(rows) - 1:
        return None
    interior = counts[1:-1]
    return sum(interior) / len(interior)


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def per_user(big: dict[str, Any], base: dict[str, Any]) -> float:
    """Bytes per user between a 1-user baseline and a many-user run."""
    return (big["rss_bytes"] - base["rss_bytes"]) / max(1, big["users"] - base["users"])


# -- setup -----------------------------------------------------------------------------------------


def ensure_tools(say: Any) -> str:
    """The nginx binary; installs nginx-light / the bench extra if they are missing."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if nginx is None:
        if shutil.which("apt-get") is None:
            raise SetupError("nginx is not installed and apt-get is not available: install nginx")
        say("[bench] installing nginx-light (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx-light"]
        if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
            if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
                raise SetupError("apt-get install nginx-light failed")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not (VENV_BIN / "locust").exists() or not (VENV_BIN / "k6").exists():
        say("[bench] installing the bench extra (locust, k6): scripts/setup dev,bench")
        if subprocess.run(["bash", str(ROOT / "scripts" / "setup"), "dev,bench"], cwd=ROOT).returncode != 0:
            raise SetupError("scripts/setup dev,bench failed")
        if not (VENV_BIN / "locust").exists() or not (VENV_BIN / "k6").exists():
            raise SetupError(".venv/bin/locust or .venv/bin/k6 still missing after scripts/setup dev,bench")
    if shutil.which("taskset") is None:
        raise SetupError("taskset (util-linux) is needed to pin processes to a core")
    return nginx


def versions(nginx: str) -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=30,
                env={**os.environ, "K6_NO_USAGE_REPORT": "true"},
            )
            return (proc.stdout + proc.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "?"

    return {
        "python": platform.python_version(),
        "harness": out([str(PYTHON), "-c", "import harness; print(harness.__version__)"]),
        "nginx": out([nginx, "-v"]).removeprefix("nginx version: "),
        "locust": out([str(VENV_BIN / "locust"), "--version"]).split(" from ")[0],
        "k6": out([str(VENV_BIN / "k6"), "version"]).split(" (")[0],
    }


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- output ----------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = "{:,.0f}", empty: str = "-") -> str:
    return empty if value is None else fmt.format(value)


def render(data: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(132, shutil.get_terminal_size((132, 20)).columns), highlight=False)
    env = data["env"]
    console.print(
        f"[bold]scripts/bench[/]  nginx on cpu {env['server_cpu']}, generators on cpu {env['gen_cpu']} "
        f"({env['cpus']} cpus, load avg {env['loadavg'][0]:.2f})  {env['duration_s']:g}s per run"
    )
    console.print("  " + "  ".join(f"{k} {v}" for k, v in env["versions"].items()))
    table = Table(
        title="Requests/s on one core against nginx (keep-alive, no think time)",
        box=box.SIMPLE_HEAD,
        caption="rps: harness = mean of the run's full seconds (from its windows); Locust = "
        "Aggregated Requests/s; k6 = http_reqs rate. CPU: mid-run mean of the whole process tree.",
    )
    for col, justify in (
        ("tool", "left"),
        ("users", "right"),
        ("rps (1 core)", "right"),
        ("p50 ms", "right"),
        ("mean ms", "right"),
        ("gen CPU", "right"),
        ("nginx CPU", "right"),
        ("gen RSS MB", "right"),
        ("vs Locust Fast", "right"),
        ("notes", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in data["rps"]:
        if r["error"]:
            table.add_row(
                r["tool"], str(r["users"]), "[red]ERROR[/]", "", "", "", "", "", "", "see errors below"
            )
            continue
        table.add_row(
            r["tool"],
            str(r["users"]),
            _f(r["rps"]),
            _f(r["p50_ms"], "{:.2f}"),
            _f(r["mean_ms"], "{:.2f}"),
            _f(r["gen_cpu"], "{:.0f}%"),
            _f(r["nginx_cpu"], "{:.0f}%"),
            _f(r["rss_bytes"] / MIB, "{:.0f}"),
            _f(r["ratio"], "{:.2f}×"),
            "; ".join(r["notes"]),
        )
    console.print(table)

    idle = data.get("idle") or {}
    if idle:
        t2 = Table(
            title="Memory per idle virtual user (peak RSS of one process, minus a 1-user baseline)",
            box=box.SIMPLE_HEAD,
        )
        for col, justify in (
            ("tool", "left"),
            ("users", "right"),
            ("RSS MB", "right"),
            ("baseline MB", "right"),
            ("KB per user", "right"),
            ("100k users MB", "right"),
            ("source", "left"),
        ):
            t2.add_column(col, justify=justify)  # type: ignore[arg-type]
        for tool, entry in idle.items():
            if entry.get("error"):
                t2.add_row(tool, "", "[red]ERROR[/]", "", "", "", "see errors below")
            elif entry.get("reference"):
                t2.add_row(
                    tool,
                    "",
                    "",
                    "",
                    _f(entry["kb_per_user"], "{:.0f}"),
                    _f(entry["kb_per_user"] * IDLE_TARGET_USERS / 1024, "{:,.0f}"),
                    "[yellow]reference (issue), not measured[/]",
                )
            else:
                t2.add_row(
                    tool,
                    f"{entry['users']:,}",
                    _f(entry["rss_bytes"] / MIB, "{:,.0f}"),
                    _f(entry["baseline_rss_bytes"] / MIB, "{:.0f}"),
                    _f(entry["kb_per_user"], "{:.1f}"),
                    _f(entry["rss_100k_bytes"] / MIB, "{:,.0f}"),
                    "measured" if entry["users"] >= IDLE_TARGET_USERS else "measured, 100k projected",
                )
        console.print(t2)

    console.print("[bold]Targets[/]")
    for target in data["targets"]:
        if target["met"] is None:
            verdict = "[yellow]NOT MEASURED[/]"
        else:
            verdict = "[green]PASS  [/]" if target["met"] else "[bold red]MISSED[/]"
        console.print(f"  {verdict} {target['name']}: {target['value_text']}")
    for err in data["errors"]:
        console.print(f"[red]error:[/] {err}")


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Requests/s per core of harness's http simulator vs Locust FastHttpUser and k6 "
        "against one local nginx, and memory per idle virtual user.",
        epilog="exit codes: 0 measured (targets may be MISSED), 1 a measurement failed, 2 setup/flags",
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per load test (default 10)")
    parser.add_argument(
        "--users", default=None, help="virtual users per load test; a comma list runs each (default 10)"
    )
    parser.add_argument(
        "--idle-users", type=int, default=None, help="harness users in the idle-memory run (default 100000)"
    )
    parser.add_argument(
        "--idle-duration",
        type=float,
        default=None,
        help="seconds of the harness idle-memory run (default 40)",
    )
    parser.add_argument("--locust-idle-users", type=int, default=None, help="default 10000")
    parser.add_argument("--k6-idle-users", type=int, default=None, help="default 1000")
    parser.add_argument(
        "--idle-spawn-rate",
        type=float,
        default=None,
        help="spawn_rate of the harness idle run (default unset: all users within a second, "
        "so their first requests queue on the 100-connection pool at once: the worst case)",
    )
    parser.add_argument("--skip-idle", action="store_true", help="no idle-memory measurements")
    parser.add_argument("--skip-rps", action="store_true", help="no requests/s measurements")
    parser.add_argument(
        "--skip-competitor-idle",
        action="store_true",
        help="measure idle memory for harness only; show the issue's reference figures for Locust and k6",
    )
    parser.add_argument(
        "--tools", default="harness,locust,k6", help="which generators to run (default harness,locust,k6)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a fast check: 3 s runs, 2000 idle users, competitors' idle memory not measured",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--server-cpu", type=int, default=None, help="core for nginx (default: first allowed)"
    )
    parser.add_argument(
        "--gen-cpu", type=int, default=None, help="core for the load generators (default: second allowed)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, summaries)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration if args.duration is not None else (3.0 if quick else 10.0)
    try:
        args.users = [int(u) for u in str(args.users or "10").split(",") if u.strip()]
    except ValueError:
        parser.error("--users takes integers, e.g. 10 or 10,50")
    if not args.users or min(args.users) < 1:
        parser.error("--users must be >= 1")
    args.idle_users = (
        args.idle_users if args.idle_users is not None else (2000 if quick else IDLE_TARGET_USERS)
    )
    args.idle_duration = args.idle_duration if args.idle_duration is not None else (8.0 if quick else 40.0)
    args.locust_idle_users = args.locust_idle_users or 10_000
    args.k6_idle_users = args.k6_idle_users or 1000
    if quick:
        args.skip_competitor_idle = True
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(args.tools) - {"harness", "locust", "k6"}
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}; choose from harness, locust, k6")
    if args.duration <= 0 or args.idle_users < 2:
        parser.error("--duration must be > 0 and --idle-users >= 2")
    allowed = sorted(os.sched_getaffinity(0))
    if args.server_cpu is None:
        args.server_cpu = allowed[0] if len(allowed) >= 2 else None
    if args.gen_cpu is None:
        args.gen_cpu = allowed[1] if len(allowed) >= 2 else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        nginx_bin = ensure_tools(say)
    except SetupError as exc:
        say(f"[bench] {exc}")
        return 2
    raise_nofile()
    if args.server_cpu is None:
        say("[bench] warning: only one CPU available; nginx and the generators share it")
    work = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    nginx = Nginx(nginx_bin, work / "nginx", args.server_cpu)
    data: dict[str, Any] = {
        "env": {
            "cpus": len(os.sched_getaffinity(0)),
            "server_cpu": args.server_cpu,
            "gen_cpu": args.gen_cpu,
            "loadavg": list(os.getloadavg()),
            "duration_s": args.duration,
            "versions": versions(nginx_bin),
            "work_dir": str(work) if args.keep else None,
        },
        "rps": [],
        "idle": {},
        "targets": [],
        "errors": [],
    }
    bench = Bench(args, work, nginx)
    try:
        nginx.start()
        say(f"[bench] nginx on {nginx.url} (cpu {args.server_cpu}); generators on cpu {args.gen_cpu}")
        steps = {"harness": bench.harness_rps, "locust": bench.locust_rps, "k6": bench.k6_rps}
        for users in [] if args.skip_rps else args.users:
            for tool in args.tools:
                say(f"[bench] {tool}: {users} users, {args.duration:g}s")
                try:
                    data["rps"].append(vars(steps[tool](users)))
                except BenchError as exc:
                    data["errors"].append(f"{tool} ({users} users): {exc}")
                    data["rps"].append(vars(Result(tool, users, error=str(exc).splitlines()[0])))
        for users in args.users:
            locust = next(
                (
                    r
                    for r in data["rps"]
                    if r["tool"].startswith("locust")
                    and r["users"] == users
                    and not r["error"]
                    and r["rps"] > 0
                ),
                None,
            )
            for r in data["rps"]:
                if r["users"] == users and locust is not None and not r["error"]:
                    r["ratio"] = r["rps"] / locust["rps"]
        if not args.skip_idle:
            measure_idle(args, bench, data, say)
    except KeyboardInterrupt:
        say("[bench] interrupted")
        return 130
    except BenchError as exc:
        data["errors"].append(str(exc))
    finally:
        nginx.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    data["targets"] = targets(data, args)
    render(data)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 1 if data["errors"] else 0


def measure_idle(args: argparse.Namespace, bench: Bench, data: dict[str, Any], say: Any) -> None:
    if "harness" in args.tools:
        try:
            say("[bench] harness idle memory: 1-user baseline")
            base = bench.harness_idle(1)
            say(f"[bench] harness idle memory: {args.idle_users:,} users, {args.idle_duration:g}s")
            big = bench.harness_idle(args.idle_users)
            each = per_user(big, base)
            entry = {
                **big,
                "baseline_rss_bytes": base["rss_bytes"],
                "kb_per_user": each / 1024,
                "rss_100k_bytes": big["rss_bytes"]
                if big["users"] >= IDLE_TARGET_USERS
                else base["rss_bytes"] + each * IDLE_TARGET_USERS,
            }
            if big["users_max"] and big["users_max"] < big["users"]:
                entry["note"] = f"only {big['users_max']} users reached"
            entry["spawn_rate"] = args.idle_spawn_rate
            data["idle"]["harness"] = entry
        except BenchError as exc:
            data["errors"].append(f"harness idle memory: {exc}")
            data["idle"]["harness"] = {"error": str(exc).splitlines()[0]}
    for tool, users, measure in (
        ("locust", args.locust_idle_users, bench.locust_idle),
        ("k6", args.k6_idle_users, bench.k6_idle),
    ):
        if tool not in args.tools:
            continue
        name = "locust FastHttpUser" if tool == "locust" else "k6"
        if args.skip_competitor_idle:
            data["idle"][name] = {"reference": True, "kb_per_user": REFERENCE_IDLE_KB[tool]}
            continue
        try:
            say(f"[bench] {tool} idle memory: 1-user baseline")
            base = measure(1)
            say(f"[bench] {tool} idle memory: {users:,} users")
            big = measure(users)
            each = per_user(big, base)
            data["idle"][name] = {
                **big,
                "baseline_rss_bytes": base["rss_bytes"],
                "kb_per_user": each / 1024,
                "rss_100k_bytes": base["rss_bytes"] + each * IDLE_TARGET_USERS,
            }
        except BenchError as exc:
            # optional: fall back to the figures, clearly labelled
            say(f"[bench] {tool} idle memory not measured: {str(exc).splitlines()[0]}")
            data["idle"][name] = {
                "reference": True,
                "kb_per_user": REFERENCE_IDLE_KB[tool],
                "error_measuring": str(exc).splitlines()[0],
            }


def targets(data: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    ratios = [r["ratio"] for r in data["rps"] if r["tool"] == "harness http" and r["ratio"] is not None]
    if ratios:
        worst = min(ratios)
        out.append(
            {
                "name": f"harness ≥ {RPS_TARGET_RATIO:g}× Locust FastHttpUser requests/s per core",
                "value": worst,
                "met": worst >= RPS_TARGET_RATIO,
                "value_text": ", ".join(
                    f"{r['ratio']:.2f}× at {r['users']} users"
                    for r in data["rps"]
                    if r["tool"] == "harness http" and r["ratio"] is not None
                ),
            }
        )
    else:
        out.append(
            {
                "name": "harness ≥ 2× Locust FastHttpUser requests/s per core",
                "value": None,
                "met": None,
                "value_text": "not measured",
            }
        )
    idle = (data.get("idle") or {}).get("harness")
    if idle and not idle.get("error"):
        value = idle["rss_100k_bytes"]
        how = "measured" if idle["users"] >= IDLE_TARGET_USERS else f"projected from {idle['users']:,} users"
        met = value <= IDLE_TARGET_BYTES and not idle.get("note")
        out.append(
            {
                "name": "100,000 idle users in one worker within 1 GiB",
                "value": value,
                "met": met,
                "value_text": f"{value / MIB:,.0f} MiB ({how}; {idle['kb_per_user']:.1f} KiB per user)"
                + (f"; {idle['note']}" if idle.get("note") else ""),
            }
        )
    elif not args.skip_idle:
        out.append(
            {
                "name": "100,000 idle users in one worker within 1 GiB",
                "value": None,
                "met": None,
                "value_text": "not measured",
            }
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
