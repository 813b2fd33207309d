"""Several panel processes as one panel (issue #10 item 3): two gunicorn processes share a Redis message
queue and a PostgreSQL store, as a team's deployment would. A run started on one is watched, scaled
and stopped from the other; a client joining on the other gets the same recent ticks; when the owner
dies its run stops looking active everywhere within seconds."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import requests
import yaml

from harness.store import Store
from tests.clitools import free_port, wait_for
from tests.paneltools import (
    TickClient,
    redis_server,
    start_gunicorn,
    stop_gunicorn,
    wait_until_up,
)
from tests.pgtools import embedded_postgres, new_database
from tests.test_run import recorder_profile

TOKEN = "cluster-test-token"
PASSWORD = "Cl-pg-81f0"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
_DOC = {**recorder_profile(users=2), "name": "cluster-rec", "duration": "60s"}
_DOC["groups"]["paced"] = {"simulator": "tests.sims:Recorder", "arrival_rate": 4}
PROFILE = yaml.safe_dump(_DOC)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Redis server and a PostgreSQL database, as a team's panels share them."""
    base = tmp_path_factory.mktemp("cluster")
    with embedded_postgres(base / "pgdata", "team", PASSWORD) as admin, redis_server(base / "redis") as queue:
        yield {"db": new_database(admin, "team", PASSWORD), "queue": queue}


@pytest.fixture
def panels(shared: dict[str, str], tmp_path: Path) -> Iterator[list[tuple[str, Any]]]:
    """Two gunicorn panel processes (the README's command) with the same queue, store, token and key."""
    env = {
        "HARNESS_DB": shared["db"],
        "HARNESS_MESSAGE_QUEUE": shared["queue"],
        "HARNESS_TOKEN": TOKEN,
        "HARNESS_SECRET_KEY": "cluster-test-secret",
        "HOME": str(tmp_path),
    }
    procs = []
    try:
        for _ in range(2):
            port = free_port()
            procs.append((f"http://127.0.0.1:{port}/", start_gunicorn(port, env)))
        for url, proc in procs:
            wait_until_up(url, proc)
        yield procs
    finally:
        for _url, proc in procs:
            stop_gunicorn(proc)


def _get(url: str, path: str) -> Any:
    response = requests.get(url + path, headers=AUTH, timeout=10)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.json()


def _post(url: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
    return requests.post(url + path, json=body or {}, headers=AUTH, timeout=15)


def _row(url: str, run_id: str) -> dict[str, Any]:
    rows = [r for r in _get(url, "api/runs")["runs"] if r["id"] == run_id]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.slow
def test_a_run_on_one_panel_process_is_watched_scaled_and_stopped_from_another(
    panels: list[tuple[str, Any]], shared: dict[str, str]
) -> None:
    (a, _proc_a), (b, _proc_b) = panels
    keys = redis.Redis.from_url(shared["queue"], decode_responses=True)
    started = _post(a, "api/runs", {"yaml": PROFILE})
    assert started.status_code == 201, started.text
    run_id = started.json()["run_id"]
    clients: list[TickClient] = []
    try:
        # a client on B hears A's ticks live (the message queue) ...
        live_b = TickClient(b, run_id, TOKEN)
        clients.append(live_b)
        wait_for(lambda: len(live_b.ticks) >= 3, what="ticks on B")
        assert live_b.joined_msg is not None and live_b.joined_msg["status"] in ("starting", "running")
        assert {t["run_id"] for t in live_b.ticks} == {run_id}
        # ... and one that joins B late gets the same recent ticks as one joining A
        late_b, late_a = TickClient(b, run_id, TOKEN), TickClient(a, run_id, TOKEN)
        clients += [late_b, late_a]
        for c in (late_a, late_b):
            assert c.joined.wait(10)
        ticks_a = [t["t"] for t in late_a.joined_msg["ticks"]]  # type: ignore[index]
        ticks_b = [t["t"] for t in late_b.joined_msg["ticks"]]  # type: ignore[index]
        assert len(ticks_b) >= 3 and late_b.joined_msg["status"] == "running"  # type: ignore[index]
        # the two snapshots were taken a moment apart: equal but for a tick at either end
        assert set(ticks_a[1:-1]) <= set(ticks_b) and set(ticks_b[1:-1]) <= set(ticks_a)

        # B's API shows A's run as active, with its live tick and group state
        row = _row(b, run_id)
        assert row["active"] is True and row["status"] == "running"
        detail = _get(b, f"api/runs/{run_id}")
        assert detail["run"]["active"] is True and detail["summary"] is None
        assert detail["live"] is not None and "rec" in detail["live"]["groups"]
        assert detail["groups"]["rec"]["mode"] == "closed" and detail["groups"]["paced"]["mode"] == "open"

        # scaling from B: checked against the run's groups on B, carried out by A
        wrong = _post(b, f"api/runs/{run_id}/groups/rec", {"rate": 3})
        assert wrong.status_code == 400 and wrong.json()["field"] == "rate"
        missing = _post(b, f"api/runs/{run_id}/groups/nope", {"users": 1})
        assert missing.status_code == 400 and missing.json()["field"] == "group"
        scaled = _post(b, f"api/runs/{run_id}/groups/rec", {"users": 5})
        assert scaled.status_code == 202, scaled.text
        wait_for(
            lambda: _get(a, f"api/runs/{run_id}")["groups"]["rec"]["target"] == 5, what="A holding rec at 5"
        )
        wait_for(
            lambda: _get(b, f"api/runs/{run_id}")["groups"]["rec"]["target"] == 5, what="B seeing rec at 5"
        )
        wait_for(lambda: _get(b, f"api/runs/{run_id}")["live"]["groups"]["rec"]["users"] == 5, what="5 users")
        scaled = _post(b, f"api/runs/{run_id}/groups/paced", {"rate": 7.5})
        assert scaled.status_code == 202, scaled.text
        wait_for(
            lambda: _get(a, f"api/runs/{run_id}")["groups"]["paced"]["target"] == 7.5, what="paced at 7.5"
        )

        # stopping from B
        stopped = _post(b, f"api/runs/{run_id}/stop")
        assert stopped.status_code == 202, stopped.text
        final = wait_for(lambda: live_b.final_status(run_id), what="the final status on B")
        assert final["status"] == "aborted" and final["exit_code"] == 3
        row = wait_for(lambda: not (r := _row(b, run_id))["active"] and r, what="the run recorded as ended")
        assert row["active"] is False and row["status"] == "aborted" and row["requests"] > 0
        assert _post(b, f"api/runs/{run_id}/stop").status_code == 409
        assert _post(a, f"api/runs/{run_id}/stop").status_code == 409
        assert keys.exists(f"harness:run:{run_id}", f"harness:ticks:{run_id}") == 0

        # the timeline says who did what, and that it came through the other process
        events = _get(a, f"api/runs/{run_id}/events")["events"]
        scaled_ev = [e for e in events if e["type"] == "scaled_manually"]
        assert [
            (e["group"], json.loads(e["detail"])["value"])
            if isinstance(e["detail"], str)
            else (e["group"], e["detail"]["value"])
            for e in scaled_ev
        ] == [("rec", 5.0), ("paced", 7.5)]
        details = [
            e["detail"] if isinstance(e["detail"], dict) else json.loads(e["detail"]) for e in scaled_ev
        ]
        assert all("via another panel process" in d["who"] for d in details)
        stop_ev = [e for e in events if e["type"] == "run_stopped"]
        assert len(stop_ev) == 1
    finally:
        for c in clients:
            c.close()
    store = Store(shared["db"])
    try:
        run = store.get_run(run_id)
        assert run is not None and run.status == "aborted" and run.reason.startswith("stopped by panel")
    finally:
        store.close()


@pytest.mark.slow
def test_a_dead_owner_stops_looking_active(panels: list[tuple[str, Any]], shared: dict[str, str]) -> None:
    (a, proc_a), (b, _proc_b) = panels
    started = _post(a, "api/runs", {"yaml": PROFILE})
    assert started.status_code == 201, started.text
    run_id = started.json()["run_id"]
    wait_for(lambda: _row(b, run_id)["active"], what="the run active on B")
    wait_for(lambda: _row(b, run_id)["status"] == "running", what="the run's first second stored")
    # the whole of A dies at once (gunicorn's master and its worker): nothing answers for the run
    master = psutil.Process(proc_a.pid)
    gunicorn_worker = master.children()
    run_workers = [p for w in gunicorn_worker for p in w.children(recursive=True)]
    assert run_workers, "the run's worker processes"
    for process in [master, *gunicorn_worker]:
        process.send_signal(signal.SIGKILL)
    proc_a.wait(timeout=10)
    wait_for(lambda: not _row(b, run_id)["active"], timeout=15, what="the run no longer active on B")
    refused = _post(b, f"api/runs/{run_id}/stop")
    assert refused.status_code == 409, refused.text
    # B concludes the controller died (same host: its pid is gone) and records the run as aborted
    row = wait_for(
        lambda: (r := _row(b, run_id))["status"] == "aborted" and r, what="the run recorded as aborted"
    )
    assert row["reason"] == "controller died (found by a later start or panel)" and row["exit_code"] == 3
    # the run's own workers stop by themselves when their controller is gone
    _gone, alive = psutil.wait_procs(run_workers, timeout=20)
    assert not alive, alive


def _stored_count(store: Store, run_id: str) -> int:
    rows = store.rows('SELECT COALESCE(SUM(count), 0) AS n FROM "window" WHERE run_id=:r', r=run_id)
    return int(rows[0]["n"])


@pytest.mark.slow
def test_a_lost_message_queue_does_not_stop_a_run(tmp_path: Path) -> None:
    """Redis going away mid-run: the run goes on and is recorded, and its own panel still stops it."""
    with redis_server(tmp_path / "redis") as queue:
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        env = {"HARNESS_DB": str(tmp_path / "h.db"), "HARNESS_MESSAGE_QUEUE": queue, "HARNESS_TOKEN": TOKEN}
        proc = start_gunicorn(port, env)
        try:
            wait_until_up(url, proc)
            started = _post(url, "api/runs", {"yaml": PROFILE})
            assert started.status_code == 201, started.text
            run_id = started.json()["run_id"]
            wait_for(lambda: _row(url, run_id)["status"] == "running", what="a stored second")
            redis.Redis.from_url(queue).shutdown(nosave=True)
        except BaseException:
            stop_gunicorn(proc)
            raise
    try:
        store = Store(tmp_path / "h.db")
        before = _stored_count(store, run_id)
        time.sleep(3)
        assert _stored_count(store, run_id) > before  # still running, still recorded
        assert _row(url, run_id)["active"] is True
        stopped = _post(url, f"api/runs/{run_id}/stop")
        assert stopped.status_code == 202, stopped.text
        row = wait_for(lambda: not (r := _row(url, run_id))["active"] and r, what="the run ended")
        assert row["status"] == "aborted" and row["requests"] > before
        store.close()
    finally:
        stop_gunicorn(proc)
