"""Timeline analysis (`harness timeline`, `analyze_timeline`): exact values on hand-built stores, and a
real run that ramps users against the embedded echo target past saturation."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.errors import UsageError
from harness.metrics import new_histogram
from harness.store import Run, Store
from harness.timeline import TIMEOUT_MESSAGE, analyze_timeline, auto_window, describe
from tests.clitools import harness as run_cli

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000


def harness(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=timeout, columns=120)


def hist(values_ms: list[float]) -> bytes:
    h = new_histogram()
    for v in values_ms:
        h.record_value(int(v * 1000))
    encoded: bytes = h.encode()
    return encoded


def second(
    store: Store,
    run_id: str,
    s: int,
    requests: int,
    failures: int,
    latency_ms: float,
    users: int,
    errors: list[dict[str, Any]] | None = None,
    name: str = "home",
) -> None:
    """One stored second `s` after T0: `requests` of `name` at `latency_ms`, `failures` of them failed;
    the group's worker reports `users` (a health row at the end of that second)."""
    windows = []
    if requests:
        windows.append(
            {
                "t": T0 + s,
                "group": "g",
                "name": name,
                "kind": "http",
                "count": requests,
                "failures": failures,
                "hist": hist([latency_ms] * requests),
            }
        )
    health = [{"t": T0 + s + 1.0, "group": "g", "worker": 0, "users": users}]
    store.write_second(run_id, windows, errors or [], [], [], health, [], [])


def new_store(tmp_path: Path, run_id: str = "run-1") -> Store:
    store = Store(tmp_path / "t.db")
    store.create_run(Run(id=run_id, profile="p", started_at=T0 + 0.4, ended_at=T0 + 30, status="passed"))
    return store


def test_degradation_on_failures_names_window_users_and_capacity(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    for s in range(10):
        second(store, "run-1", s, 10, 0, 10, users=5)
    for s in range(10, 20):
        second(store, "run-1", s, 10, 0 if s % 2 else 1, 20, users=s - 2)  # 5 failures of 100: 5%
    for s in range(20, 30):
        second(store, "run-1", s, 10, 3, 30, users=20)  # 30%
    result = analyze_timeline(store, "run-1", window_s=10)
    assert [r["t"] for r in result["rows"]] == [0, 10, 20]
    first, middle, last = result["rows"]
    assert first == {
        "t": 0,
        "users": 5,
        "requests": 100,
        "failures": 0,
        "failure_pct": 0.0,
        "p50_ms": pytest.approx(10, rel=1e-3),
        "p95_ms": pytest.approx(10, rel=1e-3),
        "timeouts": 0,
    }
    assert middle["users"] == 17 and middle["failure_pct"] == 5.0
    assert last["failures"] == 30 and last["failure_pct"] == 30.0 and last["users"] == 20
    assert result["degradation"] == {"t": 20, "users": 20, "reason": "failures 30.0% > 10%"}
    assert result["capacity"] == {"low": 16, "high": 20}
    assert result["window_s"] == 10
    lines = describe(result)
    assert "Performance degradation detected at T+20s" in lines[0]
    assert "~20" in lines[1]
    assert "16–20 concurrent users" in lines[2]

    # a stricter failure limit moves the point to the 5% window; capacity floors 80% of 17
    stricter = analyze_timeline(store, "run-1", window_s=10, max_failure_pct=4)
    assert stricter["degradation"]["t"] == 10 and stricter["degradation"]["users"] == 17
    assert stricter["capacity"] == {"low": math.floor(0.8 * 17), "high": 17}


def test_degradation_on_p95_and_none_when_below_limits(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    for s in range(30):
        second(store, "run-1", s, 10, 0, 100 if s < 15 else 12_000, users=s + 1)
    result = analyze_timeline(store, "run-1", window_s=5)
    assert result["degradation"]["t"] == 15
    assert result["degradation"]["users"] == 20
    assert result["degradation"]["reason"].startswith("p95 12,0")
    assert "> 10,000 ms" in result["degradation"]["reason"]
    relaxed = analyze_timeline(store, "run-1", window_s=5, max_p95_ms=20_000)
    assert relaxed["degradation"] is None and relaxed["capacity"] is None
    assert describe(relaxed)[0].startswith("No significant degradation detected")
    # p95 limit and failure limit are both configurable; both reasons are named when both hold
    both = analyze_timeline(store, "run-1", window_s=5, max_p95_ms=50, max_failure_pct=-1)
    assert both["degradation"]["t"] == 0
    assert "failures 0.0% > -1%" in both["degradation"]["reason"]
    assert "p95 100 ms > 50 ms" in both["degradation"]["reason"]


def test_windows_without_requests_are_left_out_and_users_are_the_window_max(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    second(store, "run-1", 0, 5, 0, 10, users=3)
    second(store, "run-1", 1, 5, 0, 10, users=7)
    second(store, "run-1", 2, 0, 0, 10, users=9)  # users but no request completed
    second(store, "run-1", 3, 0, 0, 10, users=9)
    second(store, "run-1", 4, 5, 0, 10, users=4)
    result = analyze_timeline(store, "run-1", window_s=2)
    assert [(r["t"], r["users"], r["requests"]) for r in result["rows"]] == [(0, 7, 10), (4, 4, 5)]


def test_timeouts_exact_within_a_window_and_spread_across_windows(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    timeout = "timeout after 10s"
    for s in range(20):
        failures = 2 if s in (3, 12, 13) else 0
        errors = []
        if s == 3:
            errors = [
                {"group": "g", "name": "home", "message": timeout, "count": 2, "t": T0 + s},
                {"group": "g", "name": "other", "message": "HTTP 503", "count": 1, "t": T0 + s},
            ]
        elif s in (12, 13):
            errors = [{"group": "g", "name": "home", "message": "HTTP 503", "count": 2, "t": T0 + s}]
        second(store, "run-1", s, 10, failures, 10, users=1, errors=errors)
    result = analyze_timeline(store, "run-1", window_s=10)
    assert [r["timeouts"] for r in result["rows"]] == [2, 0]
    assert result["timeouts_exact"] is True

    # the same timeout message again in second 15: one error row, first_seen 3, last_seen 15, count 4;
    # spread by the failures of g/home in seconds 3..15: window 0 has 2, window 10 has 4 (+2 below)
    store.write_second(
        "run-1",
        [
            {
                "t": T0 + 15,
                "group": "g",
                "name": "home",
                "kind": "http",
                "count": 2,
                "failures": 2,
                "hist": hist([10, 10]),
            }
        ],
        [{"group": "g", "name": "home", "message": timeout, "count": 2, "t": T0 + 15}],
        [],
        [],
        [],
        [],
        [],
    )
    spread = analyze_timeline(store, "run-1", window_s=10)
    assert spread["timeouts_exact"] is False
    # weights: window 0 → 2 failures (second 3), window 10 → 6 (seconds 12, 13, 15): 4 × 2/8 = 1, 4 × 6/8 = 3
    assert [r["timeouts"] for r in spread["rows"]] == [1, 3]
    assert sum(r["timeouts"] for r in spread["rows"]) == 4


@pytest.mark.parametrize(
    ("message", "is_timeout"),
    [
        ("timeout after 10s", True),
        ("ReadTimeout: timed out", True),
        ("TimeoutError", True),
        ("HTTP 503 (time-out)", True),
        ("HTTP 503", False),
        ("ConnectionResetError: reset by peer", False),
    ],
)
def test_timeout_messages(message: str, is_timeout: bool) -> None:
    assert bool(TIMEOUT_MESSAGE.search(message)) is is_timeout


def test_bad_window_and_unknown_run(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    with pytest.raises(ValueError, match="window_s"):
        analyze_timeline(store, "run-1", window_s=0)
    with pytest.raises(UsageError, match="no run matches"):
        analyze_timeline(store, "nope")
    empty = analyze_timeline(store, "run-1")
    assert empty["rows"] == [] and empty["degradation"] is None


def test_auto_window() -> None:
    assert auto_window(30) == 1
    assert auto_window(120) == 2
    assert auto_window(600) == 10
    assert auto_window(3600) == 60
    assert auto_window(10**7) == 3600


def test_cli_timeline_on_hand_built_store(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    for s in range(20):
        second(store, "run-1", s, 10, 0 if s < 10 else 5, 10, users=s + 1)
    store.close()
    db = str(tmp_path / "t.db")
    proc = harness("timeline", "run-1", "--db", db, "--window", "10s")
    assert proc.returncode == 0, proc.stderr
    assert "Performance degradation detected at T+10s" in proc.stdout
    assert "Users at degradation: ~20" in proc.stdout
    assert "16–20 concurrent users" in proc.stdout
    as_json = json.loads(harness("timeline", "run-1", "--db", db, "--window", "10s", "--json").stdout)
    assert as_json["degradation"] == {"t": 10, "users": 20, "reason": "failures 50.0% > 10%"}
    loose = harness("timeline", "run-1", "--db", db, "-w", "10s", "--max-failure-pct", "60%", "--json")
    assert json.loads(loose.stdout)["degradation"] is None
    for bad in (["--window", "0s"], ["--window", "1.5s"], ["--max-p95", "soon"], ["--max-failure-pct", "x"]):
        proc = harness("timeline", "run-1", "--db", db, *bad)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("harness: error: "), proc.stderr
    assert harness("timeline", "nope", "--db", db).returncode == 2


SATURATE = {
    "name": "saturate",
    "duration": "20s",
    "stop_grace": "2s",
    "seed": 3,
    # 2 workers × 20 ms: at most 100 requests/s; beyond 5 waiting, 503 at once
    "targets": {"echo": {"embedded": True, "concurrency": 2, "service_time": "20ms", "queue_limit": 5}},
    "groups": {
        "ramp": {
            "simulator": "http",
            "shape": {"type": "stages", "stages": [{"duration": "20s", "target": 40}]},
            "think_time": "100ms",
            "options": {"requests": [{"name": "home", "url": "/"}]},
        }
    },
}


@pytest.mark.slow
def test_real_run_past_saturation_names_the_degradation_window_and_users(tmp_path: Path) -> None:
    profile = tmp_path / "saturate.yaml"
    profile.write_text(yaml.safe_dump(SATURATE))
    db = str(tmp_path / "h.db")
    run = harness(
        "start", "--profile", str(profile), "--headless", "--quiet", "--db", db,
        "--report-dir", str(tmp_path / "report"), "--duration", "20s",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    run_id = json.loads((tmp_path / "report" / "summary.json").read_text())["run_id"]

    proc = harness("timeline", run_id, "--db", db, "--window", "5s", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["window_s"] == 5
    rows = result["rows"]
    assert rows and rows[0]["t"] == 0 and rows[0]["failure_pct"] < 10, rows
    assert set(rows[0]) == {
        "t",
        "users",
        "requests",
        "failures",
        "failure_pct",
        "p50_ms",
        "p95_ms",
        "timeouts",
    }
    degradation = result["degradation"]
    assert degradation is not None, rows
    # ~12 users saturate 100 requests/s at 100 ms think time; the ramp reaches 40 users
    assert degradation["t"] >= 5 and 8 <= degradation["users"] <= 40, degradation
    assert degradation["reason"].startswith("failures"), degradation
    row = next(r for r in rows if r["t"] == degradation["t"])
    assert row["failure_pct"] > 10 and row["users"] == degradation["users"]
    assert all(r["failure_pct"] <= 10 and r["p95_ms"] <= 10_000 for r in rows if r["t"] < degradation["t"])
    assert result["capacity"] == {"low": math.floor(0.8 * degradation["users"]), "high": degradation["users"]}

    text = harness("timeline", run_id[:15], "--db", db, "--window", "5s")
    assert text.returncode == 0, text.stderr
    assert f"Performance degradation detected at T+{degradation['t']}s" in text.stdout
    assert f"Users at degradation: ~{degradation['users']}" in text.stdout
    assert f"{result['capacity']['low']}–{degradation['users']} concurrent users" in text.stdout
