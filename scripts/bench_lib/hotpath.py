"""Where does the `http` simulator's time go? Ablations of its hot path on one core, against nginx.

    .venv/bin/python scripts/bench_lib/hotpath.py                # every variant, 8 s each, 10 users
    .venv/bin/python scripts/bench_lib/hotpath.py --profile      # plus a cProfile of the real worker

Each variant runs in a fresh process pinned to the generator core (nginx gets the other one) and
reports requests/s (mean of full seconds) — so the gap between two rows is what one layer costs:

    raw        minimal keep-alive HTTP/1.1 client on uvloop protocols (the ceiling for Python here)
    fast       a prototype lean client (pool, header parsing, timeout, metrics): what a fast path reaches
    aiohttp    bare aiohttp ClientSession loop, same connector/session settings as the simulator
    +metrics   the same plus `Metrics.request()` per response (histogram, per-second windows)
    +sim       `HttpSimulator.send()` driven by a plain loop (checks, error handling, metrics)
    worker     the real `harness.worker.Worker` in-process (user loop, think time, hooks, flush)
    harness    `python -m harness start` (controller, collector and worker on the same core)
    loop/null  users that only `await asyncio.sleep(0)`: the floor of one iteration (no I/O)
    worker/null  the real Worker with a simulator whose iteration does nothing: the worker's own cost

Nothing here is part of the product; it is a measuring aid for scripts/bench.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import logging
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

VARIANTS = ["raw", "fast", "aiohttp", "+metrics", "+sim", "worker", "harness", "loop/null", "worker/null"]


class Counts:
    """Completed requests per wall-clock second."""

    def __init__(self) -> None:
        self.per_second: Counter[int] = Counter()

    def add(self, n: int = 1) -> None:
        self.per_second[int(time.time())] += n

    def steady(self) -> float:
        seconds = sorted(self.per_second)
        if len(seconds) < 3:
            return sum(self.per_second.values()) / max(1, len(seconds))
        interior = [self.per_second[t] for t in seconds[1:-1]]
        return sum(interior) / len(interior)


# -- variants (run inside the pinned child) ----------------------------------------------------------


async def v_raw(url: str, users: int, seconds: float, counts: Counts) -> None:
    host, port = url.split("//")[1].split("/")[0].split(":")
    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: harness\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    class Proto(asyncio.Protocol):
        def __init__(self) -> None:
            self.buf = b""
            self.waiter: asyncio.Future[None] | None = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.buf += data
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(rest) >= length:
                self.buf = rest[length:]
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(None)

    async def one() -> None:
        _, proto = await loop.create_connection(Proto, host, int(port))
        while loop.time() < deadline:
            proto.waiter = loop.create_future()
            proto.transport.write(request)
            await proto.waiter
            counts.add()
        proto.transport.close()

    await asyncio.gather(*(one() for _ in range(users)))


def _session(connections: int, timeout: bool = True, decompress: bool = True) -> Any:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=10 if timeout else None),
        skip_auto_headers=("User-Agent",),
        headers={"User-Agent": "harness"},
        auto_decompress=decompress,
    )


async def v_aiohttp(
    url: str, users: int, seconds: float, counts: Counts, metrics: bool = False, tune: str = ""
) -> None:
    """`tune`: letters — u: a prebuilt yarl.URL, t: no total timeout, d: auto_decompress off,
    h: pass the simulator's (empty) per-request headers dict as the simulator does."""
    import yarl

    from harness.metrics import Metrics

    m = Metrics()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    session = _session(max(users, 10), timeout="t" not in tune, decompress="d" not in tune)
    target: Any = yarl.URL(url) if "u" in tune else url
    headers: Any = {} if "h" in tune else None

    async def one() -> None:
        while loop.time() < deadline:
            start = time.perf_counter()
            async with session.request("GET", target, headers=headers) as response:
                body = await response.read()
                status = response.status
            if metrics:
                m.request(
                    "ok", time.perf_counter() - start, kind="http", ok=status < 400, bytes_received=len(body)
                )
            counts.add()
            await asyncio.sleep(0)

    await asyncio.gather(*(one() for _ in range(users)))
    await session.close()


async def v_sim(url: str, users: int, seconds: float, counts: Counts) -> None:
    import random

    from harness.metrics import Metrics
    from harness.simulator import SimulatorContext, User
    from simulators.http.simulator import HttpOptions, HttpSimulator

    options = HttpOptions.model_validate(
        {"base_url": url, "connections": max(users, 10), "requests": [{"name": "ok", "url": "/"}]}
    )
    metrics = Metrics()
    ctx = SimulatorContext(
        run_id="x",
        group="g",
        worker_index=0,
        workers=1,
        options=options,
        targets={},
        metrics=metrics,
        log=logging.getLogger("x"),
        rng=random.Random(1),
        run_dir=Path(tempfile.gettempdir()),
    )
    sim = HttpSimulator(ctx)
    await sim.setup()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def one(i: int) -> None:
        user = User(i)
        while loop.time() < deadline:
            await sim.iteration(user)
            counts.add()
            await asyncio.sleep(0)

    await asyncio.gather(*(one(i) for i in range(users)))
    await sim.teardown()


async def v_fast(url: str, users: int, seconds: float, counts: Counts) -> None:
    """A prototype of a lean client: uvloop protocol, pooled keep-alive, status line + headers parsed
    in Python (Content-Length and chunked), a per-request timeout, and `Metrics.request()` per response.
    Not a product client (no TLS, redirects, proxies): it shows what a fast path could reach."""
    from harness.metrics import Metrics

    m = Metrics()
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].partition("/")[2]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    idle: list[Any] = []

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            self.buf = bytearray()
            self.waiter: asyncio.Future[tuple[int, dict[bytes, bytes], bytes]] | None = None
            self.head: tuple[int, dict[bytes, bytes]] | None = None
            self.need = -1

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def connection_lost(self, exc: Exception | None) -> None:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc or ConnectionError("closed"))

        def data_received(self, data: bytes) -> None:
            self.buf += data
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(self.buf[:end]).split(b"\r\n")
                status = int(lines[0][9:12])
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                del self.buf[: end + 4]
                self.head = (status, headers)
                self.need = int(headers.get(b"content-length", b"-1"))
            if self.need >= 0 and len(self.buf) >= self.need:
                body = bytes(self.buf[: self.need])
                del self.buf[: self.need]
                status, headers = self.head
                self.head = None
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result((status, headers, body))

    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: harness\r\n\r\n".encode()

    async def send() -> None:
        start = time.perf_counter()
        conn = idle.pop() if idle else (await loop.create_connection(Conn, host, int(port)))[1]
        conn.waiter = fut = loop.create_future()

        def expire() -> None:
            if not fut.done():
                fut.set_exception(TimeoutError())

        timer = loop.call_at(loop.time() + 10, expire)
        conn.transport.write(request)
        try:
            status, _headers, body = await fut
        finally:
            timer.cancel()
        idle.append(conn)
        m.request("ok", time.perf_counter() - start, kind="http", ok=status < 400, bytes_received=len(body))

    async def one() -> None:
        while loop.time() < deadline:
            await send()
            counts.add()
            await asyncio.sleep(0)

    await asyncio.gather(*(one() for _ in range(users)))
    for conn in idle:
        conn.transport.close()


async def v_loop_null(url: str, users: int, seconds: float, counts: Counts) -> None:
    """The floor: a user loop that only yields (`await asyncio.sleep(0)`) and counts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def one() -> None:
        while loop.time() < deadline:
            counts.add()
            await asyncio.sleep(0)

    await asyncio.gather(*(one() for _ in range(users)))


def v_worker(url: str, users: int, seconds: float, counts: Counts, null: bool = False) -> None:
    import multiprocessing

    import uvloop

    from harness.simulator import load_simulator
    from harness.worker import Worker, WorkerSpec

    spec = WorkerSpec(
        run_id="x",
        group="load",
        index=0,
        workers=1,
        simulator="http",
        options={"connections": max(users, 10), "requests": [{"name": "ok", "url": "/"}]},
        mode="closed",
        targets={"nginx": url},
        run_dir=tempfile.gettempdir(),
        seed=1,
        think_time={"type": "constant", "value": 0},
    )
    sim_cls = load_simulator("http")
    options = sim_cls.Options.model_validate(spec.options)
    if null:  # the worker's own cost per iteration: a simulator whose iteration does nothing
        from harness.simulator import Simulator

        class NullSim(Simulator):
            async def iteration(self, user: Any) -> None:
                return None

        sim_cls = NullSim

    def send(kind: str, payload: Any) -> None:
        if kind == "batch":
            if null:
                h = payload["health"]
                counts.per_second[int(h["t"])] += h["iterations"]
            for w in payload["windows"]:
                if w["kind"] != "error":
                    counts.per_second[w["t"]] += w["count"]

    parent, child = multiprocessing.Pipe()
    worker = Worker(spec, sim_cls, options, send, logging.getLogger("w"))

    def control() -> None:
        parent.send(("set", {"target": users}))
        time.sleep(seconds)
        parent.send(("stop", {"grace": 1.0}))

    threading.Thread(target=control, daemon=True).start()
    uvloop.run(worker.run(child))


def child(variant: str, url: str, users: int, seconds: float, profile_out: str | None) -> dict[str, Any]:
    import uvloop

    counts = Counts()
    profiler = cProfile.Profile() if profile_out else None
    cpu0 = time.process_time()
    t0 = time.monotonic()
    if profiler:
        profiler.enable()
    if variant in ("worker", "worker/null"):
        v_worker(url, users, seconds, counts, null=variant == "worker/null")
    else:
        factories: dict[str, Any] = {
            "raw": lambda: v_raw(url, users, seconds, counts),
            "fast": lambda: v_fast(url, users, seconds, counts),
            "loop/null": lambda: v_loop_null(url, users, seconds, counts),
            "aiohttp": lambda: v_aiohttp(url, users, seconds, counts),
            "+metrics": lambda: v_aiohttp(url, users, seconds, counts, metrics=True),
            **{
                f"aiohttp/{t}": (lambda t=t: v_aiohttp(url, users, seconds, counts, tune=t))
                for t in ("h", "u", "t", "d", "utd")
            },
            "+sim": lambda: v_sim(url, users, seconds, counts),
        }
        uvloop.run(factories[variant]())
    if profiler and profile_out:
        profiler.disable()
        profiler.dump_stats(profile_out)
    wall = time.monotonic() - t0
    return {
        "variant": variant,
        "rps": counts.steady(),
        "requests": sum(counts.per_second.values()),
        "cpu_pct": 100 * (time.process_time() - cpu0) / wall,
    }


# -- driver --------------------------------------------------------------------------------------------


def microbench() -> dict[str, float]:
    """Nanoseconds per call of the pieces a response goes through in harness (no I/O)."""
    import timeit

    from harness.metrics import Metrics, new_histogram, schedule_lag

    m = Metrics()
    h = new_histogram()
    n = 200_000
    out = {
        "Metrics.request(ok)": timeit.timeit(
            lambda: m.request("ok", 0.0003, kind="http", bytes_received=3), number=n
        )
        / n
        * 1e9,
        "HdrHistogram.record_value": timeit.timeit(lambda: h.record_value(300), number=n) / n * 1e9,
        "time.time()+int (Metrics._second)": timeit.timeit(lambda: m._second(), number=n) / n * 1e9,
        "schedule_lag.get()": timeit.timeit(schedule_lag.get, number=n) / n * 1e9,
        "empty lambda (call overhead)": timeit.timeit(lambda: None, number=n) / n * 1e9,
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="cProfile the `worker` variant too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.url, args.users, args.seconds, args.profile_out)))
        return 0

    import bench

    nginx_bin = bench.ensure_tools(lambda m: print(m, file=sys.stderr))
    allowed = sorted(os.sched_getaffinity(0))
    server_cpu, gen_cpu = (allowed[0], allowed[1]) if len(allowed) >= 2 else (None, None)
    work = Path(tempfile.mkdtemp(prefix="harness-hotpath-"))
    nginx = bench.Nginx(nginx_bin, work / "nginx", server_cpu)
    results: list[dict[str, Any]] = []
    try:
        nginx.start()
        url = nginx.url + "/"
        runs: list[tuple[str, str | None]] = [(v, None) for v in args.variants.split(",")]
        if args.profile:
            runs.append(("worker", str(work / "worker.prof")))
        for variant, prof in runs:
            if variant == "harness":
                ns = argparse.Namespace(gen_cpu=gen_cpu, duration=args.seconds)
                b = bench.Bench(ns, work, nginx)
                hr = b.harness_rps(args.users)
                results.append(
                    {"variant": "harness", "rps": hr.rps, "requests": hr.requests, "cpu_pct": hr.gen_cpu}
                )
                continue
            cmd = [
                *bench.pin(gen_cpu),
                sys.executable,
                __file__,
                "--child",
                variant,
                "--url",
                url,
                "--users",
                str(args.users),
                "--seconds",
                str(args.seconds),
            ]
            if prof:
                cmd += ["--profile-out", prof]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 60)
            if proc.returncode != 0:
                print(f"{variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if prof:
                r["variant"] = "worker (under cProfile)"
            results.append(r)
            print(f"{r['variant']:<26} {r['rps']:>9,.0f} rps  cpu {r['cpu_pct']:.0f}%", file=sys.stderr)
        micro = subprocess.run(
            [
                *bench.pin(gen_cpu),
                sys.executable,
                "-c",
                "import sys, json; sys.path[:0] = sys.argv[1:]; import hotpath; "
                "print(json.dumps(hotpath.microbench()))",
                str(Path(__file__).parent),
                str(bench.ROOT),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        nginx.stop()
    print(f"\n{'variant':<26} {'rps':>9}  {'µs/request':>10}  {'cpu':>5}")
    for r in results:
        print(
            f"{r['variant']:<26} {r['rps']:>9,.0f}  {1e6 / r['rps'] if r['rps'] else 0:>10.1f}  "
            f"{(r['cpu_pct'] or 0):>4.0f}%"
        )
    if micro.returncode == 0:
        print("\nmicrobenchmarks (ns per call):")
        for k, v in json.loads(micro.stdout).items():
            print(f"  {k:<36} {v:>8.0f}")
    if args.profile and (work / "worker.prof").exists():
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            stats = pstats.Stats(str(work / "worker.prof"), stream=buf)
            stats.sort_stats(key).print_stats(30)
            print(f"\ncProfile of the in-process worker, by {key}:")
            print("\n".join(buf.getvalue().splitlines()[:60]))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
