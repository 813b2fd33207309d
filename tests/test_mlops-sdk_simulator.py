"""`mlops-sdk` through the real pluto-ml SDK against the real embedded `pluto` target, in both sync modes:
every logged point arrives exactly once, runs end COMPLETED with their own console lines, the flush
latency agrees with the server's clock, retries and drops are counted, no sync subprocess outlives the
simulator, and the `mlops-sdk` profile passes through the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from harness.metrics import Metrics, decode_histogram, percentiles_ms
from harness.simulator import User
from harness.targets.runner import EmbeddedTarget
from simulators.mlops.pluto_loop import PlutoLoopOptions, PlutoLoopSimulator, PlutoRun
from tests.llmtools import counters, make_ctx, merged
from tests.test_run import start

# pluto-ml's login and run creation drop httpx clients without closing them; their sockets close when the
# clients are garbage-collected, with a ResourceWarning (`drive` collects before the test ends)
pytestmark = pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")

PROFILE = str(Path(__file__).resolve().parents[1] / "harness" / "profiles" / "mlops-sdk.yaml")
FAST = {"flush_interval": 0.5, "console_every": 5}
"""Uploads twice a second so the tests wait less; everything else as the SDK's defaults."""


@pytest.fixture
def pluto() -> Iterator[EmbeddedTarget]:
    with EmbeddedTarget("pluto", "pluto", {"service_time": "0ms"}) as target:
        yield target


def sync_processes(under: Path) -> list[psutil.Process]:
    """Running `python -m pluto.sync` processes whose queue is under `under`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "pluto.sync" in cmdline and any(str(under) in arg for arg in cmdline):
            found.append(proc)
    return found


Hook = Callable[[PlutoLoopSimulator], Awaitable[None]]


def drive(
    url: str,
    options: dict[str, Any],
    run_dir: Path,
    users: int = 3,
    iterations: int = 40,
    before_stop: Hook | None = None,
) -> tuple[PlutoLoopSimulator, list[dict[str, Any]]]:
    """Run the simulator in this process: `users` users, `iterations` steps each 20 ms apart, then stop."""

    async def main() -> tuple[PlutoLoopSimulator, list[dict[str, Any]]]:
        metrics = Metrics()
        executor = ThreadPoolExecutor(PlutoLoopSimulator.threads)
        ctx = dataclasses.replace(
            make_ctx(PlutoLoopOptions.model_validate(options), url, metrics),
            run_dir=run_dir,
            executor=executor,
        )
        sim = PlutoLoopSimulator(ctx)
        await sim.setup()
        try:
            people = [User(i) for i in range(users)]

            async def steps(user: User, n: int) -> None:
                for _ in range(n):
                    await sim.iteration(user)
                    await asyncio.sleep(0.02)

            await asyncio.gather(*(sim.start_user(u) for u in people))
            await asyncio.gather(*(steps(u, iterations) for u in people))
            if before_stop is not None:
                await before_stop(sim)
                await asyncio.gather(*(steps(u, 5) for u in people))
            await asyncio.gather(*(sim.stop_user(u) for u in people))
        finally:
            await sim.teardown()
            executor.shutdown(wait=True)
            gc.collect()
        return sim, [metrics.drain(everything=True)]

    return asyncio.run(main())


def server_runs(url: str) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in requests.get(f"{url}/_runs", timeout=5).json()["runs"]}


def server_points(url: str, run_id: int) -> list[list[Any]]:
    """`[step, key, value, count, first arrival, time ms]` of the run's metric points (not `sys/…`)."""
    rows = requests.get(f"{url}/_runs/{run_id}/points?with_time=1", timeout=5).json()["points"]
    return [r for r in rows if not str(r[1]).startswith("sys/")]  # the SDK's own health metrics


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def flush_ms(drained: list[dict[str, Any]]) -> dict[float, float]:
    """p50 and p90 of the recorded flush latency, in ms."""
    hist = decode_histogram(merged(drained)["flush_latency"]["hists"][0])
    for encoded in merged(drained)["flush_latency"]["hists"][1:]:
        hist.add(decode_histogram(encoded))
    return percentiles_ms(hist, (50, 90))


@pytest.mark.exclusive  # times the SDK's flushes: under 1 s at the median with 0.5 s batches
@pytest.mark.parametrize("sync", ["process", "thread"])
def test_every_logged_point_arrives_once_and_runs_complete(
    sync: str, pluto: EmbeddedTarget, tmp_path: Path
) -> None:
    assert pluto.url
    # 3 users x 40 steps with 25 steps a run: every user finishes one run and starts a second
    sim, drained = drive(pluto.url, {**FAST, "sync": sync, "steps": 25}, tmp_path)
    stats, totals = merged(drained), counters(drained)
    assert stats["run.log"]["count"] == 120 and stats["run.log"]["failures"] == 0
    assert stats["run_create"]["count"] == stats["run_finish"]["count"] == 6
    assert stats["run_create"]["failures"] == stats["run_finish"]["failures"] == 0
    assert totals["points_delivered"] == totals["points_logged"] > 0
    assert "points_dropped" not in totals and "points_retried" not in totals
    runs: list[PlutoRun] = list(sim.finished_runs)
    assert sorted(r.step for r in runs) == [15, 15, 15, 25, 25, 25]
    assert sum(r.points_logged for r in runs) == totals["points_logged"]
    stored = server_runs(pluto.url)
    assert len(stored) == 6
    server_latency: list[float] = []
    for run in runs:
        seen = stored[run.server_id]
        assert seen["name"] == run.name and seen["project"] == "load-test-project"
        assert seen["status"] == "COMPLETED" and seen["duplicate_points"] == 0
        # console lines go to their own run: every 5th step, none from another run
        assert seen["log_lines"] == run.console_lines == run.step // 5
        points = server_points(pluto.url, run.server_id)
        arrived = {(step, key): count for step, key, _, count, _, _ in points}
        logged = {(step, key): 1 for step, keys in run.logged().items() for key in keys}
        assert arrived == logged  # each (step, key) logged arrived exactly once; nothing missing or extra
        first: dict[int, tuple[float, int]] = {}
        for step, _, _, _, arrival, time_ms in points:
            first[step] = (arrival, time_ms)
        server_latency += [arrival - time_ms / 1000 for arrival, time_ms in first.values()]
    # one flush latency per logged row, and the same distribution as the server's own clock says
    assert stats["flush_latency"]["count"] == sum(r.rows_logged for r in runs) == len(server_latency)
    client = flush_ms(drained)
    for q in (50, 90):
        server = 1000 * percentile(server_latency, q / 100)
        assert abs(client[q] - server) < 100, (q, client[q], server)
    assert 0 < client[50] < 1000  # batches leave every 0.5 s
    assert not sync_processes(tmp_path)


def test_server_errors_show_as_retries_and_latency_not_hidden(tmp_path: Path) -> None:
    with EmbeddedTarget("pluto", "pluto", {"service_time": "0ms", "error_rate": 0.3, "seed": 7}) as target:
        assert target.url
        sim, drained = drive(target.url, {**FAST, "sync": "thread"}, tmp_path, users=2, iterations=40)
        stored = server_runs(target.url)
        server_points_total = sum(len(server_points(target.url, r.server_id)) for r in sim.finished_runs)
    totals = counters(drained)
    # 30% of the uploads answered 500: their rows were sent again, and that is counted
    assert 0 < totals["points_retried"] <= totals["points_logged"]
    assert totals["points_delivered"] + totals.get("points_dropped", 0) == totals["points_logged"]
    assert server_points_total == totals["points_delivered"]  # what was acknowledged is stored, once
    assert all(r["duplicate_points"] == 0 for r in stored.values())
    assert flush_ms(drained)[90] > 900  # a retry waits at least 1 s: it shows in the flush latency
    assert not sync_processes(tmp_path)


def test_points_logged_after_the_server_went_away_are_dropped_and_said_so(tmp_path: Path) -> None:
    target = EmbeddedTarget("pluto", "pluto", {"service_time": "0ms"})
    url = target.start()

    async def delivered_then_gone(sim: PlutoLoopSimulator) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(
            r.points_delivered < r.points_logged for r in list(sim.live.values())
        ):
            await asyncio.sleep(0.1)
        await asyncio.to_thread(target.stop)  # then 5 more steps each that can never be delivered

    try:
        options = {**FAST, "sync": "process", "shutdown_timeout": 2.5}
        sim, drained = drive(url, options, tmp_path, users=2, iterations=10, before_stop=delivered_then_gone)
    finally:
        target.stop()
    totals, stats = counters(drained), merged(drained)
    runs = list(sim.finished_runs)
    assert len(runs) == 2 and all(r.step == 15 for r in runs)
    late = sum(r.points_logged for r in runs) - totals["points_delivered"]
    assert totals["points_dropped"] == late == sum(r.points_dropped for r in runs) > 0
    assert totals["points_delivered"] + totals["points_dropped"] == totals["points_logged"]
    # the finish could not confirm COMPLETED with the server gone: a failed run_finish, with the reason
    assert stats["run_finish"]["failures"] == 2
    assert all("status update not confirmed" in message for message in stats["run_finish"]["errors"])
    assert not sync_processes(tmp_path)


def test_a_cancelled_run_ends_that_run_not_the_process(tmp_path: Path) -> None:
    # the SDK answers a CANCELLED heartbeat with os._exit(2): without the guard this test process would die
    with EmbeddedTarget("pluto", "pluto", {"service_time": "0ms", "cancel_runs": [1]}) as target:
        assert target.url
        sim, drained = drive(target.url, {**FAST, "sync": "thread"}, tmp_path, users=1, iterations=20)
        stored = server_runs(target.url)
    assert counters(drained)["runs_cancelled"] == 1
    first, second = sim.finished_runs
    assert (first.server_id, second.server_id) == (1, 2) and first.step + second.step == 20
    assert stored[1]["heartbeats"] >= 1 and stored[2]["status"] == "COMPLETED"
    assert merged(drained)["run_create"]["count"] == 2


@pytest.mark.slow
def test_profile_runs_through_the_cli_and_leaves_no_sync_process(tmp_path: Path) -> None:
    proc, summary, _ = start(
        tmp_path,
        PROFILE,
        "--duration",
        "10s",
        "--set",
        "groups.training.users=5",
        "--set",
        "groups.training.spawn_rate=5",
    )
    assert proc.returncode == 0, proc.stderr
    assert summary["status"] == "passed"
    assert all(t["ok"] for t in summary["thresholds"]) and len(summary["thresholds"]) == 6
    names = {e["name"]: e for e in summary["endpoints"]}
    assert names["run_create"]["requests"] == names["run_finish"]["requests"] == 5
    assert names["run.log"]["requests"] == names["flush_latency"]["requests"] > 50
    got = summary["counters"]["training"]
    assert got["points_delivered"] == got["points_logged"] > 0 and "points_dropped" not in got
    (table,) = summary["tables"]
    assert table["title"] == "pluto SDK delivery" and table["rows"][0][4] == 100.0
    assert not sync_processes(tmp_path)
