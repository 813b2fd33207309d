"""The `results` target and results API over real HTTP on 127.0.0.1: the original results server's request
sequence (run-local-test.ts, the browser client, process-test-results.js), its status codes and bodies,
tests as runs in the harness database, a harness run taking data points, `RunBackend`, CORS and the
InfluxDB export checked line by line by a small receiving server."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from pydantic import ValidationError

from harness.store import Run, Store
from harness.targets.results import (
    FAMILIES,
    INFLUX_WRITER,
    InfluxWriter,
    ResultsConfig,
    RunBackend,
    StoreBackend,
    add_results_routes,
    build_app,
    influx_lines,
    influx_write_url,
)
from harness.targets.service import SERVICE_MODEL

ID = re.compile(r"^(\d{13})-[A-Za-z0-9]{6}$")


class Background:
    """An event loop in a thread serving aiohttp apps on 127.0.0.1, and a requests session for them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="results-test", daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []
        self.session = requests.Session()
        self.session.trust_env = False  # never through a proxy from the environment

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def serve(self, app: web.Application) -> str:
        async def start() -> int:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.runners.append(runner)
            return int(runner.addresses[0][1])

        return f"http://127.0.0.1:{self.call(start())}"

    def stop(self, app: web.Application) -> None:
        """Clean one app up now (closing its backend and flushing its Influx writer)."""
        runner = next(r for r in self.runners if r.app is app)
        self.runners.remove(runner)
        self.call(runner.cleanup())

    def close(self) -> None:
        self.session.close()
        for runner in reversed(self.runners):
            self.call(runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def bg() -> Iterator[Background]:
    background = Background()
    try:
        yield background
    finally:
        background.close()


class Client:
    """The results API as the original's scripts and browser client call it."""

    def __init__(self, bg: Background, url: str) -> None:
        self.bg = bg
        self.url = url

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        if body is not None:
            kwargs["json"] = body
        return self.bg.session.request(method, f"{self.url}{path}", **kwargs)

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        response = self.call(method, path, body, **kwargs)
        assert response.status_code == 200, (method, path, response.status_code, response.text)
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        return response.json()

    def refused(self, method: str, path: str, status: int, body: Any = None) -> dict[str, Any]:
        response = self.call(method, path, body)
        assert response.status_code == status, (method, path, response.status_code, response.text)
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        answer: dict[str, Any] = response.json()
        return answer


def peer_metrics(n: int, with_latency: bool = True) -> dict[str, Any]:
    """A data point as the original client's buildCatalystPeerStatsData makes it."""
    metrics: dict[str, Any] = {}
    for i, family in enumerate(FAMILIES):
        base = n * 100 + i
        metrics[family] = base
        metrics[f"{family}Total"] = base * 10
        metrics[f"{family}PerSecond"] = base / 2
        metrics[f"{family}Bytes"] = base * 50
        metrics[f"{family}TotalBytes"] = base * 500
        metrics[f"{family}BytesPerSecond"] = base * 25.5
        metrics[f"{family}AveragePacketSize"] = 50
    metrics["connectedPeers"] = [f"peer-{k}" for k in range(3) if k != n]
    metrics["knownPeersCount"] = 2
    metrics["position"] = [1.5 + n, 0, -3.25]
    if with_latency:
        metrics["averageLatency"] = 12.5
    return metrics


def results_app(tmp_path: Path, **config: Any) -> web.Application:
    return build_app(
        ResultsConfig.model_validate({"db": str(tmp_path / "harness.db"), "service_time": 0, **config})
    )


def influx_receiver(status: int = 204) -> tuple[web.Application, list[dict[str, Any]]]:
    """A stand-in InfluxDB that records every write."""
    received: list[dict[str, Any]] = []

    async def write(request: web.Request) -> web.Response:
        received.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "content_type": request.headers.get("Content-Type"),
                "body": await request.text(),
            }
        )
        return web.Response(status=status, text="" if status < 400 else "database not found: comms")

    app = web.Application()
    app.router.add_post("/write", write)
    app.router.add_post("/custom/api/write", write)
    return app, received


# --- the Influx line format -----------------------------------------------------------------------


def test_influx_lines_follow_the_original_layout() -> None:
    metrics = peer_metrics(1)
    lines = influx_lines("1700000000000-AbC123", "peer-1", metrics, 1_700_000_000_123)
    header = "test-1700000000000-AbC123,peer=peer-1"
    assert len(lines) == 8
    assert lines[0] == (
        f"{header} sentCount=100,sentBytes=5000,sentTotal=1000,sentTotalBytes=50000,"
        "sentPerSecond=50,sentBytesPerSecond=2550 1700000000123"
    )
    assert lines[1] == (
        f"{header} receivedCount=101,receivedBytes=5050,receivedTotal=1010,receivedTotalBytes=50500,"
        "receivedPerSecond=50.5,receivedBytesPerSecond=2575.5 1700000000123"
    )
    assert [line.split(" ")[1].split("Count=")[0] for line in lines[:7]] == list(FAMILIES)
    assert lines[7] == f"{header} x=2.5,y=-3.25,knownPeers=2,latency=12.5 1700000000123"

    # Missing numbers are 0; latency only when truthy, as `averageLatency ? ... : ""`.
    bare = influx_lines("t", "p", {"sent": 3}, 5)
    assert bare[0] == (
        "test-t,peer=p sentCount=3,sentBytes=0,sentTotal=0,sentTotalBytes=0,"
        "sentPerSecond=0,sentBytesPerSecond=0 5"
    )
    assert bare[7] == "test-t,peer=p x=0,y=0,knownPeers=0 5"
    assert influx_lines("t", "p", {"averageLatency": 0, "position": [1, 2]}, 5)[7] == (
        "test-t,peer=p x=1,y=0,knownPeers=0 5"
    )
    # Line-protocol escaping of the measurement, the tag value and (through the test id) nothing else.
    odd = influx_lines("a b,c", "p=1 x,y", {}, 7)
    assert odd[7] == r"test-a\ b\,c,peer=p\=1\ x\,y x=0,y=0,knownPeers=0 7"
    assert influx_lines("t", "p", {"sent": float("nan"), "all": True, "relayed": "x"}, 1)[0].startswith(
        "test-t,peer=p sentCount=0,"
    )


def test_influx_write_url_like_the_original() -> None:
    assert influx_write_url("http://127.0.0.1:8086/") == "http://127.0.0.1:8086/write?db=comms&precision=ms"
    assert influx_write_url("http://127.0.0.1:8086") == "http://127.0.0.1:8086/write?db=comms&precision=ms"
    full = "http://127.0.0.1:8086/write?db=other&precision=ms"
    assert influx_write_url(full) == full
    assert influx_write_url("http://127.0.0.1:1/api/v2/write") == "http://127.0.0.1:1/api/v2/write"


# --- the original's request sequence --------------------------------------------------------------


def test_run_local_test_sequence(bg: Background, tmp_path: Path) -> None:
    influx_app, received = influx_receiver()
    influx_url = bg.serve(influx_app) + "/"
    app = results_app(tmp_path, results_dir=str(tmp_path / "results"), influx_url=influx_url)
    api = Client(bg, bg.serve(app))
    assert api.ok("GET", "/status") == {"status": "ok"}

    # run-local-test.ts: POST /test {started: true}
    before = int(time.time() * 1000)
    created = api.ok("POST", "/test", {"started": True})
    after = int(time.time() * 1000)
    match = ID.match(created["id"])
    assert match is not None, created
    assert before <= int(match.group(1)) <= after and created["started"] == int(match.group(1))
    test_id = created["id"]

    # the client polls GET /test/{id} until started
    assert api.ok("GET", f"/test/{test_id}") == {
        "id": test_id,
        "started": created["started"],
        "finished": None,
    }

    # peers PUT their metrics every stats interval
    points = []
    for round_ in range(2):
        for n in range(3):
            metrics = peer_metrics(n, with_latency=round_ == 1)
            point = api.ok("PUT", f"/test/{test_id}/peer/peer-{n}/metrics", metrics)
            assert set(point) == {"peerId", "timestamp", "metrics"}
            assert point["peerId"] == f"peer-{n}" and point["metrics"] == metrics
            assert created["started"] <= point["timestamp"] <= int(time.time() * 1000)
            points.append(point)
    result = api.ok("PUT", f"/test/{test_id}/peer/peer-0/results", {"delivered": 17, "lost": 1})
    assert result["delivered"] == 17 and result["lost"] == 1 and isinstance(result["timestamp"], int)
    later = api.ok("PUT", f"/test/{test_id}/peer/peer-0/results", {"delivered": 20})
    topology = api.ok("PUT", f"/test/{test_id}/topology", {"peer-0": ["peer-1"], "peer-1": ["peer-0"]})
    assert topology == {"id": test_id, "started": created["started"]}

    # process-test-results.js: GET ?dataPoints=true
    whole = api.ok("GET", f"/test/{test_id}", params={"dataPoints": "true"})
    assert list(whole) == ["id", "dataPoints", "started", "finished", "topologyDataPoints", "results"]
    assert whole["id"] == test_id and whole["started"] == created["started"] and whole["finished"] is None
    assert whole["dataPoints"] == points
    assert whole["results"] == {"peer-0": later}
    assert [t["topology"] for t in whole["topologyDataPoints"]] == [
        {"peer-0": ["peer-1"], "peer-1": ["peer-0"]}
    ]
    assert api.ok("GET", f"/test/{test_id}", params={"dataPoints": "false"}) == {
        "id": test_id,
        "started": created["started"],
        "finished": None,
    }

    # run-local-test.ts: PUT finish; the whole test comes back and is written to the results dir
    finished = api.ok("PUT", f"/test/{test_id}/finish")
    assert isinstance(finished["finished"], int) and finished["finished"] >= points[-1]["timestamp"]
    assert finished == {**whole, "finished": finished["finished"]}
    saved = json.loads((tmp_path / "results" / f"{test_id}.json").read_text(encoding="utf-8"))
    assert saved == finished
    assert api.ok("GET", f"/test/{test_id}")["finished"] == finished["finished"]

    # a late peer is refused
    for method, path in (
        ("PUT", f"/test/{test_id}/peer/peer-0/metrics"),
        ("PUT", f"/test/{test_id}/peer/peer-0/results"),
        ("PUT", f"/test/{test_id}/topology"),
        ("PUT", f"/test/{test_id}/finish"),
    ):
        assert api.refused(method, path, 400, peer_metrics(0)) == {"status": "test-already-finished"}

    # every accepted data point went to Influx, as the original's lines, stamped with its timestamp
    bg.call(app[INFLUX_WRITER].flush())
    assert received and all(r["path"] == "/write" for r in received)
    assert all(r["query"] == {"db": "comms", "precision": "ms"} for r in received)
    assert all(r["content_type"] == "csv" for r in received)
    sent = [line for r in received for line in r["body"].split("\n")]
    expected = [
        line for p in points for line in influx_lines(test_id, p["peerId"], p["metrics"], p["timestamp"])
    ]
    assert sent == expected
    assert app[INFLUX_WRITER].stats()["failures"] == 0


def test_a_created_test_waits_for_start(bg: Background, tmp_path: Path) -> None:
    api = Client(bg, bg.serve(results_app(tmp_path)))
    assert api.ok("POST", "/test/my-test") == {"id": "my-test", "started": None}
    assert api.ok("GET", "/test/my-test") == {"id": "my-test", "started": None, "finished": None}
    not_started = {"status": "test-not-started"}
    assert api.refused("PUT", "/test/my-test/peer/p1/metrics", 400, peer_metrics(1)) == not_started
    assert api.refused("PUT", "/test/my-test/peer/p1/results", 400, {}) == not_started
    assert api.refused("PUT", "/test/my-test/topology", 400, {}) == not_started
    assert api.refused("PUT", "/test/my-test/finish", 400) == not_started
    # A falsy `started` (JavaScript's truthiness) does not start it either.
    assert api.ok("POST", "/test/my-test", {"started": 0})["started"] is None
    assert api.ok("POST", "/test/my-test", {"started": ""})["started"] is None

    started = api.ok("PUT", "/test/my-test/start")
    assert set(started) == {"id", "started"} and isinstance(started["started"], int)
    assert api.ok("GET", "/test/my-test")["started"] == started["started"]
    api.ok("PUT", "/test/my-test/peer/p1/metrics", peer_metrics(1))
    assert len(api.ok("GET", "/test/my-test", params={"dataPoints": "true"})["dataPoints"]) == 1

    # POST /test/{id} again replaces the test silently, as the original did.
    again = api.ok("POST", "/test/my-test", {"started": True})
    assert again["started"] >= started["started"]
    assert api.ok("GET", "/test/my-test", params={"dataPoints": "true"})["dataPoints"] == []


def test_unknown_tests_are_404_on_every_route(bg: Background, tmp_path: Path) -> None:
    api = Client(bg, bg.serve(results_app(tmp_path)))
    api.ok("POST", "/test/known", {"started": True})
    for method, path in (
        ("GET", "/test/nope"),
        ("GET", "/test/nope?dataPoints=true"),
        ("PUT", "/test/nope/start"),
        ("PUT", "/test/nope/peer/p/metrics"),
        ("PUT", "/test/nope/peer/p/results"),
        ("PUT", "/test/nope/topology"),
        ("PUT", "/test/nope/finish"),
        ("GET", "/test/know"),  # not a prefix match, unlike `harness show`
    ):
        assert api.refused(method, path, 404, {}) == {"status": "test-not-found"}, (method, path)


def test_cors_and_preflights(bg: Background, tmp_path: Path) -> None:
    api = Client(bg, bg.serve(results_app(tmp_path, concurrency=1, queue_limit=0)))
    api.ok("POST", "/test/t", {"started": True})
    preflight = bg.session.options(
        f"{api.url}/test/t/peer/p/metrics",
        headers={
            "Origin": "http://127.0.0.1:7654",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "PUT" in preflight.headers["Access-Control-Allow-Methods"].split(",")
    assert preflight.headers["Access-Control-Allow-Headers"] == "content-type"
    # Errors carry it too: a route that does not exist, and a wrong method.
    missing = bg.session.get(f"{api.url}/nothing", headers={"Origin": "http://127.0.0.1:7654"})
    assert missing.status_code == 404 and missing.headers["Access-Control-Allow-Origin"] == "*"
    wrong = bg.session.delete(f"{api.url}/test/t/finish")
    assert wrong.status_code == 405 and wrong.headers["Access-Control-Allow-Origin"] == "*"
    # A page may send text/plain (no preflight): the body is still read as JSON.
    plain = api.ok(
        "PUT",
        "/test/t/peer/p/metrics",
        data=json.dumps({"sent": 1}),
        headers={"Content-Type": "text/plain;charset=UTF-8"},
    )
    assert plain["metrics"] == {"sent": 1}


def test_bad_bodies_are_400_with_a_reason(bg: Background, tmp_path: Path) -> None:
    api = Client(bg, bg.serve(results_app(tmp_path)))
    api.ok("POST", "/test/t", {"started": True})
    for path, data in (
        ("/test/t/peer/p/metrics", "{not json"),
        ("/test/t/peer/p/metrics", '{"sent": NaN}'),
        ("/test/t/peer/p/metrics", "[1, 2]"),
        ("/test/t/peer/p/metrics", "42"),
        ("/test/t/peer/p/results", '"text"'),
        ("/test/t/topology", "\xff"),
    ):
        response = bg.session.put(
            f"{api.url}{path}", data=data.encode("latin-1"), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, (path, data, response.text)
        body = response.json()
        assert body["status"] == "bad-request" and body["message"], body
        assert "Traceback" not in response.text
    bad_create = bg.session.post(f"{api.url}/test", data=b"{", headers={"Content-Type": "application/json"})
    assert bad_create.status_code == 400 and bad_create.json()["status"] == "bad-request"
    # Nothing of those was stored; an empty body is `{}` as with express.json.
    assert api.ok("GET", "/test/t", params={"dataPoints": "true"})["dataPoints"] == []
    assert api.ok("PUT", "/test/t/peer/p/metrics")["metrics"] == {}


# --- the database ---------------------------------------------------------------------------------


def test_a_test_is_a_run_in_the_database(bg: Background, tmp_path: Path) -> None:
    db = tmp_path / "harness.db"
    api = Client(bg, bg.serve(results_app(tmp_path, group="browsers")))
    api.ok("POST", "/test/waiting")
    created = api.ok("POST", "/test", {"started": True})
    test_id = created["id"]
    metrics = peer_metrics(0)
    point = api.ok("PUT", f"/test/{test_id}/peer/peer-0/metrics", metrics)
    api.ok("PUT", f"/test/{test_id}/peer/peer-0/results", {"ok": True})
    api.ok("PUT", f"/test/{test_id}/topology", [["peer-0", "peer-1"]])

    store = Store(db)
    try:
        waiting = store.get_run("waiting")
        assert waiting is not None and waiting.status == "created" and waiting.profile == "results-server"
        run = store.get_run(test_id)
        assert run is not None
        assert (run.profile, run.source, run.status, run.ended_at) == (
            "results-server",
            "results API",
            "running",
            None,
        )
        assert round(run.started_at * 1000) == created["started"]
        rows = store.rows(
            'SELECT t, "group", entity, values_json FROM datapoint WHERE run_id=:r ORDER BY id', r=test_id
        )
        assert [(r["group"], r["entity"]) for r in rows] == [
            ("browsers", "peer-0"),
            ("results", "peer-0"),
            ("topology", "topology"),
        ]
        assert (
            json.loads(rows[0]["values_json"]) == metrics and round(rows[0]["t"] * 1000) == point["timestamp"]
        )
        assert json.loads(rows[1]["values_json"])["ok"] is True
        assert json.loads(rows[2]["values_json"]) == [["peer-0", "peer-1"]]

        finished = api.ok("PUT", f"/test/{test_id}/finish")
        run = store.get_run(test_id)
        assert run is not None and run.status == "passed" and run.ended_at is not None
        assert round(run.ended_at * 1000) == finished["finished"]
    finally:
        store.close()


def test_a_harness_run_is_a_test_that_takes_data_points(bg: Background, tmp_path: Path) -> None:
    db = tmp_path / "harness.db"
    store = Store(db)
    started_at = time.time() - 5
    store.create_run(Run(id="20250101-120000-webrtc", profile="webrtc", source="cli", started_at=started_at))
    api = Client(bg, bg.serve(results_app(tmp_path, group="browsers")))
    test = "/test/20250101-120000-webrtc"
    try:
        assert api.ok("GET", test) == {
            "id": "20250101-120000-webrtc",
            "started": round(started_at * 1000),
            "finished": None,
        }
        # A collector writing the same database meanwhile: both sides get through.
        stop = threading.Event()
        written: list[int] = []

        def collector() -> None:
            other = Store(db)
            try:
                while not stop.is_set() and len(written) < 500:
                    other.write_second(
                        "20250101-120000-webrtc",
                        [],
                        [],
                        [],
                        [{"t": time.time(), "group": "aiortc", "entity": "a1", "values": {"sent": 1}}],
                        [],
                        [],
                        [],
                    )
                    written.append(1)
            finally:
                other.close()

        thread = threading.Thread(target=collector)
        thread.start()
        try:
            for n in range(40):
                api.ok("PUT", f"{test}/peer/b{n % 4}/metrics", peer_metrics(n % 4))
        finally:
            stop.set()
            thread.join(10)
        assert written

        # The API may not create, start or finish it.
        for method, path in (("POST", test), ("PUT", f"{test}/start"), ("PUT", f"{test}/finish")):
            assert api.refused(method, path, 400, {"started": True})["status"] == "test-managed-by-harness"
        run = store.get_run("20250101-120000-webrtc")
        assert run is not None and (run.profile, run.status, run.ended_at) == ("webrtc", "running", None)
        assert run.started_at == started_at

        whole = api.ok("GET", test, params={"dataPoints": "true"})
        assert len(whole["dataPoints"]) == 40  # only the group the backend reads, not the collector's
        assert {p["peerId"] for p in whole["dataPoints"]} == {"b0", "b1", "b2", "b3"}
        counts = store.rows(
            'SELECT "group", COUNT(*) AS n FROM datapoint WHERE run_id=:r GROUP BY "group"',
            r="20250101-120000-webrtc",
        )
        assert {r["group"]: r["n"] for r in counts} == {"browsers": 40, "aiortc": len(written)}

        # When harness ends the run, the test is finished.
        ended_at = time.time()
        store.update_run("20250101-120000-webrtc", status="passed", ended_at=ended_at)
        assert api.ok("GET", test)["finished"] == round(ended_at * 1000)
        assert api.refused("PUT", f"{test}/peer/b0/metrics", 400, {}) == {"status": "test-already-finished"}
    finally:
        store.close()


def test_store_backend_refuses_reserved_groups(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="group"):
        StoreBackend(tmp_path / "x.db", group="results")
    with pytest.raises(ValidationError):
        ResultsConfig.model_validate({"group": "topology"})
    with pytest.raises(ValidationError):
        ResultsConfig.model_validate({"nope": 1})
    config = ResultsConfig()
    assert config.db is None and config.group == "peers" and config.influx_url is None


def test_status_bypasses_the_service_model(bg: Background, tmp_path: Path) -> None:
    app = results_app(tmp_path)
    api = Client(bg, bg.serve(app))
    for _ in range(3):
        assert api.ok("GET", "/status") == {"status": "ok"}
    assert app[SERVICE_MODEL].served == 0
    api.ok("POST", "/test/x")
    assert app[SERVICE_MODEL].served == 1


# --- RunBackend -----------------------------------------------------------------------------------


def test_run_backend_is_the_current_run(bg: Background) -> None:
    seen: list[tuple[str, dict[str, Any], float]] = []
    results: list[tuple[str, dict[str, Any], float]] = []

    async def on_results(peer_id: str, body: dict[str, Any], t: float) -> None:
        results.append((peer_id, body, t))

    started_ms = int(time.time() * 1000) - 1000
    backend = RunBackend("run-7", started_ms, lambda p, m, t: seen.append((p, m, t)), on_results)
    app = web.Application()
    add_results_routes(app, backend)
    api = Client(bg, bg.serve(app))
    assert api.ok("GET", "/status") == {"status": "ok"}
    assert api.ok("GET", "/test/run-7") == {"id": "run-7", "started": started_ms, "finished": None}

    point = api.ok("PUT", "/test/run-7/peer/browser-1/metrics", peer_metrics(1))
    assert seen == [("browser-1", peer_metrics(1), point["timestamp"] / 1000)]
    entry = api.ok("PUT", "/test/run-7/peer/browser-1/results", {"delivered": 3})
    assert results == [("browser-1", entry, entry["timestamp"] / 1000)]
    api.ok("PUT", "/test/run-7/topology", {"browser-1": []})
    whole = api.ok("GET", "/test/run-7", params={"dataPoints": "true"})
    assert whole["dataPoints"] == [point] and whole["results"] == {"browser-1": entry}
    assert len(whole["topologyDataPoints"]) == 1

    for method, path in (
        ("GET", "/test/other"),
        ("PUT", "/test/other/start"),
        ("PUT", "/test/other/peer/p/metrics"),
        ("PUT", "/test/other/peer/p/results"),
        ("PUT", "/test/other/topology"),
        ("PUT", "/test/other/finish"),
    ):
        assert api.refused(method, path, 404, {}) == {"status": "test-not-found"}, path
    for method, path in (("POST", "/test"), ("POST", "/test/run-7"), ("PUT", "/test/run-7/finish")):
        assert api.refused(method, path, 400, {})["status"] == "test-managed-by-harness"
    assert len(seen) == 1

    backend.finish()
    assert isinstance(backend.finished_ms, int)
    assert api.ok("GET", "/test/run-7")["finished"] == backend.finished_ms
    late = api.refused("PUT", "/test/run-7/peer/browser-1/metrics", 400, peer_metrics(1))
    assert late == {"status": "test-already-finished"} and len(seen) == 1


def test_a_failing_callback_is_a_500_without_a_traceback(bg: Background) -> None:
    def broken(peer_id: str, metrics: dict[str, Any], t: float) -> None:
        raise RuntimeError("collector gone")

    app = web.Application()
    add_results_routes(app, RunBackend("r", int(time.time() * 1000), broken))
    api = Client(bg, bg.serve(app))
    response = api.call("PUT", "/test/r/peer/p/metrics", {"sent": 1})
    assert response.status_code == 500
    assert response.json() == {"status": "internal-error", "message": "RuntimeError: collector gone"}


# --- InfluxWriter ---------------------------------------------------------------------------------


def test_influx_writer_batches_and_flushes_on_close(bg: Background) -> None:
    influx_app, received = influx_receiver()
    url = bg.serve(influx_app) + "/custom/api/write"

    async def scenario() -> dict[str, Any]:
        writer = InfluxWriter(url, batch_lines=5)
        for n in range(4):
            writer.write([f"m,peer=p{n} x={k} {n}" for k in range(3)])
        await writer.close()
        writer.write(["after close 1"])  # dropped and counted, no error
        return writer.stats()

    stats = bg.call(scenario())
    lines = [line for r in received for line in r["body"].split("\n")]
    assert lines == [f"m,peer=p{n} x={k} {n}" for n in range(4) for k in range(3)]
    assert all(len(r["body"].split("\n")) <= 5 for r in received) and len(received) >= 3
    assert all(r["path"] == "/custom/api/write" and r["query"] == {} for r in received)
    assert stats["sent_lines"] == 12 and stats["failures"] == 0 and stats["dropped_lines"] == 1


def test_influx_writer_counts_failures_and_logs_once(
    bg: Background, caplog: pytest.LogCaptureFixture
) -> None:
    failing_app, received = influx_receiver(status=404)
    failing = bg.serve(failing_app) + "/"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/"

    async def scenario(url: str, **options: Any) -> dict[str, Any]:
        writer = InfluxWriter(url, **options)
        writer.write(["a x=1 1", "a x=2 2"])
        await writer.flush()
        writer.write(["a x=3 3"])
        await writer.close()
        return writer.stats()

    with caplog.at_level(logging.WARNING, logger="harness.targets.results"):
        stats = bg.call(scenario(failing))
    assert stats["failures"] == 2 and stats["failed_lines"] == 3 and stats["sent_lines"] == 0
    assert len(received) == 2
    warnings = [r.getMessage() for r in caplog.records if "influx" in r.getMessage()]
    assert len(warnings) == 1 and "HTTP 404" in warnings[0] and "database not found" in warnings[0]

    stats = bg.call(scenario(closed, timeout=5))
    assert stats["failures"] == 2 and stats["failed_lines"] == 3

    # A bounded queue: beyond max_lines, lines are dropped and counted.
    async def overflow() -> dict[str, Any]:
        writer = InfluxWriter(failing, max_lines=4)
        writer.write([f"b x={n} {n}" for n in range(10)])
        await writer.close()
        return writer.stats()

    stats = bg.call(overflow())
    assert stats["dropped_lines"] == 6 and stats["failed_lines"] == 4


def test_a_harness_run_is_a_test_of_its_embedded_results_target(tmp_path: Path) -> None:
    """The embedded `results` target writes into the run's own database (`--db`), and the run's id is a
    test there: an original client's metrics PUTs become the run's data points."""
    from tests.test_run import rows, start

    profile = {
        "name": "results-in-run",
        "duration": "4s",
        "stop_grace": "2s",
        "targets": {"results": {"embedded": True}},
        "groups": {"clients": {"simulator": "tests.sims:ResultsPeer", "users": 2, "think_time": "200ms"}},
    }
    proc, summary, db = start(tmp_path, profile)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary["group_totals"]["clients"]["failures"] == 0
    points = rows(db, 'SELECT run_id, "group", entity FROM datapoint')
    assert points and {p[0] for p in points} == {summary["run_id"]}
    assert {p[1] for p in points} == {"peers"} and {p[2] for p in points} == {"peer-0", "peer-1"}
