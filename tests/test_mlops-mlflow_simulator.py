"""The `mlops-mlflow` simulator against a real `mlflow server` (sqlite, proxied artifacts): every point it
logs arrives exactly once with the right step and value, runs end FINISHED, `metric` mode makes one call
per value, an unreachable server fails in seconds with one line; and a run through the CLI."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from harness.errors import UsageError
from harness.metrics import Metrics, decode_histogram
from harness.simulator import SimulatorContext, User, registered_simulators
from simulators.mlops.curves import TrainingCurve
from simulators.mlops.mlflow_loop import MlflowLoopOptions, MlflowLoopSimulator, step_values
from tests.llmtools import counters, merged
from tests.mlflowtools import Server, leftovers, mlflow_server
from tests.test_run import start

pytestmark = pytest.mark.slow

SIMULATOR = (
    "mlops-mlflow"
    if "mlops-mlflow" in registered_simulators()
    else "simulators.mlops.mlflow_loop:MlflowLoopSimulator"
)
MEASURED: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real MLflow tracking server for the module; afterwards none of its processes may be left."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as running:
        yield running
    assert leftovers(running) == []


def make_simulator(
    options: dict[str, Any], run_id: str, targets: dict[str, str], prepared: Any = None
) -> tuple[MlflowLoopSimulator, Metrics, ThreadPoolExecutor]:
    """A simulator for worker 0 of group `train`, with its own thread pool (shut it down after)."""
    opts = MlflowLoopOptions.model_validate(options)
    if prepared is None:
        prepared = MlflowLoopSimulator.prepare_run(opts, targets, run_id, logging.getLogger("test"))
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=MlflowLoopSimulator.threads)
    ctx = SimulatorContext(
        run_id=run_id,
        group="train",
        worker_index=0,
        workers=1,
        options=opts,
        targets=targets,
        metrics=metrics,
        log=logging.getLogger("test"),
        rng=random.Random(7),
        run_dir=Path("."),
        executor=executor,
        prepared=prepared,
    )
    return MlflowLoopSimulator(ctx), metrics, executor


def drive(
    options: dict[str, Any],
    users: int,
    iterations: int,
    run_id: str,
    targets: dict[str, str],
    prepared: Any = None,
) -> tuple[list[dict[str, Any]], float]:
    """Run `users` users of one worker for `iterations` iterations each, then stop them; the drained
    metrics and the seconds the users took."""
    sim, metrics, executor = make_simulator(options, run_id, targets, prepared)

    async def main() -> float:
        await sim.setup()
        began = time.perf_counter()

        async def one(index: int) -> None:
            user = User(index)
            await sim.start_user(user)
            for _ in range(iterations):
                await sim.iteration(user)
            await sim.stop_user(user)

        await asyncio.gather(*(one(i) for i in range(users)))
        elapsed = time.perf_counter() - began
        await sim.teardown()
        return elapsed

    try:
        elapsed = asyncio.run(main())
    finally:
        executor.shutdown(wait=True)
    return [metrics.drain(everything=True)], elapsed


def check_runs(url: str, options: dict[str, Any], run_id: str) -> list[dict[str, Any]]:
    """Every run of harness run `run_id`, checked against a replay of its curve: FINISHED, each metric's
    history has exactly the logged steps, once each, with the values the curve gives; its params."""
    opts = MlflowLoopOptions.model_validate(options)
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name(opts.experiment)
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`harness.run_id` = '{run_id}'", max_results=1000
    )
    all_steps = [*range(opts.log_every, opts.steps, opts.log_every), opts.steps]
    checked = []
    for run in runs:
        assert run.info.status == "FINISHED", run.info
        assert run.info.end_time is not None and run.info.end_time >= run.info.start_time
        assert run.data.params == {k: str(v) for k, v in opts.params.items()}
        assert run.data.tags["harness.mode"] == opts.mode
        curve = TrainingCurve(
            random.Random(int(run.data.tags["harness.curve_seed"])),
            total_steps=opts.steps,
            steps_per_epoch=opts.steps_per_epoch,
        )
        keys = list(step_values(TrainingCurve(random.Random(0)), 1, opts.batch_metrics))
        assert sorted(run.data.metrics) == sorted(keys)
        histories = {k: client.get_metric_history(run.info.run_id, k) for k in keys}
        logged = len(histories["epoch"])
        steps = all_steps[:logged]
        expected = [step_values(curve, s, opts.batch_metrics) for s in steps]
        for key, history in histories.items():
            assert sorted(m.step for m in history) == steps, (key, [m.step for m in history])
            by_step = {m.step: m for m in history}
            assert [by_step[s].value for s in steps] == [e[key] for e in expected], key
            stamps = [by_step[s].timestamp for s in steps]
            assert stamps == sorted(stamps) and stamps[0] >= run.info.start_time
        checked.append(
            {"run": run, "steps": steps, "points": logged * len(keys), "user": run.data.tags["harness.user"]}
        )
    return checked


def p50_ms(stat: dict[str, Any]) -> float:
    return statistics.median(decode_histogram(h).get_value_at_percentile(50) / 1000 for h in stat["hists"])


def test_batch_mode_every_point_arrives_once_and_runs_roll_over(server: Server) -> None:
    options = {"experiment": "batch", "steps": 20, "steps_per_epoch": 5}
    drained, _ = drive(options, users=4, iterations=45, run_id="t-batch", targets={"mlflow": server.url})
    stats = merged(drained)
    # Per user: runs of 20, 20 and 5 steps (the last one finished by stop_user).
    assert {n: (s["count"], s["failures"]) for n, s in stats.items()} == {
        "run_create": (12, 0),
        "log_params": (12, 0),
        "log_batch": (180, 0),
        "run_finish": (12, 0),
    }
    assert counters(drained) == {"points": 180 * 6, "steps": 180}
    runs = check_runs(server.url, options, "t-batch")
    assert len(runs) == 12
    by_user: dict[str, list[int]] = {}
    for r in runs:
        by_user.setdefault(r["user"], []).append(len(r["steps"]))
    assert {u: sorted(n) for u, n in by_user.items()} == {str(u): [5, 20, 20] for u in range(4)}
    assert sum(r["points"] for r in runs) == 180 * 6
    datapoints = [p for d in drained for p in d["datapoints"]]
    assert len(datapoints) == 12 and all(p["values"]["finished"] for p in datapoints)
    assert sorted(p["values"]["points"] for p in datapoints) == [30] * 4 + [120] * 8


def test_batch_and_metric_mode_compared(server: Server) -> None:
    results = {}
    for mode in ("batch", "metric"):
        options = {"experiment": f"compare-{mode}", "mode": mode, "steps": 30}
        drained, seconds = drive(
            options, users=4, iterations=30, run_id=f"t-{mode}", targets={"m": server.url}
        )
        stats, totals = merged(drained), counters(drained)
        call = "log_batch" if mode == "batch" else "log_metric"
        assert stats[call]["failures"] == 0
        assert stats[call]["count"] == 120 * (1 if mode == "batch" else 6)  # metric mode: a call per value
        assert totals == {"points": 720, "steps": 120}
        if mode == "metric":
            assert stats["log_step"]["count"] == 120 and stats["log_step"]["failures"] == 0
        else:
            assert "log_step" not in stats
        runs = check_runs(server.url, options, f"t-{mode}")
        assert len(runs) == 4 and all(len(r["steps"]) == 30 for r in runs)
        results[mode] = {"points_per_s": totals["points"] / seconds, "p50_ms": p50_ms(stats[call])}
    MEASURED.update(results)
    print(f"\nMLflow ingest, 4 users, 6 values a step: {results}")
    assert results["batch"]["points_per_s"] > 2 * results["metric"]["points_per_s"]


def test_log_every_batch_metrics_and_console_artifacts(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # for download_artifacts below
    options = {
        "experiment": "console",
        "steps": 95,
        "log_every": 10,
        "batch_metrics": True,
        "console_every": 4,
        "tags": {"team": "ml"},
        "params": {"lr": 0.001, "model": "resnet"},
    }
    drained, _ = drive(options, users=1, iterations=10, run_id="t-console", targets={"m": server.url})
    stats = merged(drained)
    assert stats["log_batch"]["count"] == 10 and stats["run_finish"]["count"] == 1
    assert stats["log_text"]["count"] == 3 and stats["log_text"]["failures"] == 0  # after 4, 8 and 10 steps
    assert counters(drained) == {"points": 10 * 9, "steps": 10, "console_lines": 95}
    [run] = check_runs(server.url, options, "t-console")
    assert run["steps"] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    assert run["run"].data.tags["team"] == "ml"
    client = MlflowClient(tracking_uri=server.url)
    run_id = run["run"].info.run_id
    files = [f.path for f in client.list_artifacts(run_id, "console")]
    assert files == ["console/step-00000040.txt", "console/step-00000080.txt", "console/step-00000095.txt"]
    lines = []
    for path in files:
        local = client.download_artifacts(run_id, path, str(tmp_path))
        lines += Path(local).read_text().splitlines()
    assert [line.split(" - ")[0] for line in lines] == [f"Training step {s} completed" for s in range(1, 96)]


def test_a_cancelled_stop_still_finishes_the_run(server: Server) -> None:
    # A stopping worker cancels users still in stop_user: the run is finished and recorded all the same.
    options = {"experiment": "cancelled", "steps": 50}
    sim, metrics, executor = make_simulator(options, "t-cancel", {"m": server.url})

    async def main() -> None:
        await sim.setup()
        user = User(0)
        await sim.start_user(user)
        for _ in range(3):
            await sim.iteration(user)
        stop = asyncio.ensure_future(sim.stop_user(user))
        await asyncio.sleep(0.001)  # the finish call is on its way
        stop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stop
        await sim.teardown()

    try:
        asyncio.run(main())
    finally:
        executor.shutdown(wait=True)
    stats = merged([metrics.drain(everything=True)])
    assert stats["run_finish"]["count"] == 1 and stats["run_finish"]["failures"] == 0
    [run] = check_runs(server.url, options, "t-cancel")
    assert run["steps"] == [1, 2, 3]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_fails_fast_with_one_line() -> None:
    port = closed_port()
    opts = MlflowLoopOptions.model_validate({"tracking_uri": f"http://127.0.0.1:{port}"})
    began = time.monotonic()
    with pytest.raises(UsageError) as info:
        MlflowLoopSimulator.prepare_run(opts, {}, "t-down", logging.getLogger("test"))
    assert time.monotonic() - began < 3
    assert str(info.value) == (
        f"mlflow: cannot reach the tracking server at http://127.0.0.1:{port}: "
        "connection error: Connection refused"
    )

    # A server that accepts connections but never answers: the request timeout bounds it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        opts = MlflowLoopOptions.model_validate({"tracking_uri": url, "request_timeout": "1s"})
        began = time.monotonic()
        with pytest.raises(UsageError) as info:
            MlflowLoopSimulator.prepare_run(opts, {}, "t-silent", logging.getLogger("test"))
        assert time.monotonic() - began < 4
        assert str(info.value) == f"mlflow: cannot reach the tracking server at {url}: timed out after 1s"


def test_failed_calls_are_failed_requests_with_one_line_reasons(server: Server) -> None:
    # The server goes away after prepare_run: every call fails, the users carry on, nothing raises.
    url = f"http://127.0.0.1:{closed_port()}"
    prepared = {"tracking_uri": url, "experiment_id": "1"}
    drained, seconds = drive(
        {"steps": 5}, users=2, iterations=3, run_id="t-gone", targets={}, prepared=prepared
    )
    stats = merged(drained)
    assert seconds < 5
    assert stats["run_create"]["count"] == 2 * 4 and stats["run_create"]["failures"] == 2 * 4
    assert stats["run_create"]["errors"] == {"connection error: Connection refused": 8}
    assert set(stats) == {"run_create"} and counters(drained) == {}

    # The server answers with an error: its code and HTTP status.
    prepared = {"tracking_uri": server.url, "experiment_id": "987654321"}
    drained, _ = drive({"steps": 5}, users=1, iterations=1, run_id="t-404", targets={}, prepared=prepared)
    [(message, count)] = merged(drained)["run_create"]["errors"].items()
    assert count == 2
    assert message.startswith("RESOURCE_DOES_NOT_EXIST: ") and message.endswith("(HTTP 404)"), message


def test_options_are_checked_against_the_profile() -> None:
    class Profile:
        targets = {"a": object(), "b": object()}

    check = MlflowLoopSimulator.check_profile
    with pytest.raises(ValueError, match=r"name the target .* or give .tracking_uri."):
        check(MlflowLoopOptions(), Profile())
    with pytest.raises(ValueError, match="not in the profile's targets"):
        check(MlflowLoopOptions(target="c"), Profile())
    with pytest.raises(ValueError, match="not both"):
        check(MlflowLoopOptions(target="a", tracking_uri="http://x"), Profile())
    check(MlflowLoopOptions(target="a"), Profile())
    check(MlflowLoopOptions(tracking_uri="http://x"), Profile())


def profile(group_options: dict[str, Any], targets: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": "mlflow-test",
        "duration": "6s",
        "stop_grace": "5s",
        "seed": 3,
        "targets": targets or {},
        "groups": {
            "training": {
                "simulator": SIMULATOR,
                "users": 3,
                "spawn_rate": 100,
                "think_time": "20ms",
                "options": group_options,
            }
        },
    }


def test_cli_run_end_to_end(server: Server, tmp_path: Path) -> None:
    options = {"experiment": "cli", "steps": 15, "steps_per_epoch": 5}
    doc = profile(options, {"mlflow": {"url": server.url, "health": "/health"}})
    proc, summary, _ = start(tmp_path, doc, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "View run" not in proc.stdout + proc.stderr
    endpoints = {e["name"]: e for e in summary["endpoints"] if e["group"] == "training"}
    assert set(endpoints) == {"run_create", "log_params", "log_batch", "run_finish"}
    assert all(e["failures"] == 0 and e["kind"] == "mlflow" for e in endpoints.values())
    totals = summary["counters"]["training"]
    runs = check_runs(server.url, options, summary["run_id"])
    assert len(runs) == endpoints["run_create"]["requests"] == endpoints["run_finish"]["requests"] >= 3
    assert sum(r["points"] for r in runs) == totals["points"] == endpoints["log_batch"]["requests"] * 6
    assert sum(len(r["steps"]) for r in runs) == totals["steps"] == endpoints["log_batch"]["requests"]
    assert totals["steps"] > 3 * 15  # every user finished at least one run and started another
    [table] = [t for t in summary["tables"] if t["title"] == "MLflow ingest"]
    assert table["points"] == totals["points"] and "points/s acknowledged" in table["note"]


def test_cli_unreachable_tracking_uri_is_exit_2(tmp_path: Path) -> None:
    port = closed_port()
    proc, _, _ = start(tmp_path, profile({"tracking_uri": f"http://127.0.0.1:{port}"}), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    text = " ".join(proc.stderr.split())  # the log line may be wrapped to the terminal width
    assert (
        f"group 'training': mlflow: cannot reach the tracking server at http://127.0.0.1:{port}: "
        "connection error: Connection refused" in text
    ), proc.stderr
