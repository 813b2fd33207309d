"""Report files recomputed from the database: Locust-style CSVs, JUnit XML, summary.json and HTML
through `harness report`, on hand-built stores (exact values) and on a real run."""

from __future__ import annotations

import csv
import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from harness.metrics import new_histogram
from harness.report.csv import history_rows, stats_rows, write_history_csv, write_stats_csv
from harness.report.junit import write_junit
from harness.store import Run, Store
from tests.clitools import harness as run_cli

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000
PERCENTILES = ["50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]
STATS_HEADER = [
    "Type", "Name", "Group", "Request Count", "Failure Count", "Median Response Time",
    "Average Response Time", "Min Response Time", "Max Response Time", "Average Content Size",
    "Requests/s", "Failures/s", *PERCENTILES,
]  # fmt: skip
HISTORY_HEADER = [
    "Timestamp", "User Count", "Type", "Name", "Group", "Requests/s", "Failures/s", *PERCENTILES,
    "Total Request Count", "Total Failure Count", "Total Median Response Time",
    "Total Average Response Time", "Total Min Response Time", "Total Max Response Time",
    "Total Average Content Size",
]  # fmt: skip


def harness(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=timeout)


def encode(values_ms: list[float]) -> bytes:
    h = new_histogram()
    for v in values_ms:
        h.record_value(max(1, int(v * 1000)))
    encoded: bytes = h.encode()
    return encoded


def expected(values_ms: list[float]) -> dict[str, float]:
    """What the CSV must say for these latencies: HdrHistogram's own values, in ms, to 3 decimals."""
    h = new_histogram()
    for v in values_ms:
        h.record_value(max(1, int(v * 1000)))
    points = [50, 66, 75, 80, 90, 95, 98, 99, 99.9, 99.99, 100]
    values = h.get_percentile_to_value_dict(points)
    out = {f"{p:g}%": round(values[p] / 1000, 3) for p in points}
    out["mean"] = round(h.get_mean_value() / 1000, 3)
    out["min"] = round(h.get_min_value() / 1000, 3)
    out["max"] = round(h.get_max_value() / 1000, 3)
    return out


def window(
    s: int, name: str, values: list[float], failures: int = 0, received: int = 0, kind: str = "http"
) -> dict[str, Any]:
    return {
        "t": T0 + s,
        "group": "g",
        "name": name,
        "kind": kind,
        "count": len(values),
        "failures": failures,
        "bytes_received": received,
        "hist": encode(values),
    }


HOME = ([1, 2, 3, 4], [10, 20])
JSON = [5, 5, 5]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A 10-second run: g/home in seconds 0 and 2, g/json in second 1, two iteration errors in second 1;
    users 2, 4 (two workers), 3."""
    store = Store(tmp_path / "r.db")
    store.create_run(Run(id="run-1", profile="p", started_at=T0 + 0.5, ended_at=T0 + 10.5, status="passed"))

    def health(s: int, *users: int) -> list[dict[str, Any]]:
        return [{"t": T0 + s + 1.2, "group": "g", "worker": i, "users": u} for i, u in enumerate(users)]

    store.write_second("run-1", [window(0, "home", HOME[0], 1, 100)], [], [], [], health(0, 2), [], [])
    store.write_second(
        "run-1",
        [window(1, "json", JSON, 0, 30), window(1, "(iteration)", [0, 0], 2, kind="error")],
        [{"group": "g", "name": "(iteration)", "message": "ValueError: boom", "count": 2, "t": T0 + 1}],
        [],
        [],
        health(1, 2, 2),
        [],
        [],
    )
    store.write_second("run-1", [window(2, "home", HOME[1], 0, 50)], [], [], [], health(2, 3), [], [])
    return store


def read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_stats_csv_exact_values(store: Store, tmp_path: Path) -> None:
    header, rows = read(write_stats_csv(store, "run-1", tmp_path / "out" / "stats.csv"))
    assert header == STATS_HEADER
    assert [(r["Type"], r["Group"], r["Name"]) for r in rows] == [
        ("error", "g", "(iteration)"),
        ("http", "g", "home"),
        ("http", "g", "json"),
        ("", "", "Aggregated"),
    ]
    home = rows[1]
    want = expected(HOME[0] + HOME[1])  # merged across seconds: exact, not averaged
    assert home["Request Count"] == "6" and home["Failure Count"] == "1"
    assert float(home["Median Response Time"]) == want["50%"]
    assert float(home["Average Response Time"]) == want["mean"]
    assert float(home["Min Response Time"]) == want["min"] and float(home["Max Response Time"]) == want["max"]
    assert float(home["Average Content Size"]) == 25.0
    assert float(home["Requests/s"]) == pytest.approx(0.6) and float(home["Failures/s"]) == pytest.approx(0.1)
    for col in PERCENTILES:
        assert float(home[col]) == want[col], col

    aggregated = rows[-1]
    want_all = expected(HOME[0] + HOME[1] + JSON)
    # like summary.json's totals: iteration errors add failures, not requests
    assert aggregated["Request Count"] == "9" and aggregated["Failure Count"] == "3"
    assert float(aggregated["Average Content Size"]) == round(180 / 9, 3)
    for col in PERCENTILES:
        assert float(aggregated[col]) == want_all[col], col
    assert float(aggregated["Average Response Time"]) == want_all["mean"]


def test_stats_match_the_summary(store: Store) -> None:
    from harness.report import summarize

    run = store.get_run("run-1")
    assert run is not None
    summary = summarize(store, run)
    rows = {(r["Group"], r["Name"]): r for r in stats_rows(store, "run-1")}
    for e in summary["endpoints"]:
        row = rows[(e["group"], e["name"])]
        assert row["Request Count"] == e["requests"] and row["Failure Count"] == e["failures"]
        assert row["95%"] == e["p95_ms"] and row["99%"] == e["p99_ms"] and row["100%"] == e["max_ms"]
        assert row["Average Response Time"] == e["mean_ms"]
    agg = rows[("", "Aggregated")]
    assert agg["Request Count"] == summary["totals"]["requests"]
    assert agg["Failure Count"] == summary["totals"]["failures"]
    assert agg["50%"] == summary["totals"]["p50_ms"] and agg["99%"] == summary["totals"]["p99_ms"]


def test_history_csv_per_second_and_cumulative(store: Store, tmp_path: Path) -> None:
    header, rows = read(write_history_csv(store, "run-1", tmp_path / "history.csv"))
    assert header == HISTORY_HEADER
    keys = [(int(r["Timestamp"]) - T0, r["Name"]) for r in rows]
    assert keys == [
        (0, "home"),
        (0, "Aggregated"),
        (1, "(iteration)"),
        (1, "home"),
        (1, "json"),
        (1, "Aggregated"),
        (2, "(iteration)"),
        (2, "home"),
        (2, "json"),
        (2, "Aggregated"),
    ]
    by = {(int(r["Timestamp"]) - T0, r["Name"]): r for r in rows}
    assert [by[(s, "Aggregated")]["User Count"] for s in range(3)] == ["2", "4", "3"]
    first = by[(0, "home")]
    assert first["Requests/s"] == "4" and first["Failures/s"] == "1"
    assert float(first["50%"]) == expected(HOME[0])["50%"]
    idle = by[(1, "home")]  # no requests of home in second 1: Locust's N/A, totals carried on
    assert idle["Requests/s"] == "0" and idle["50%"] == "N/A" and idle["100%"] == "N/A"
    assert idle["Total Request Count"] == "4" and idle["Total Failure Count"] == "1"
    last = by[(2, "home")]
    want = expected(HOME[0] + HOME[1])
    assert last["Total Request Count"] == "6"
    assert float(last["Total Median Response Time"]) == want["50%"]
    assert float(last["Total Average Response Time"]) == want["mean"]
    assert float(last["Total Max Response Time"]) == want["max"]
    assert float(last["Total Average Content Size"]) == 25.0
    assert float(last["100%"]) == expected(HOME[1])["100%"]
    agg = by[(2, "Aggregated")]
    assert agg["Total Request Count"] == "9" and agg["Total Failure Count"] == "3"
    assert float(agg["Total Median Response Time"]) == expected(HOME[0] + HOME[1] + JSON)["50%"]
    assert by[(1, "Aggregated")]["Requests/s"] == "3" and by[(1, "Aggregated")]["Failures/s"] == "2"


def test_history_of_an_empty_run_is_only_a_header(tmp_path: Path) -> None:
    store = Store(tmp_path / "e.db")
    store.create_run(Run(id="empty", profile="p", started_at=T0))
    assert history_rows(store, "empty") == []
    header, rows = read(write_history_csv(store, "empty", tmp_path / "h.csv"))
    assert header == HISTORY_HEADER and rows == []
    assert [r["Name"] for r in stats_rows(store, "empty")] == ["Aggregated"]


# -- JUnit -------------------------------------------------------------------------------------
def summary(status: str = "passed", thresholds: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "run_id": "run-1",
        "profile": "checkout",
        "status": status,
        "reason": "controller died" if status == "aborted" else "",
        "started_at": "2026-11-22T20:02:28.123Z",
        "ended_at": "2026-11-22T20:02:58.456Z",
        "duration_s": 30.333,
        "totals": {"requests": 10, "failures": 1, "p95_ms": 12.5, "intended": {"p99_ms": 3}},
        "thresholds": thresholds or [],
    }


def suite_of(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    return suites[0]


def test_junit_one_testcase_per_threshold(tmp_path: Path) -> None:
    thresholds = [
        {"expr": "p95 < 10ms", "value": 12.5, "ok": False, "abort": False},
        {"expr": "error_rate < 20%", "value": 0.1, "ok": True},
        {"expr": "p99[api] < 1s", "value": None, "ok": False},
    ]
    suite = suite_of(write_junit(summary(thresholds=thresholds), tmp_path / "j" / "junit.xml"))
    assert suite.get("name") == "harness thresholds"
    assert suite.get("tests") == "3" and suite.get("failures") == "2" and suite.get("errors") == "0"
    assert suite.get("time") == "30.333" and suite.get("timestamp") == "2026-11-22T20:02:28"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["p95 < 10ms", "error_rate < 20%", "p99[api] < 1s"]
    assert all(c.get("classname") == "harness.checkout" and c.get("time") for c in cases)
    failure = cases[0].find("failure")
    assert failure is not None and failure.get("message") == "value 12.5 violates p95 < 10ms"
    assert cases[1].find("failure") is None
    missing = cases[2].find("failure")
    assert missing is not None and missing.get("message") == "value n/a violates p99[api] < 1s"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["run_id"] == "run-1" and props["status"] == "passed"
    out = suite.find("system-out")
    assert out is not None and "p95_ms=12.5" in (out.text or "")


def test_junit_run_completed_without_thresholds(tmp_path: Path) -> None:
    passed = suite_of(write_junit(summary("passed"), tmp_path / "a.xml"))
    assert [c.get("name") for c in passed.findall("testcase")] == ["run completed"]
    assert passed.get("failures") == "0" and passed.find("testcase/failure") is None

    aborted = suite_of(write_junit(summary("aborted"), tmp_path / "b.xml"))
    failure = aborted.find("testcase/failure")
    assert aborted.get("failures") == "1"
    assert failure is not None and failure.get("message") == "run aborted: controller died"

    # an aborted run is never green, even when its (partial) thresholds passed
    ok = [{"expr": "p95 < 1s", "value": 3.0, "ok": True}]
    both = suite_of(write_junit(summary("aborted", ok), tmp_path / "c.xml"))
    assert [c.get("name") for c in both.findall("testcase")] == ["p95 < 1s", "run completed"]
    assert both.get("failures") == "1"


# -- harness report on a real run ---------------------------------------------------------------
@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("report")
    db, report = tmp / "h.db", tmp / "run"
    proc = harness(
        "start", "--profile", "smoke", "--headless", "--quiet", "--duration", "4s",
        "--db", str(db), "--report-dir", str(report), "--set", "thresholds=[]",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((report / "summary.json").read_text())
    return {"db": str(db), "dir": tmp, "report": report, "summary": summary, "run_id": summary["run_id"]}


@pytest.mark.slow
def test_report_csv_of_a_real_run(real: dict[str, Any]) -> None:
    out = real["dir"] / "csv"
    proc = harness("report", real["run_id"], "--format", "csv", "--out", str(out), "--db", real["db"])
    assert proc.returncode == 0, proc.stderr
    for name in ("stats.csv", "stats_history.csv", "failures.csv"):
        assert f"wrote {out / name}" in proc.stdout
    header, rows = read(out / "stats.csv")
    assert header == STATS_HEADER
    totals = real["summary"]["totals"]
    agg = rows[-1]
    assert agg["Name"] == "Aggregated" and int(agg["Request Count"]) == totals["requests"] > 0
    assert float(agg["95%"]) == totals["p95_ms"] and float(agg["99%"]) == totals["p99_ms"]
    assert {(r["Group"], r["Name"]): int(r["Request Count"]) for r in rows[:-1]} == {
        (e["group"], e["name"]): e["requests"] for e in real["summary"]["endpoints"]
    }
    header, history = read(out / "stats_history.csv")
    assert header == HISTORY_HEADER
    aggregated = [r for r in history if r["Name"] == "Aggregated"]
    stamps = [int(r["Timestamp"]) for r in aggregated]
    assert stamps == list(range(stamps[0], stamps[-1] + 1))
    assert sum(int(r["Requests/s"]) for r in aggregated) == totals["requests"]
    assert int(aggregated[-1]["Total Request Count"]) == totals["requests"]
    assert max(int(r["User Count"]) for r in aggregated) == 10
    header, _ = read(out / "failures.csv")
    assert header == ["Method", "Name", "Group", "Error", "Occurrences"]

    # a .csv path: the stats there, the others next to it
    named = real["dir"] / "named" / "smoke.csv"
    proc = harness("report", real["run_id"], "-f", "csv", "-o", str(named), "--db", real["db"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in named.parent.iterdir()) == [
        "smoke.csv",
        "smoke_failures.csv",
        "smoke_history.csv",
    ]


@pytest.mark.slow
def test_report_json_and_junit_of_a_real_run(real: dict[str, Any]) -> None:
    path = real["dir"] / "again.json"
    proc = harness("report", real["run_id"][:15], "-f", "json", "-o", str(path), "--db", real["db"])
    assert proc.returncode == 0, proc.stderr
    again = json.loads(path.read_text())
    assert again["totals"] == real["summary"]["totals"]
    assert again["endpoints"] == real["summary"]["endpoints"]
    assert again["status"] == "passed" and again["report_dir"] == real["summary"]["report_dir"]

    # no --out: the run's own report folder
    proc = harness("report", real["run_id"], "-f", "junit", "--db", real["db"])
    assert proc.returncode == 0, proc.stderr
    suite = suite_of(real["report"] / "junit.xml")
    assert [c.get("name") for c in suite.findall("testcase")] == ["run completed"]
    assert suite.get("failures") == "0"


@pytest.mark.slow
def test_report_html_of_a_real_run(real: dict[str, Any]) -> None:
    path = real["dir"] / "html" / "r.html"
    proc = harness("report", real["run_id"], "--format", "html", "--out", str(path), "--db", real["db"])
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {path}" in proc.stdout
    assert "<html" in path.read_text(encoding="utf-8").lower()


def test_report_junit_fails_for_recorded_failed_thresholds(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    store = Store(db)
    recorded = {
        "thresholds": [
            {"expr": "p95 < 1ms", "value": 3.2, "ok": False},
            {"expr": "rps > 0", "value": 5, "ok": True},
        ]
    }
    store.create_run(
        Run(
            id="run-9",
            profile="p",
            started_at=T0,
            ended_at=T0 + 5,
            status="failed",
            summary_json=json.dumps(recorded),
        )
    )
    store.close()
    out = tmp_path / "out"
    proc = harness("report", "run-9", "-f", "junit", "-o", str(out), "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    suite = suite_of(out / "junit.xml")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    failure = suite.find("testcase/failure")
    assert failure is not None and failure.get("message") == "value 3.2 violates p95 < 1ms"


def test_report_bad_input(tmp_path: Path) -> None:
    store = Store(tmp_path / "t.db")
    store.close()
    proc = harness("report", "nosuchrun", "-f", "json", "--db", str(tmp_path / "t.db"))
    assert proc.returncode == 2 and proc.stderr.startswith("harness: error: no run matches"), proc.stderr
    proc = harness("report", "x", "-f", "csv", "--db", str(tmp_path / "none.db"))
    assert proc.returncode == 2 and "no database at" in proc.stderr
