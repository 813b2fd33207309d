"""The `pluto` embedded target over real HTTP: the run API, the NDJSON ingest's validation, the heartbeat,
file uploads, the stored points (duplicates, the cap) and the service model in front of it all."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from aiohttp import web

from harness.errors import UsageError
from harness.targets import TARGETS, get_target
from harness.targets.pluto import STATE, PlutoConfig, PlutoState, build_app, run_prefix
from harness.targets.runner import EmbeddedTarget

KEY = "mlps_loadtest_deterministic_key_for_ci_load_tests_12345678"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST: dict[str, Any] = {"service_time": 0, "record_time": 0}


@dataclass
class Served:
    url: str
    app: web.Application
    session: requests.Session

    @property
    def state(self) -> PlutoState:
        return self.app[STATE]

    def api(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> requests.Response:
        return self.session.post(f"{self.url}{path}", json=body, headers=AUTH if headers is None else headers)

    def ingest(
        self,
        kind: str,
        body: str | bytes,
        run_id: str | int | None = 1,
        project: str | None = "load-test-project",
        auth: dict[str, str] | None = None,
        content_type: str = "application/x-ndjson",
    ) -> requests.Response:
        headers = dict(AUTH if auth is None else auth)
        headers["Content-Type"] = content_type
        if run_id is not None:
            headers["X-Run-Id"] = str(run_id)
        if project is not None:
            headers["X-Project-Name"] = project
        return self.session.post(f"{self.url}/ingest/{kind}", data=body, headers=headers)

    def get(self, path: str, **params: Any) -> Any:
        response = self.session.get(f"{self.url}{path}", params=params)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def runs(self) -> dict[int, dict[str, Any]]:
        return {run["id"]: run for run in self.get("/_runs")["runs"]}

    def points(self, run_id: int, **params: Any) -> list[list[Any]]:
        points: list[list[Any]] = self.get(f"/_runs/{run_id}/points", **params)["points"]
        return points


@contextmanager
def serving(**overrides: Any) -> Iterator[Served]:
    """A pluto target with FAST plus `overrides` on 127.0.0.1, its loop in a thread, and a session."""
    app = build_app(PlutoConfig.model_validate({**FAST, **overrides}))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, name="pluto-target", daemon=True)
    thread.start()
    try:
        with requests.Session() as session:
            session.trust_env = False  # never through a proxy from the environment
            yield Served(f"http://127.0.0.1:{port}", app, session)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def line(step: int, **data: Any) -> str:
    """One metrics line as the SDK writes it (`json.dumps`, so NaN is a bare literal)."""
    return json.dumps({"time": 1_700_000_000_000 + step, "step": step, "data": data}) + "\n"


def create(served: Served, name: str = "run", project: str = "load-test-project", **extra: Any) -> Any:
    """Create a run with the body the SDK sends; the reply's JSON."""
    body = {
        "runName": name,
        "projectName": project,
        "config": json.dumps({"lr": 0.01, "model": {"layers": 2}}),
        "loggerSettings": json.dumps({"mode": "perf"}),
        "systemMetadata": json.dumps({"hostname": "h"}),
        "tags": None,
        "createdAt": None,
        "updatedAt": None,
        **extra,
    }
    response = served.api("/api/runs/create", body)
    assert response.status_code == 200, response.text
    return response.json()


# --- config and registry --------------------------------------------------------------------------


def test_config_defaults_and_registration() -> None:
    kind = get_target("pluto")
    assert TARGETS["pluto"].config_model is PlutoConfig and "ingest" in kind.description
    config = PlutoConfig()
    assert (config.concurrency, config.queue_limit, config.max_points) == (64, 1024, 2_000_000)
    assert config.service_time.mean() == pytest.approx(0.002)
    assert config.record_time == pytest.approx(20e-6)
    assert config.api_keys is None and config.cancel_runs == [] and config.organization
    parsed = kind.parse_config({"record_time": "1ms", "api_keys": ["a"], "cancel_runs": [3]})
    assert isinstance(parsed, PlutoConfig)
    assert parsed.record_time == pytest.approx(0.001) and parsed.cancel_runs == [3]
    with pytest.raises(UsageError, match="nope"):
        kind.parse_config({"nope": 1})
    with pytest.raises(UsageError, match="max_points"):
        kind.parse_config({"max_points": -1})
    with pytest.raises(UsageError, match="cancel_runs"):
        kind.parse_config({"cancel_runs": ["x"]})
    assert run_prefix("load-test-project") == "LTP" and run_prefix("mnist") == "MNI"
    assert run_prefix("--") == "RUN"


# --- the run API ----------------------------------------------------------------------------------


def test_run_lifecycle_create_resume_status_and_metadata() -> None:
    with serving(organization="acme") as served:
        slug = served.api("/api/slug")
        assert slug.status_code == 200 and slug.json() == {"organization": {"slug": "acme"}}

        first = create(served, "run-a", externalId="ddp-1", tags=["x"])
        assert first["runId"] == 1 and first["resumed"] is False
        assert first["displayId"] == "LTP-1" and first["number"] == 1
        assert first["url"] == f"{served.url}/o/acme/projects/load-test-project/1"
        second = create(served, "run-b")
        assert second["runId"] == 2 and second["displayId"] == "LTP-2" and not second["resumed"]
        other = create(served, "run-c", project="mnist")
        assert other["runId"] == 3 and other["displayId"] == "MNI-1"
        # The same externalId in the same project is the same run (multi-node DDP ranks)...
        again = create(served, "run-a-rank-1", externalId="ddp-1", config=json.dumps({"extra": 1}))
        assert again["runId"] == 1 and again["resumed"] is True
        # ...but not in another project.
        elsewhere = create(served, "run-d", project="mnist", externalId="ddp-1")
        assert elsewhere["runId"] == 4 and elsewhere["resumed"] is False

        runs = served.runs()
        assert [runs[i]["status"] for i in (1, 2, 3, 4)] == ["RUNNING"] * 4
        assert runs[1]["name"] == "run-a" and runs[1]["project"] == "load-test-project"
        detail = served.get("/_runs/1")
        assert detail["config"] == {"lr": 0.01, "model": {"layers": 2}, "extra": 1}
        assert detail["tags"] == ["x"] and detail["logger_settings"] == {"mode": "perf"}

        # Finish as the SDK does (no statusUpdated), then resume three ways.
        done = served.api(
            "/api/runs/status/update",
            {"runId": 1, "status": "COMPLETED", "statusMetadata": json.dumps({"exit": 0})},
        )
        assert done.status_code == 200 and done.json() == {"success": True}
        assert served.runs()[1]["status"] == "COMPLETED"
        for body in (
            {"runId": 1},
            {"displayId": "LTP-1"},
            {"externalId": "ddp-1", "projectName": "load-test-project"},
        ):
            assert served.api("/api/runs/status/update", {"runId": 1, "status": "FAILED"}).status_code == 200
            resumed = served.api("/api/runs/resume", body)
            assert resumed.status_code == 200, (body, resumed.text)
            assert resumed.json()["runId"] == 1 and resumed.json()["resumed"] is True
            assert served.runs()[1]["status"] == "RUNNING"
        history = [(h["status"], h["source"]) for h in served.get("/_runs/1")["status_history"]]
        assert history[:3] == [
            ("RUNNING", "create"),
            ("COMPLETED", "status/update"),
            ("FAILED", "status/update"),
        ]
        assert history[-1] == ("RUNNING", "resume") and len(history) == 8
        assert served.get("/_runs/1")["status_history"][1]["metadata"] == {"exit": 0}

        # Resume and status errors.
        assert served.api("/api/runs/resume", {"runId": 99}).status_code == 404
        assert served.api("/api/runs/resume", {"displayId": "LTP-99"}).status_code == 404
        assert served.api("/api/runs/resume", {"displayId": "nodash"}).status_code == 400
        assert served.api("/api/runs/resume", {"externalId": "ddp-1"}).status_code == 400  # no projectName
        assert served.api("/api/runs/resume", {"runId": 1, "displayId": "LTP-1"}).status_code == 400
        bad = served.api("/api/runs/status/update", {"runId": 1, "status": "PAUSED"})
        assert bad.status_code == 400 and "COMPLETED" in bad.json()["error"]
        assert served.api("/api/runs/status/update", {"runId": 99, "status": "COMPLETED"}).status_code == 404
        assert served.api("/api/runs/status/update", {"status": "COMPLETED"}).status_code == 400
        assert served.api("/api/runs/create", {"projectName": "p"}).status_code == 400  # no runName
        assert (
            served.api("/api/runs/create", {"runName": "r", "projectName": "p", "config": "{"}).status_code
            == 400
        )

        # Log names, tags, config, model graph and alerts; 404 for unknown runs.
        names = {"runId": 2, "logType": "METRIC", "logName": ["train/loss", "train/acc"]}
        assert served.api("/api/runs/logName/add", names).json() == {"success": True}
        assert served.api("/api/runs/logName/add", {**names, "logName": ["train/loss", "sys/cpu"]}).ok
        assert served.api("/api/runs/tags/update", {"runId": 2, "tags": ["a", "b"]}).ok
        assert served.api(
            "/api/runs/config/update", {"runId": 2, "config": json.dumps({"model": {"d": 3}})}
        ).ok
        graph = {"format": "torch", "nodes": {"fc": {"type": "Linear", "depth": 1}}}
        assert served.api("/api/runs/modelGraph/create", {"runId": 2, "graph": graph}).ok
        alert = served.api(
            "/api/runs/alert", {"runId": 2, "alert": {"title": "t", "body": "b", "level": "INFO"}}
        )
        assert alert.status_code == 200 and alert.json() == {"status": "success"}
        detail = served.get("/_runs/2")
        assert detail["log_names"] == {"train/loss": "METRIC", "train/acc": "METRIC", "sys/cpu": "METRIC"}
        assert detail["tags"] == ["a", "b"] and detail["graph_nodes"] == 1 and detail["alerts"] == 1
        assert detail["config"] == {"lr": 0.01, "model": {"layers": 2, "d": 3}}
        for path, body in (
            ("/api/runs/logName/add", {**names, "runId": 99}),
            ("/api/runs/tags/update", {"runId": 99, "tags": []}),
            ("/api/runs/config/update", {"runId": 99, "config": "{}"}),
            ("/api/runs/modelGraph/create", {"runId": 99, "graph": graph}),
            ("/api/runs/alert", {"runId": 99, "alert": {}}),
        ):
            assert served.api(path, body).status_code == 404, path
        stats = served.get("/_stats")["pluto"]
        assert stats["runs"] == 4 and stats["runs_by_status"] == {"RUNNING": 4}
        assert stats["api_calls"]["create"] == 5 and stats["api_calls"]["resume"] == 3


def test_heartbeat_running_cancelled_and_finished() -> None:
    with serving(cancel_runs=[2]) as served:
        create(served, "a")
        create(served, "b")
        beat = served.api("/api/runs/trigger", {"runId": 1})
        assert beat.status_code == 200 and beat.json()["status"] == "RUNNING"
        cancelled = served.api("/api/runs/trigger", {"runId": 2})
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
        assert served.api("/api/runs/trigger", {"runId": 2}).json()["status"] == "CANCELLED"
        assert served.runs()[2]["status"] == "CANCELLED" and served.runs()[1]["status"] == "RUNNING"
        served.api("/api/runs/status/update", {"runId": 1, "status": "COMPLETED"})
        assert served.api("/api/runs/trigger", {"runId": 1}).json()["status"] == "COMPLETED"
        assert served.api("/api/runs/trigger", {"runId": 7}).status_code == 404
        missing = served.api("/api/runs/trigger", {})
        assert missing.status_code == 422 and "runId" in missing.json()["detail"]
        assert served.api("/api/runs/trigger", {"runId": 1}, headers={}).status_code == 401
        stats = served.get("/_stats")["pluto"]
        assert stats["heartbeats"] == 4 and stats["cancelled_by_heartbeat"] == 1
        assert served.runs()[2]["heartbeats"] == 2


def test_api_keys_are_enforced_everywhere() -> None:
    body = line(1, loss=0.5)
    with serving(api_keys=["good-key"]) as served:
        good = {"Authorization": "Bearer good-key"}
        assert served.api("/api/slug", headers=good).status_code == 200
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer other"}):
            refused = served.api("/api/slug", headers=headers)
            assert refused.status_code == 401 and refused.json()["error"] == "Unauthorized", headers
        assert served.api("/api/runs/create", {"runName": "r", "projectName": "p"}).status_code == 401
        assert served.api("/api/runs/trigger", {"runId": 1}).status_code == 401
        assert served.ingest("metrics", body, auth=good).status_code == 200
        codes = {
            "none": served.ingest("metrics", body, auth={}),
            "basic": served.ingest("metrics", body, auth={"Authorization": "Basic abc"}),
            "empty": served.ingest("metrics", body, auth={"Authorization": "Bearer   "}),
            "chars": served.ingest("metrics", body, auth={"Authorization": "Bearer abc!@#"}),
            "unknown": served.ingest("metrics", body),
        }
        assert {name: r.status_code for name, r in codes.items()} == dict.fromkeys(codes, 401)
        assert codes["none"].json()["code"] == "MISSING_TOKEN"
        assert codes["basic"].json()["code"] == "INVALID_BEARER_FORMAT"
        assert codes["chars"].json()["code"] == "INVALID_TOKEN_FORMAT"
        assert served.runs()[1]["points"] == 1  # only the accepted request stored anything
        assert served.get("/_stats")["pluto"]["unauthenticated"] == 10
    with serving() as served:  # no api_keys: any non-empty bearer key is accepted
        assert served.api("/api/slug", headers={"Authorization": "Bearer anything"}).status_code == 200
        assert served.ingest("logs", "", auth={"Authorization": "Bearer x.y-z_1"}).status_code == 200
        assert served.api("/api/slug", headers={"Authorization": "Bearer "}).status_code == 401


# --- the ingest -----------------------------------------------------------------------------------


def test_metrics_lines_are_validated_as_the_original() -> None:
    with serving() as served:
        # Success: the record count is the number of points; blank lines and CRLF are fine.
        body = line(1, loss=0.5, acc=0.9) + "\n  \n" + line(2, loss=0.4).replace("\n", "\r\n") + line(3, lr=1)
        ok = served.ingest("metrics", body)
        assert ok.status_code == 200 and ok.text == "Stream processed successfully: 4 records"
        assert ok.headers["Content-Type"].startswith("text/plain")
        # Non-finite values: as strings, and as the bare literals Python's json.dumps writes; null skipped.
        special = (
            '{"time": 5, "step": 4, "data": {"a": "NaN", "b": "Infinity", "c": "-Infinity", "d": null}}\n'
            + line(5, e=math.nan, f=math.inf)
        )
        ok = served.ingest("metrics", special)
        assert ok.status_code == 200 and ok.text == "Stream processed successfully: 5 records"
        values = {(p[0], p[1]): p[2] for p in served.points(1)}
        assert (
            values[(4, "a")] == "NaN" and values[(4, "b")] == "Infinity" and values[(4, "c")] == "-Infinity"
        )
        assert values[(5, "e")] == "NaN" and values[(5, "f")] == "Infinity" and (4, "d") not in values
        assert values[(1, "loss")] == 0.5 and values[(3, "lr")] == 1.0

        def rejected(body: str, line_no: int, fragment: str, code: str = "STREAM_DECODING_ERROR") -> None:
            response = served.ingest("metrics", body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()
            assert error["code"] == code and error["line"] == line_no, error
            assert f"line {line_no}" in error["message"] and fragment in error["message"], error

        rejected('{"time": 1, "step": 9, "data": {"x": 1}, "epoch": 2}\n', 1, "unknown field `epoch`")
        rejected(
            line(9, x=1) + '{"time": 1, "step": 9, "data": {}}\n',
            2,
            "'data' field cannot be empty",
            "INVALID_METRIC_FORMAT",
        )
        rejected('{"time": 1, "step": 9, "data": {"x": null}}', 1, "cannot be empty", "INVALID_METRIC_FORMAT")
        rejected(
            '{"time": 1, "step": 9, "data": {" ": 1}}',
            1,
            "metric name cannot be empty",
            "INVALID_METRIC_FORMAT",
        )
        rejected('{"time": 1, "step": 9, "data": {"x": "fast"}}', 1, "unexpected string metric value: 'fast'")
        rejected('{"time": 1, "step": 9, "data": {"x": true}}', 1, "field `data.x`")
        rejected(
            '{"time": 1.5, "step": 9, "data": {"x": 1}}', 1, "field `time`: invalid type: floating point"
        )
        rejected('{"time": 1, "step": -1, "data": {"x": 1}}', 1, "field `step`")
        rejected('{"time": 1, "data": {"x": 1}}', 1, "missing field `step`")
        rejected("[1, 2]", 1, "expected struct MetricInput")
        # A bad JSON line names its (1-based, blank lines counted) line number.
        rejected(
            line(9, x=1) + "\n" + '{"time": 1, "step": 9, "data": {"x": 1}\n' + line(10, x=1),
            3,
            "invalid JSON",
        )
        # The whole request is rejected: nothing of it was stored, so step 9 is absent.
        assert {p[0] for p in served.points(1)} == {1, 2, 3, 4, 5}
        stats = served.get("/_stats")["pluto"]
        assert stats["requests"]["metrics"] == 13 and stats["requests_rejected"]["metrics"] == 11
        assert stats["records_accepted"]["metrics"] == 9 and stats["records_discarded"]["metrics"] == 2


def test_headers_logs_data_and_content_types() -> None:
    with serving() as served:
        missing_run = served.ingest("metrics", line(1, x=1), run_id=None)
        assert missing_run.status_code == 400 and "X-Run-Id" in missing_run.json()["message"]
        missing_project = served.ingest("metrics", line(1, x=1), project=None)
        assert missing_project.status_code == 400 and "X-Project-Name" in missing_project.json()["message"]
        # A run id that is not a u64 is run 0, as the original parses it.
        for odd in ("abc", "-5", "18446744073709551616"):
            assert served.ingest("metrics", line(1, x=1), run_id=odd).status_code == 200
        assert served.ingest("metrics", line(1, x=1), run_id="18446744073709551615").status_code == 200
        runs = served.runs()
        assert runs[0]["points"] == 1 and runs[0]["duplicate_points"] == 2
        assert runs[0]["source"] == "ingest" and runs[0]["project"] == "load-test-project"
        assert runs[2**64 - 1]["points"] == 1

        # mlop sends logs as application/json; the seed's raw test sends x-ndjson.
        logs = "".join(
            json.dumps(
                {"time": 1, "message": f"Training step {i} completed", "lineNumber": i, "logType": "stdout"}
            )
            + "\n"
            for i in range(3)
        )
        ok = served.ingest("logs", logs, run_id=5, content_type="application/json")
        assert ok.status_code == 200 and ok.text == "Stream processed successfully: 3 records"
        empty_message = '{"time": 1, "message": "", "lineNumber": 1, "logType": "INFO"}'
        assert served.ingest("logs", empty_message, run_id=5).status_code == 200
        for bad, fragment in (
            (
                '{"time": 1, "message": "m", "lineNumber": 1, "logType": " "}',
                "'logType' field cannot be empty",
            ),
            (
                '{"time": 1, "message": "m", "lineNumber": 1, "logType": "x", "level": 1}',
                "unknown field `level`",
            ),
            ('{"time": 1, "message": "m", "lineNumber": null, "logType": "x"}', "field `lineNumber`"),
        ):
            refused = served.ingest("logs", bad, run_id=5)
            assert refused.status_code == 400 and fragment in refused.json()["message"], refused.text

        record = {
            "time": 1,
            "step": 3,
            "data": json.dumps({"batch_loss": 0.3}),
            "dataType": "batch_metrics",
            "logName": "training_metrics",
        }
        ok = served.ingest("data", json.dumps(record) + "\n" + json.dumps(record), run_id=5)
        assert ok.status_code == 200 and ok.text == "Stream processed successfully: 2 records"
        for change, fragment in (
            ({"data": {"batch_loss": 0.3}}, "field `data`: invalid type: map, expected a string"),
            ({"logName": ""}, "'logName' field cannot be empty"),
            ({"dataType": ""}, "'dataType' field cannot be empty"),
        ):
            refused = served.ingest("data", json.dumps({**record, **change}), run_id=5)
            assert refused.status_code == 400 and fragment in refused.json()["message"], refused.text
        run = served.runs()[5]
        assert (run["log_lines"], run["data_records"], run["points"]) == (4, 2, 0)
        stats = served.get("/_stats")["pluto"]
        assert stats["records_accepted"] == {"metrics": 4, "logs": 4, "data": 2}


def test_keep_lines_before_error_stores_what_came_before() -> None:
    body = line(1, x=1) + line(2, x=2) + '{"time": 1, "step": 3, "data": {}}\n' + line(4, x=4)
    with serving(keep_lines_before_error=True) as served:
        refused = served.ingest("metrics", body)
        assert refused.status_code == 400 and refused.json()["line"] == 3
        assert refused.json()["records_kept"] == 2
        assert [p[0] for p in served.points(1)] == [1, 2]
    with serving() as served:
        refused = served.ingest("metrics", body)
        assert refused.status_code == 400 and refused.json()["records_kept"] == 0
        assert served.runs() == {}  # nothing stored, not even the run


# --- stored points --------------------------------------------------------------------------------


def test_duplicates_are_counted_and_points_listed() -> None:
    with serving() as served:
        run_id = create(served)["runId"]
        before = time.time()
        assert served.ingest("metrics", line(1, loss=0.5, acc=0.1) + line(2, loss=0.4), run_id=run_id).ok
        after = time.time()
        # A retry re-sends step 1 (same values) and adds step 3.
        assert served.ingest("metrics", line(1, loss=0.5, acc=0.1) + line(3, loss=0.3), run_id=run_id).ok
        run = served.runs()[run_id]
        assert (run["points"], run["duplicate_points"], run["steps"], run["keys"]) == (4, 2, 3, 2)
        points = served.points(run_id)
        assert [p[:4] for p in points] == [
            [1, "acc", 0.1, 2],
            [1, "loss", 0.5, 2],
            [2, "loss", 0.4, 1],
            [3, "loss", 0.3, 1],
        ]
        assert all(before <= p[4] <= after for p in points[:3]) and points[3][4] >= after
        only_loss = served.points(run_id, key="loss")
        assert [p[0] for p in only_loss] == [1, 2, 3] and {p[1] for p in only_loss} == {"loss"}
        timed = served.points(run_id, key="acc", with_time=1)
        assert timed == [[1, "acc", 0.1, 2, points[0][4], 1_700_000_000_001]]
        assert served.session.get(f"{served.url}/_runs/42/points").status_code == 404
        stats = served.get("/_stats")["pluto"]
        assert stats["points_stored"] == 4 and stats["duplicate_points"] == 2 and not stats["points_capped"]


def test_max_points_caps_storage_and_max_runs_evicts() -> None:
    with serving(max_points=5, max_runs=2) as served:
        body = "".join(line(step, a=step, b=step) for step in range(4))  # 8 points
        ok = served.ingest("metrics", body)
        assert ok.status_code == 200 and ok.text == "Stream processed successfully: 8 records"
        run = served.runs()[1]
        assert (run["points"], run["points_dropped"]) == (5, 3)
        # A stored point arriving again is still a duplicate beyond the cap.
        assert served.ingest("metrics", line(0, a=0)).ok
        stats = served.get("/_stats")["pluto"]
        assert stats["points_capped"] is True and stats["points_stored"] == 5 and stats["max_points"] == 5
        assert stats["points_dropped"] == 3 and stats["duplicate_points"] == 1
        # Two more runs: the first is forgotten, and its points with it.
        create(served, "x")
        assert served.ingest("metrics", line(0, a=0), run_id=3).ok
        assert sorted(served.runs()) == [2, 3]
        stats = served.get("/_stats")["pluto"]
        assert stats["evicted_runs"] == 1 and stats["points_stored"] == 1


# --- files, health and the service model ----------------------------------------------------------


def test_files_are_presigned_and_uploaded() -> None:
    with serving() as served:
        run_id = create(served)["runId"]
        files = {
            "files": [
                {
                    "fileName": "img.png",
                    "fileSize": 4,
                    "fileType": "png",
                    "time": 1,
                    "logName": "val/img",
                    "step": 2,
                },
                {
                    "fileName": "model.pt",
                    "fileSize": 3,
                    "fileType": "pt",
                    "time": 1,
                    "logName": "ckpt",
                    "step": 2,
                },
            ]
        }
        headers = {**AUTH, "X-Run-Id": str(run_id), "X-Project-Name": "load-test-project"}
        reply = served.session.post(f"{served.url}/files", json=files, headers=headers)
        assert reply.status_code == 200, reply.text
        urls = reply.json()
        assert set(urls) == {"val/img", "ckpt"} and list(urls["val/img"][0]) == ["img.png"]
        url = urls["val/img"][0]["img.png"]
        assert url.startswith(f"{served.url}/_uploads/") and "X-Amz-Signature=" in url
        assert served.session.put(url, data=b"\x89PNG").status_code == 200
        assert served.session.put(urls["ckpt"][0]["model.pt"], data=b"abc").status_code == 200
        forged = served.session.put(url.replace("img.png", "other.png"), data=b"x")
        assert forged.status_code == 403 and "SignatureDoesNotMatch" in forged.text
        detail = served.get(f"/_runs/{run_id}")
        assert (detail["files_presigned"], detail["files_uploaded"], detail["upload_bytes"]) == (2, 2, 7)
        assert (
            served.session.post(f"{served.url}/files", json={"nope": 1}, headers=headers).status_code == 422
        )
        bad_id = {**headers, "X-Run-Id": "abc"}
        assert served.session.post(f"{served.url}/files", json=files, headers=bad_id).status_code == 500
        assert served.session.post(f"{served.url}/files", json=files).status_code == 401
        stats = served.get("/_stats")["pluto"]
        assert (stats["files_presigned"], stats["files_uploaded"], stats["bad_signatures"]) == (2, 2, 1)


def test_health_version_and_stats() -> None:
    with serving() as served:
        health = served.session.get(f"{served.url}/health")
        assert health.status_code == 200 and health.text == "OK"
        assert served.get("/health/ready") == {"status": "ready"}
        assert served.get("/health/dlq") == {"batches_pending": 0, "records_pending": 0, "disk_usage_mb": 0}
        version = served.get("/version")
        assert version["service"] == "ingest" and version["version"].startswith("harness-")
        stats = served.get("/_stats")
        # The service model's counters, with the target's own under `pluto`; the open routes are not served.
        assert stats["concurrency"] == 64 and stats["served"] == 0
        assert set(stats["pluto"]["requests"]) == {"metrics", "logs", "data"}
        served.api("/api/slug")
        assert served.get("/_stats")["served"] == 1


def test_service_model_and_record_time_cost_latency() -> None:
    with serving(concurrency=1, service_time="100ms") as served:
        results: list[float] = []

        def one(step: int) -> None:
            with requests.Session() as session:
                session.trust_env = False
                start = time.perf_counter()
                response = session.post(
                    f"{served.url}/ingest/metrics",
                    data=line(step, x=step),
                    headers={**AUTH, "X-Run-Id": "1", "X-Project-Name": "p"},
                )
                assert response.status_code == 200
                results.append(time.perf_counter() - start)

        start = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.05)
        # The `_` routes bypass the queue: they answer at once while the ingest is busy.
        probe = time.perf_counter()
        assert served.get("/_stats")["queued"] >= 1
        assert time.perf_counter() - probe < 0.08
        for thread in threads:
            thread.join(10)
        elapsed = time.perf_counter() - start
        # One worker, 100 ms each: served one after another.
        assert elapsed >= 0.39 and max(results) >= 0.39 and min(results) < 0.2, results
        stats = served.get("/_stats")
        assert stats["served"] == 4 and stats["peak_queued"] >= 2
    with serving(record_time="2ms") as served:
        small = served.ingest("metrics", line(0, x=0))
        start = time.perf_counter()
        big = served.ingest("metrics", "".join(line(step, x=step, y=step) for step in range(1, 101)))
        assert big.status_code == small.status_code == 200
        assert big.text == "Stream processed successfully: 200 records"
        assert time.perf_counter() - start >= 0.4  # 200 records x 2 ms
    with serving(concurrency=1, queue_limit=0, service_time="300ms") as served:
        blocker = threading.Thread(target=lambda: served.session.get(f"{served.url}/nothing"))
        with requests.Session() as other:
            other.trust_env = False
            blocker.start()
            time.sleep(0.1)
            overloaded = other.post(f"{served.url}/api/slug", headers=AUTH)
        blocker.join(10)
        assert overloaded.status_code == 503


def test_embedded_target_process_serves_an_sdk_shaped_run() -> None:
    with EmbeddedTarget("pluto", "pluto", {"service_time": "1ms", "api_keys": [KEY]}) as target:
        assert target.url is not None
        with requests.Session() as s:
            s.trust_env = False
            reply = s.post(
                f"{target.url}/api/runs/create", json={"runName": "r", "projectName": "p"}, headers=AUTH
            )
            run_id = reply.json()["runId"]
            headers = {**AUTH, "X-Run-Id": str(run_id), "X-Project-Name": "p", "X-Run-Name": "r"}
            ok = s.post(f"{target.url}/ingest/metrics", data=line(1, loss=0.1), headers=headers)
            assert ok.status_code == 200 and ok.text == "Stream processed successfully: 1 records"
            runs = s.get(f"{target.url}/_runs").json()["runs"]
            assert [(r["id"], r["points"], r["status"]) for r in runs] == [(run_id, 1, "RUNNING")]
