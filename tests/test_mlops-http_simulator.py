"""`mlops-http` against the real embedded `pluto` target: the seed's NDJSON requests, their mix and
validation, training-curve values, and the `mlops-http` profile passing, failing and regressing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from harness.metrics import Metrics
from harness.simulator import User
from harness.targets.runner import EmbeddedTarget
from simulators.mlops.ingest import IngestOptions, IngestSimulator
from tests.clitools import harness
from tests.llmtools import counters, make_ctx, merged
from tests.test_run import start


@pytest.fixture
def pluto() -> Iterator[EmbeddedTarget]:
    with EmbeddedTarget("pluto", "pluto", {"service_time": "0ms"}) as target:
        yield target


def drive(url: str, options: dict[str, Any], users: int = 3, iterations: int = 40) -> list[dict[str, Any]]:
    """Run the simulator in this process: `users` users doing `iterations` iterations each."""

    async def main() -> list[dict[str, Any]]:
        metrics = Metrics()
        sim = IngestSimulator(make_ctx(IngestOptions.model_validate(options), url, metrics))
        await sim.setup()

        async def one(user: User) -> None:
            await sim.start_user(user)
            for _ in range(iterations):
                await sim.iteration(user)

        await asyncio.gather(*(one(User(i)) for i in range(users)))
        await sim.teardown()
        return [metrics.drain(everything=True)]

    return asyncio.run(main())


def runs(url: str) -> list[dict[str, Any]]:
    return list(requests.get(f"{url}/_runs", timeout=5).json()["runs"])


def test_requests_follow_the_seed_mix_and_every_point_is_stored_once(pluto: EmbeddedTarget) -> None:
    assert pluto.url
    drained = drive(pluto.url, {}, users=4, iterations=100)
    stats = merged(drained)
    kinds = {k: stats[f"POST /ingest/{k}"]["count"] for k in ("metrics", "logs", "data")}
    assert sum(kinds.values()) == 400 and all(s["failures"] == 0 for s in stats.values())
    # 5:3:2 within sampling noise over 400 requests
    assert 0.40 < kinds["metrics"] / 400 < 0.60 and 0.20 < kinds["logs"] / 400 < 0.40
    assert 0.12 < kinds["data"] / 400 < 0.28
    stored = runs(pluto.url)
    assert len(stored) == 4  # one run per user, numeric ids, project header kept
    assert all(r["project"] == "load-test-project" and r["duplicate_points"] == 0 for r in stored)
    assert sum(r["points"] for r in stored) == counters(drained)["points"] == 5 * kinds["metrics"]
    assert sum(r["log_lines"] for r in stored) == kinds["logs"]
    assert sum(r["data_records"] for r in stored) == kinds["data"]


def test_values_follow_a_training_curve_not_uniform_noise(pluto: EmbeddedTarget) -> None:
    assert pluto.url
    drive(pluto.url, {"weights": {"metrics": 1}, "steps": 400}, users=1, iterations=400)
    (run,) = runs(pluto.url)
    points = requests.get(f"{pluto.url}/_runs/{run['id']}/points", timeout=5).json()["points"]
    series: dict[str, list[float]] = {}
    for _step, key, value, count, _ in sorted(points):
        assert count == 1
        series.setdefault(key, []).append(float(value))
    loss, accuracy = series["train/loss"], series["train/accuracy"]
    assert len(loss) == 400
    early, late = slice(0, 40), slice(-40, None)
    assert sum(loss[late]) / 40 < 0.5 * sum(loss[early]) / 40
    assert sum(accuracy[late]) / 40 > sum(accuracy[early]) / 40 + 0.2
    lr = series["learning_rate"]
    assert lr[0] < lr[99] and lr[-1] < lr[150]  # warm-up, then decay


def test_stress_variant_sends_five_records_a_request_and_new_runs_after_steps(pluto: EmbeddedTarget) -> None:
    assert pluto.url
    drained = drive(pluto.url, {"weights": {"metrics": 1}, "records_per_request": 5, "steps": 50}, 1, 20)
    assert counters(drained)["records"] == 100
    stored = runs(pluto.url)
    assert len(stored) == 2 and sorted(r["steps"] for r in stored) == [50, 50]


def test_a_rejected_key_is_a_failure_with_its_reason() -> None:
    with EmbeddedTarget("pluto", "pluto", {"api_keys": ["mlps_right"]}) as target:
        assert target.url
        drained = drive(target.url, {"api_key": "mlps_wrong"}, users=1, iterations=5)
    stats = merged(drained)
    failures = sum(s["failures"] for s in stats.values())
    assert failures == 5
    messages = [m for s in stats.values() for m in s["errors"]]
    assert messages and all(m.startswith("HTTP 401") for m in messages)
    assert counters(drained)["rejected"] == 5


QUICK = ("--duration", "8s", "--set", "groups.ingest.users=20", "--set", "groups.ingest.spawn_rate=20")


@pytest.mark.slow
def test_profile_passes_then_fails_and_regresses_when_the_service_slows(tmp_path: Path) -> None:
    db = str(tmp_path / "h.db")
    proc, summary, _ = start(tmp_path, "mlops-http", *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert summary["status"] == "passed" and summary["totals"]["requests"] > 200
    marked = harness("runs", "--mark-baseline", summary["run_id"], "--db", db)
    assert marked.returncode == 0, marked.stderr
    slow = tmp_path / "slow"
    slow.mkdir()
    proc, summary, _ = start(
        slow, "mlops-http", *QUICK, "--db", db, "--set", "targets.ingest.service_time=1200ms"
    )
    assert proc.returncode == 1, proc.stderr
    assert summary["status"] == "failed"
    failed = {t["expr"] for t in summary["thresholds"] if not t["ok"]}
    assert {"p95 < 500ms", "p99 < 1s"} <= failed
    assert summary["baseline"]["regression"] is True
    assert any("p95" in str(r) for r in summary["baseline"]["regressions"])
    report = json.loads((slow / "report" / "summary.json").read_text())
    assert report["exit_code"] == 1
