"""End-to-end runs through the real CLI in a subprocess: the engine, the store and summary.json."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.clitools import harness

pytestmark = pytest.mark.slow


def start(
    tmp_path: Path,
    profile: dict[str, Any] | str,
    *extra: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    """Run a profile headless; returns the process, summary.json and the database path."""
    if isinstance(profile, dict):
        path = tmp_path / "profile.yaml"
        path.write_text(yaml.safe_dump(profile))
        profile = str(path)
    db = tmp_path / "h.db"
    report = tmp_path / "report"
    proc = harness(
        "start",
        "--profile",
        profile,
        "--headless",
        "--quiet",
        "--db",
        str(db),
        "--report-dir",
        str(report),
        *extra,
        env=env,
        timeout=timeout,
    )
    summary_path = report / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return proc, summary, db


def rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Query the run database read-only."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(sql, params).fetchall()


def recorder_profile(**group: Any) -> dict[str, Any]:
    """A profile with one `tests.sims:Recorder` group (no target needed)."""
    base = {"simulator": "tests.sims:Recorder", "users": 3, "think_time": "50ms", "options": {"sleep": 0.01}}
    return {"name": "rec", "duration": "6s", "stop_grace": "2s", "groups": {"rec": {**base, **group}}}


def test_demo_profile_30s_every_group_has_requests(tmp_path: Path) -> None:
    proc, summary, db = start(tmp_path, "demo", "--duration", "30s")
    assert proc.returncode == 0, proc.stderr
    assert summary["status"] == "passed"
    assert set(summary["groups"]) == {
        "browse",
        "api",
        "monitor",
        "talk",
        "audience",
        "chat",
        "analysts",
        "trainers",
        "sdk_runs",
        "tenants",
        "peers",
        "browsers",
    }
    for group in summary["groups"]:
        assert summary["group_totals"][group]["requests"] > 0, group
    # the WebRTC room: every peer, the browser included, reported all seven packet families
    sql = "SELECT entity, values_json FROM datapoint WHERE \"group\" IN ('peers', 'browsers') ORDER BY id"
    peers = {entity: json.loads(values) for entity, values in rows(db, sql)}
    assert sorted(v["kind"] for v in peers.values()) == ["aiortc"] * 4 + ["browser"], peers.keys()
    assert all(v["receivedTotal"] > 0 and "expiredTotal" in v for v in peers.values())
    for key in ("run_id", "profile", "started_at", "ended_at"):
        assert summary[key]
    for key in ("requests", "failures", "error_rate", "rps", "p50_ms", "p95_ms", "p99_ms", "max_ms"):
        assert key in summary["totals"]
    endpoint = summary["endpoints"][0]
    for key in (
        "group",
        "name",
        "requests",
        "failures",
        "rps",
        "p50_ms",
        "p90_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
    ):
        assert key in endpoint
    assert all({"expr", "value", "ok"} <= set(t) for t in summary["thresholds"])
    assert {e["type"] for e in summary["events"]} >= {
        "run_started",
        "worker_started",
        "scaled",
        "run_stopped",
    }
    # the open-model group measured latency from the intended start too
    api = [e for e in summary["endpoints"] if e["group"] == "api"]
    assert api and all("intended" in e for e in api)
    # every second is in the database: about 30 seconds of windows per group
    seconds = rows(db, 'SELECT "group", COUNT(DISTINCT t) FROM window GROUP BY "group"')
    # (the steady HTTP groups record every second; the LLM groups think for seconds between requests)
    assert all(n >= 27 for group, n in seconds if group in ("browse", "api", "monitor")), seconds
    assert rows(db, "SELECT status FROM run") == [("passed",)]


def test_failed_threshold_exits_1(tmp_path: Path) -> None:
    proc, summary, _ = start(tmp_path, "smoke", "--duration", "3s", "--set", "thresholds=['p50 < 0.001ms']")
    assert proc.returncode == 1, proc.stderr
    assert summary["status"] == "failed"
    assert summary["thresholds"][0]["ok"] is False
    assert summary["thresholds"][0]["value"] > 0.001


def test_custom_simulator_metrics_datapoints_and_isolated_failures(tmp_path: Path) -> None:
    proc, summary, db = start(tmp_path, recorder_profile(options={"sleep": 0.01, "fail_every": 3}))
    assert proc.returncode == 0, proc.stderr
    op = next(e for e in summary["endpoints"] if e["name"] == "op")
    assert op["requests"] > 30 and op["failures"] == 0
    assert 9.0 <= op["p50_ms"] <= 40.0
    # the planned exception failed iterations, not the worker: it keeps running and the error is kept
    errors = {e["message"]: e["count"] for e in summary["errors"]}
    assert errors["RuntimeError: planned failure"] >= 5
    assert not [e for e in summary["events"] if e["type"] == "worker_exited" and e["detail"].get("exit_code")]
    assert rows(db, "SELECT SUM(value) FROM metric WHERE name='ops'")[0][0] == op["requests"]
    assert rows(db, "SELECT COUNT(*) FROM datapoint")[0][0] == op["requests"]
    assert rows(db, "SELECT COUNT(*) FROM event WHERE type='user_started'")[0][0] == 3
    assert rows(db, "SELECT COUNT(*) FROM log WHERE message LIKE '%planned failure%'")[0][0] >= 1


@pytest.mark.exclusive  # the worker's event-loop lag must stay under 50 ms
def test_blocking_simulator_runs_in_thread_pool(tmp_path: Path) -> None:
    profile = recorder_profile(simulator="tests.sims:SlowBlocking", users=4, think_time=0, options={})
    profile["duration"] = "4s"
    proc, summary, _ = start(tmp_path, profile)
    assert proc.returncode == 0, proc.stderr
    op = summary["endpoints"][0]
    # 4 users in 4 threads at 50 ms each: ~80 ops/s, impossible if the calls blocked the loop serially
    assert op["rps"] > 40, op
    assert summary["health"]["loop_lag_max_ms"] < 50


def test_iterations_per_user_and_total_end_the_run_early(tmp_path: Path) -> None:
    profile = recorder_profile(users=3, iterations=4, think_time=0)
    profile["groups"]["total"] = {
        "simulator": "tests.sims:Recorder",
        "users": 5,
        "total_iterations": 17,
        "processes": 2,
        "think_time": 0,
    }
    profile["duration"] = "60s"
    began = time.monotonic()
    proc, summary, _ = start(tmp_path, profile)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - began < 30
    by_group = {e["group"]: e["requests"] for e in summary["endpoints"]}
    assert by_group == {"rec": 12, "total": 17}
    assert summary["reason"] == "every group finished"


def test_open_model_counts_dropped_and_measures_from_intended_start(tmp_path: Path) -> None:
    profile = {
        "name": "open",
        "duration": "6s",
        "stop_grace": "1s",
        "targets": {
            "slow": {
                "embedded": True,
                "kind": "echo",
                "concurrency": 2,
                "service_time": "50ms",
                "queue_limit": 1000,
            }
        },
        "groups": {
            "api": {
                "simulator": "http",
                "arrival_rate": 100,
                "max_in_flight": 10,
                "options": {"requests": [{"name": "get", "url": "/"}]},
            },
        },
    }
    proc, summary, _ = start(tmp_path, profile)
    assert proc.returncode == 0, proc.stderr
    # capacity is 2/0.05 = 40/s: of 100/s most arrivals cannot start with 10 in flight
    assert summary["totals"]["dropped"] > 100
    assert any("dropped" in w for w in summary["health"]["warnings"])
    get = summary["endpoints"][0]
    assert 150 < get["requests"] < 400
    assert get["intended"]["p99_ms"] >= get["p99_ms"]


def test_bad_setup_is_a_boot_error_not_a_restart_loop(tmp_path: Path) -> None:
    began = time.monotonic()
    proc, summary, _ = start(tmp_path, recorder_profile(simulator="tests.sims:BadSetup", options={}))
    assert proc.returncode == 3
    assert "could not boot" in proc.stderr and "license server" in proc.stderr
    assert summary["status"] == "aborted"
    assert time.monotonic() - began < 20
    assert [e["type"] for e in summary["events"]].count("worker_restarted") == 0


def test_unreachable_target_at_start_exits_2(tmp_path: Path) -> None:
    profile = recorder_profile()
    profile["targets"] = {"api": {"url": "http://127.0.0.1:9", "start_timeout": "1s"}}
    proc, _, _ = start(tmp_path, profile)
    assert proc.returncode == 2
    assert "api" in proc.stderr and "127.0.0.1:9" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_secrets_never_reach_the_database_or_reports(tmp_path: Path) -> None:
    secret = "s3cr3t-token-value-42"
    profile = {
        "name": "secret",
        "duration": "3s",
        "targets": {"echo": {"embedded": True}},
        "groups": {
            "g": {
                "simulator": "http",
                "users": 2,
                "think_time": "100ms",
                "options": {
                    "headers": {"Authorization": "Bearer ${API_TOKEN}"},
                    "requests": [
                        {
                            "name": "echo",
                            "method": "POST",
                            "url": "/echo",
                            "body": "${API_TOKEN}",
                            "checks": {"contains": "nothing-like-this"},
                        },
                        # a check on the secret itself puts it into the error message
                        {"name": "secret-check", "url": "/", "checks": {"contains": "${API_TOKEN}"}},
                    ],
                },
            }
        },
    }
    proc, summary, db = start(tmp_path, profile, env={"API_TOKEN": secret})
    assert proc.returncode == 0, proc.stderr
    assert summary["totals"]["failures"] > 0  # the check failed, so error text was stored
    for path in [db, *db.parent.glob("h.db*"), tmp_path / "report" / "summary.json"]:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in proc.stdout + proc.stderr
    assert "${API_TOKEN}" in rows(db, "SELECT profile_json FROM run")[0][0]


def test_abort_on_fail_threshold_stops_the_run_early_and_says_why(tmp_path: Path) -> None:
    profile = recorder_profile(options={"sleep": 0.02})
    profile["duration"] = "60s"
    profile["thresholds"] = [
        {"expr": "p95(rec.op) < 1ms", "abort_on_fail": True, "delay": "3s"},
        "error_rate < 1%",
    ]
    began = time.monotonic()
    proc, summary, _ = start(tmp_path, profile)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - began < 30
    assert summary["status"] == "failed"
    assert summary["reason"].startswith("threshold failed: p95(rec.op) < 1ms")
    aborted = next(e for e in summary["events"] if e["type"] == "threshold_aborted")
    assert aborted["t"] >= 3.0  # not before its delay
    verdicts = {t["expr"]: t["ok"] for t in summary["thresholds"]}
    assert verdicts == {"p95(rec.op) < 1ms": False, "error_rate < 1%": True}


def test_every_run_writes_its_reports_and_junit_names_the_failed_threshold(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    profile = recorder_profile()
    profile["duration"] = "3s"
    profile["thresholds"] = ["p95(rec.op) < 1ms", "error_rate < 1%"]
    proc, summary, _ = start(tmp_path, profile)
    assert proc.returncode == 1, proc.stderr
    report = tmp_path / "report"
    for name in (
        "summary.json",
        "report.html",
        "junit.xml",
        "stats.csv",
        "stats_history.csv",
        "failures.csv",
    ):
        assert (report / name).stat().st_size > 0, name
    assert set(summary["reports"]) >= {"html", "junit", "stats"}
    cases = ET.parse(report / "junit.xml").getroot().iter("testcase")
    failed = {c.get("name"): c.find("failure") is not None for c in cases}
    assert failed == {"p95(rec.op) < 1ms": True, "error_rate < 1%": False}
    # and a run whose thresholds hold is green
    profile["thresholds"] = ["error_rate < 1%"]
    (tmp_path / "ok").mkdir()
    proc, _, _ = start(tmp_path / "ok", profile)
    assert proc.returncode == 0, proc.stderr
    cases = list(ET.parse(tmp_path / "ok" / "report" / "junit.xml").getroot().iter("testcase"))
    assert [c.find("failure") for c in cases] == [None]


def test_later_runs_compare_with_the_marked_baseline(tmp_path: Path) -> None:
    fast = ["--duration", "4s", "--set", "thresholds=[]", "--set", "targets.echo.service_time=5ms"]
    proc, first, db = start(tmp_path, "smoke", *fast)
    assert proc.returncode == 0, proc.stderr
    assert first["baseline"] is None  # nothing marked yet
    marked = harness("runs", "--db", str(db), "--mark-baseline", first["run_id"])
    assert marked.returncode == 0, marked.stderr
    (tmp_path / "slow").mkdir()
    slow_db_args = ["--db", str(db)]
    proc = harness(
        "start",
        "--profile",
        "smoke",
        "--headless",
        "--quiet",
        *slow_db_args,
        "--report-dir",
        str(tmp_path / "slow"),
        "--duration",
        "4s",
        "--set",
        "thresholds=[]",
        "--set",
        "targets.echo.service_time=40ms",
    )
    assert proc.returncode == 0, proc.stderr  # a regression is reported, the exit code stays the thresholds'
    second = json.loads((tmp_path / "slow" / "summary.json").read_text())
    assert second["baseline"]["run_id"] == first["run_id"]
    assert second["baseline"]["regression"] is True
    assert any("p95" in r for r in second["baseline"]["regressions"])
    assert "slower than baseline" in proc.stderr


def test_prepare_run_hands_shared_fixtures_to_every_worker(tmp_path: Path) -> None:
    profile = recorder_profile(simulator="tests.sims:Prepared", users=6, processes=2, options={})
    profile["duration"] = "3s"
    proc, summary, _ = start(tmp_path, profile)
    assert proc.returncode == 0, proc.stderr
    # 6 users over 2 workers, round-robin over 3 conversations: every conversation has 2 users
    assert sorted(e["name"] for e in summary["endpoints"]) == ["talk c0", "talk c1", "talk c2"]
    assert any(e["type"] == "group_prepared" for e in summary["events"])
    # a failing set-up aborts the run with its reason, before any worker starts
    profile["groups"]["rec"]["options"] = {"fail": True}
    (tmp_path / "bad").mkdir()
    proc, summary, _ = start(tmp_path / "bad", profile)
    assert proc.returncode == 3, proc.stderr
    assert "preparing the run failed: RuntimeError: the fixture service said no" in summary["reason"]
    assert not [e for e in summary["events"] if e["type"] == "worker_started"]


def test_phases_have_their_own_rows_but_stay_out_of_totals_and_group_thresholds(tmp_path: Path) -> None:
    profile = recorder_profile(simulator="tests.sims:Phased", users=2, think_time="20ms", options={})
    profile["duration"] = "3s"
    profile["thresholds"] = ["error_rate(rec) < 1%", "error_rate(rec.op_check) > 99%", "error_rate < 1%"]
    proc, summary, _ = start(tmp_path, profile)
    assert proc.returncode == 0, proc.stderr
    by_name = {e["name"]: e for e in summary["endpoints"]}
    ops = by_name["op"]["requests"]
    assert ops > 10
    assert by_name["op_check"]["kind"] == "phase" and by_name["op_check"]["failures"] == ops
    assert by_name["op_first_byte"]["requests"] == ops
    assert summary["group_totals"]["rec"]["requests"] == ops == summary["totals"]["requests"]
    assert summary["totals"]["failures"] == 0
    assert all(t["ok"] for t in summary["thresholds"]), summary["thresholds"]
    assert summary["tables"] == [
        {"group": "rec", "title": "ops", "columns": ["name", "count"], "rows": [["op", ops]]}
    ]
    stats = (tmp_path / "report" / "stats.csv").read_text().splitlines()
    aggregated = next(line for line in stats if ",Aggregated," in line)
    assert f",{ops},0," in aggregated  # requests, failures of the Aggregated row


def test_a_stopping_run_waits_for_every_stop_hook_within_the_grace(tmp_path: Path) -> None:
    profile = recorder_profile(simulator="tests.sims:SlowStop", users=6, think_time="50ms", options={})
    profile["duration"], profile["stop_grace"] = "2s", "5s"
    proc, summary, _ = start(tmp_path, profile)
    assert proc.returncode == 0, proc.stderr
    assert summary["counters"]["rec"]["stopped"] == 6


def test_finish_run_releases_the_fixture_and_keeps_its_evidence(tmp_path: Path) -> None:
    profile = recorder_profile(simulator="tests.sims:Finished", users=1, options={})
    profile["duration"] = "2s"
    proc, summary, db = start(tmp_path, profile)
    assert proc.returncode == 0, proc.stderr
    stored = rows(db, "SELECT \"group\", entity, values_json FROM datapoint WHERE entity = 'system'")
    assert stored == [("rec", "system", json.dumps({"released": f"fx-{summary['run_id']}"}))]
