"""The Python API (`harness.open_run`, `harness.list_runs`, `RunData`) on a real run and hand-built
stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import harness
from harness.errors import UsageError
from harness.metrics import new_histogram
from harness.store import Run, Store

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("api")
    db, report = tmp / "h.db", tmp / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    proc = subprocess.run(
        [
            sys.executable, "-m", "harness", "start", "--profile", "smoke", "--headless", "--quiet",
            "--duration", "4s", "--db", str(db), "--report-dir", str(report), "--set", "thresholds=[]",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((report / "summary.json").read_text())
    return {"db": db, "summary": summary, "run_id": summary["run_id"]}


def test_exported_from_the_package() -> None:
    from harness import api

    assert harness.open_run is api.open_run
    assert harness.list_runs is api.list_runs
    assert harness.RunData is api.RunData
    assert {"open_run", "list_runs", "RunData"} <= set(harness.__all__)
    with pytest.raises(AttributeError):
        _ = harness.no_such_thing  # type: ignore[attr-defined]


@pytest.mark.slow
def test_open_the_newest_run_and_read_everything(real: dict[str, Any]) -> None:
    with harness.open_run(db=real["db"]) as run:
        assert run.id == real["run_id"] and run.profile == "smoke" and run.status == "passed"
        assert real["run_id"] in repr(run)
        summary = run.summary()
        assert summary["totals"] == real["summary"]["totals"]
        assert summary["endpoints"] == real["summary"]["endpoints"]
        assert run.thresholds() == []

        rows = run.frame(by="name", window=1)
        try:
            import pandas as pd  # noqa: F401
        except ImportError:
            assert isinstance(rows, list)
            records = rows
        else:
            records = rows.to_dict("records")
            assert "time" in rows.columns
        assert {(r["group"], r["name"]) for r in records} == {("browse", "home"), ("browse", "json")}
        assert sum(r["requests"] for r in records) == summary["totals"]["requests"]
        assert {"t", "users", "rps", "p50_ms", "p95_ms", "p99_ms"} <= set(records[0])
        whole = run.frame(by="run", window=2)
        assert len(whole) <= len(records)

        timeline = run.timeline(window_s=1)
        assert timeline["window_s"] == 1 and timeline["rows"]
        assert sum(r["requests"] for r in timeline["rows"]) == summary["totals"]["requests"]
        assert timeline["degradation"] is None and timeline["capacity"] is None

        assert run.errors() == []
        events = run.events()
        assert events[0]["type"] == "run_started" and events[0]["offset_s"] >= 0
        assert "run_stopped" in [e["type"] for e in events]

        compared = run.compare(baseline=run.id)
        assert compared["regression"] is False

    runs = harness.list_runs(db=real["db"])
    assert [r["id"] for r in runs] == [real["run_id"]]
    assert runs[0]["status"] == "passed" and runs[0]["baseline"] is False
    assert runs[0]["totals"]["requests"] == real["summary"]["totals"]["requests"]
    assert "profile_json" not in runs[0]


@pytest.mark.slow
def test_by_prefix_and_from_harness_db(real: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_DB", str(real["db"]))
    with harness.open_run(real["run_id"][:12]) as run:
        assert run.id == real["run_id"]
    assert len(harness.list_runs()) == 1


def make_store(path: Path) -> Store:
    store = Store(path)
    recorded = {"thresholds": [{"expr": "p95 < 1ms", "value": 3.0, "ok": False}]}
    store.create_run(
        Run(
            id="old-run",
            profile="p",
            started_at=T0,
            ended_at=T0 + 3,
            status="failed",
            summary_json=json.dumps(recorded),
        )
    )
    store.create_run(Run(id="new-run", profile="p", started_at=T0 + 100, ended_at=T0 + 103, status="passed"))
    h = new_histogram()
    h.record_value(2000)
    window = {
        "t": T0 + 100,
        "group": "g",
        "name": "n",
        "kind": "http",
        "count": 1,
        "failures": 1,
        "hist": h.encode(),
    }
    store.write_second(
        "new-run",
        [window],
        [{"group": "g", "name": "n", "message": "HTTP 500", "count": 1, "t": T0 + 100}],
        [],
        [],
        [],
        [{"t": T0 + 100.5, "type": "scaled", "group": "g", "detail": {"users": 3}}],
        [],
    )
    return store


def test_hand_built_store(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    make_store(db).close()
    with harness.open_run(db=db) as newest:
        assert newest.id == "new-run"
        assert newest.errors()[0]["message"] == "HTTP 500"
        assert newest.events() == [
            {"t": T0 + 100.5, "offset_s": 0.5, "type": "scaled", "group": "g", "detail": {"users": 3}}
        ]
        assert newest.summary()["totals"]["failures"] == 1
        newest.mark_baseline()
    with harness.open_run("old-run", db=str(db)) as old:
        assert old.thresholds() == [{"expr": "p95 < 1ms", "value": 3.0, "ok": False}]
        assert old.summary()["thresholds"] == old.thresholds()
        assert old.compare()["baseline"]["run_id"] == "new-run"  # the profile's marked baseline
    listed = {r["id"]: r["baseline"] for r in harness.list_runs(db)}
    assert listed == {"new-run": True, "old-run": False}


def test_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no database at"):
        harness.open_run(db=tmp_path / "missing.db")
    with pytest.raises(UsageError, match="no database at"):
        harness.list_runs(db=tmp_path / "missing.db")
    Store(tmp_path / "empty.db").close()
    with pytest.raises(UsageError, match="no runs in"):
        harness.open_run(db=tmp_path / "empty.db")
    make_store(tmp_path / "a.db").close()
    with pytest.raises(UsageError, match="no run matches 'zzz'"):
        harness.open_run("zzz", db=tmp_path / "a.db")
    with pytest.raises(UsageError, match="no run matches"):  # ambiguous prefix
        harness.open_run("", db=tmp_path / "a.db")
    with harness.open_run(db=tmp_path / "a.db") as run, pytest.raises(UsageError, match="no baseline marked"):
        run.compare()
