"""Baseline comparison (`harness compare`, `harness runs --mark-baseline`): the rules on summaries,
and real runs — a repeat of the baseline passes, a run made slower fails."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.compare import Limits, compare_summaries
from harness.store import Run, Store
from tests.clitools import harness as run_cli

ROOT = Path(__file__).resolve().parent.parent


def harness(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=timeout, columns=140)


def one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def side(p95: float, p99: float, requests: int = 1000, failures: int = 0, **endpoints: Any) -> dict[str, Any]:
    """A summary with totals and endpoints given as name=(p95, p99, requests, failures)."""
    eps = [
        {"group": "g", "name": n, "requests": r, "failures": f, "rps": r / 10, "p95_ms": a, "p99_ms": b}
        for n, (a, b, r, f) in endpoints.items()
    ]
    totals = {"requests": requests, "failures": failures, "rps": requests / 10, "p95_ms": p95, "p99_ms": p99}
    if requests:
        totals["error_rate"] = failures / requests
    return {"profile": "p", "totals": totals, "endpoints": eps}


# -- the rules ---------------------------------------------------------------------------------
def test_relative_latency_rule_per_endpoint_and_total() -> None:
    base = side(100, 200, home=(100, 200, 900, 0), api=(50, 80, 100, 0))
    same = compare_summaries(base, base)
    assert same["regression"] is False and same["regressions"] == []
    assert [(r["scope"], r["name"]) for r in same["rows"]] == [
        ("endpoint", "api"),
        ("endpoint", "home"),
        ("total", None),
    ]

    within = side(119, 239, home=(119, 239, 900, 0), api=(59.9, 95, 100, 0))
    assert compare_summaries(base, within)["regression"] is False

    slower = side(100, 200, home=(100, 200, 900, 0), api=(61, 80, 100, 0))  # api p95 +22%
    result = compare_summaries(base, slower)
    assert result["regression"] is True
    api = result["rows"][0]
    assert api["status"]["p95_ms"] == "regression" and api["status"]["p99_ms"] == "same"
    assert api["delta"]["p95_pct"] == pytest.approx(22.0)
    assert result["regressions"] == ["g/api: p95 50.0 → 61.0 ms (+22.0%, limit +20%)"]
    assert result["rows"][-1]["regression"] is False  # the totals did not move

    # each limit is configurable
    assert compare_summaries(base, slower, Limits(p95_pct=25))["regression"] is False
    p99_worse = side(100, 250)
    assert compare_summaries(side(100, 200), p99_worse)["regression"] is True
    assert compare_summaries(side(100, 200), p99_worse, Limits(p99_pct=30))["regression"] is False


def test_error_rate_rule_is_absolute_percentage_points() -> None:
    base = side(10, 20, requests=1000, failures=10)  # 1%
    assert compare_summaries(base, side(10, 20, requests=1000, failures=59))["regression"] is False  # +4.9 pp
    worse = compare_summaries(base, side(10, 20, requests=1000, failures=70))  # +6 pp
    assert worse["regression"] is True
    total = worse["rows"][-1]
    assert total["delta"]["error_rate_pp"] == pytest.approx(6.0)
    assert total["status"]["error_rate"] == "regression"
    assert "error rate 1.00% → 7.00% (+6.00 pp, limit +5 pp)" in worse["regressions"][0]
    assert compare_summaries(base, side(10, 20, failures=70), Limits(error_rate_pp=10))["regression"] is False
    # a summary without error_rate (only requests/failures, as the contract guarantees) works too
    no_rate = {"totals": {"requests": 100, "failures": 20, "p95_ms": 10, "p99_ms": 20}, "endpoints": []}
    assert compare_summaries(side(10, 20), no_rate)["rows"][-1]["current"]["error_rate"] == 0.2


def test_zero_baseline_needs_the_absolute_floor_and_says_so() -> None:
    empty = side(0, 0, requests=0)
    tiny = side(0.5, 0.9, requests=10)
    result = compare_summaries(empty, tiny)
    assert result["regression"] is False
    total = result["rows"][-1]
    assert total["delta"]["p95_pct"] is None and total["delta"]["rps_pct"] is None
    assert any("baseline p95 is 0" in n and "exceeds 1 ms" in n for n in result["notes"])
    big = compare_summaries(empty, side(50, 80, requests=10))
    assert big["regression"] is True
    assert "p95 0 → 50.0 ms (zero baseline; floor 1 ms)" in big["regressions"][0]
    assert compare_summaries(empty, side(50, 80), Limits(zero_floor_ms=100))["regression"] is False


def test_added_and_removed_endpoints_are_listed_not_regressions() -> None:
    base = side(10, 20, home=(10, 20, 100, 0), old=(10, 20, 100, 0))
    cur = side(10, 20, home=(10, 20, 100, 0), new=(900, 990, 100, 100))
    result = compare_summaries(base, cur)
    assert result["added"] == [{"group": "g", "name": "new"}]
    assert result["removed"] == [{"group": "g", "name": "old"}]
    assert result["regression"] is False
    assert [r["name"] for r in result["rows"]] == ["home", None]


def test_iteration_errors_are_not_endpoints() -> None:
    base = side(10, 20)
    cur = side(10, 20)
    cur["endpoints"].append(
        {"group": "g", "name": "(iteration)", "kind": "error", "requests": 5, "failures": 5}
    )
    result = compare_summaries(base, cur)
    assert result["added"] == [] and result["regression"] is False


# -- the store ---------------------------------------------------------------------------------
def test_baseline_table_set_get_and_added_to_an_old_database(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    store = Store(db)
    store.create_run(Run(id="r1", profile="p", started_at=1.0))
    store.close()
    with sqlite3.connect(db) as conn:  # a database from before the baseline table existed
        conn.execute("DROP TABLE baseline")
    store = Store(db)
    assert store.get_baseline("p") is None
    store.set_baseline("p", "r1")
    store.set_baseline("q", "r9")
    assert store.get_baseline("p") == "r1"
    store.set_baseline("p", "r2")
    assert store.get_baseline("p") == "r2"
    assert store.baselines() == {"p": "r2", "q": "r9"}
    store.close()


# -- real runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three smoke runs in one database at low load with a constant service time: a baseline, a
    repeat of it, and one made slower (150 ms instead of 50 ms)."""
    tmp = tmp_path_factory.mktemp("compare")
    db = tmp / "h.db"
    out: dict[str, Any] = {"db": str(db), "dir": tmp}
    for label, service_time in (("base", "50ms"), ("repeat", "50ms"), ("slow", "150ms")):
        report = tmp / label
        proc = harness(
            "start", "--profile", "smoke", "--headless", "--quiet", "--duration", "4s",
            "--db", str(db), "--report-dir", str(report),
            "--set", "thresholds=[]", "--set", f"targets.echo.service_time={service_time}",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[label] = json.loads((report / "summary.json").read_text())["run_id"]
        out[f"{label}_json"] = str(report / "summary.json")
    return out


@pytest.mark.slow
def test_repeat_of_the_baseline_passes_and_slower_run_fails(runs: dict[str, Any]) -> None:
    db = runs["db"]
    repeat = harness("compare", runs["repeat"], "--baseline", runs["base"], "--db", db)
    assert repeat.returncode == 0, repeat.stdout + repeat.stderr
    assert "NO REGRESSION" in repeat.stdout
    assert "browse/home" in repeat.stdout and "browse/json" in repeat.stdout and "total" in repeat.stdout

    slow = harness("compare", runs["slow"], "--baseline", runs["base"], "--db", db)
    assert slow.returncode == 1, slow.stdout + slow.stderr
    assert "REGRESSION" in slow.stdout and "total: p95" in slow.stdout and "FAIL" in slow.stdout

    # a summary.json as the baseline, and as the current side (no database needed)
    by_file = harness("compare", runs["slow"], "--baseline", runs["base_json"], "--db", db)
    assert by_file.returncode == 1, by_file.stderr
    files_only = harness(
        "compare", runs["repeat_json"], "--baseline", runs["base_json"], "--db", str(runs["dir"] / "none.db")
    )
    assert files_only.returncode == 0, files_only.stderr

    # loosened limits let the slow run through
    loose = harness("compare", runs["slow"], "-b", runs["base"], "--db", db, "--p95", "500%", "--p99", "500")
    assert loose.returncode == 0, loose.stdout


@pytest.mark.slow
def test_json_output(runs: dict[str, Any]) -> None:
    proc = harness("compare", runs["slow"][:17], "--baseline", runs["base"], "--db", runs["db"], "--json")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["regression"] is True
    assert result["baseline"]["run_id"] == runs["base"] and result["baseline"]["source"] == "run"
    assert result["current"]["run_id"] == runs["slow"]
    total = result["rows"][-1]
    assert total["scope"] == "total"
    assert total["current"]["p95_ms"] > 2 * total["baseline"]["p95_ms"]
    assert total["delta"]["p95_pct"] > 100
    assert {(r["group"], r["name"]) for r in result["rows"][:-1]} == {("browse", "home"), ("browse", "json")}
    assert result["limits"] == {"p95_pct": 20.0, "p99_pct": 20.0, "error_rate_pp": 5.0, "zero_floor_ms": 1.0}


@pytest.mark.slow
def test_marked_baseline_is_the_default(runs: dict[str, Any]) -> None:
    db = runs["db"]
    one_line_error(harness("compare", runs["slow"], "--db", db), "no baseline marked for profile 'smoke'")
    marked = harness("runs", "--db", db, "--mark-baseline", runs["base"])
    assert marked.returncode == 0, marked.stderr
    assert f"run {runs['base']} is now the baseline of profile 'smoke'" in marked.stdout
    listed = json.loads(harness("runs", "--db", db, "--json").stdout)
    assert {r["id"]: r["baseline"] for r in listed} == {
        runs["base"]: True,
        runs["repeat"]: False,
        runs["slow"]: False,
    }
    assert "★" in harness("runs", "--db", db).stdout

    assert harness("compare", runs["slow"], "--db", db).returncode == 1
    repeat = harness("compare", runs["repeat"], "--db", db, "--json")
    assert repeat.returncode == 0, repeat.stdout
    assert json.loads(repeat.stdout)["baseline"] == {
        "source": "marked",
        "label": runs["base"],
        "run_id": runs["base"],
        "profile": "smoke",
        "status": "passed",
    }


@pytest.mark.slow
def test_bad_input_is_exit_2(runs: dict[str, Any], tmp_path: Path) -> None:
    db = runs["db"]
    one_line_error(harness("compare", "nosuchrun", "--baseline", runs["base"], "--db", db), "no run matches")
    one_line_error(harness("compare", runs["slow"], "--baseline", "nosuchrun", "--db", db), "'nosuchrun'")
    one_line_error(
        harness("compare", runs["slow"], "--baseline", str(tmp_path / "missing.json"), "--db", db),
        "no such file",
    )
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    one_line_error(harness("compare", runs["slow"], "-b", str(garbage), "--db", db), "not valid JSON")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"p95": 3}))
    one_line_error(
        harness("compare", runs["slow"], "-b", str(other), "--db", db), "not a harness summary.json"
    )
    one_line_error(harness("compare", runs["slow"], "-b", runs["base"], "--db", db, "--p95", "lots"), "--p95")
    one_line_error(
        harness("compare", runs["slow"], "-b", runs["base"], "--db", db, "--error-rate", "-3"), "--error-rate"
    )
    one_line_error(harness("runs", "--db", db, "--mark-baseline", "nosuchrun"), "no run matches")
    one_line_error(harness("compare", runs["slow"], "--db", str(tmp_path / "none.db")), "no database at")
