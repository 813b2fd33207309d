"""The panel's JSON API and Socket.IO events, through Flask's and Flask-SocketIO's test clients, with
real runs (worker processes, the embedded echo target) behind them; and the `serve` / `start` CLI."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from flask_socketio import SocketIOTestClient

from harness.errors import UsageError
from harness.store import Store
from tests.clitools import ROOT, wait_for
from web import create_app, socketio
from web.security import check_bind, is_loopback

RECORDER = """
name: rec
description: two recorder users
duration: 60s
stop_grace: 2s
groups:
  rec:
    simulator: tests.sims:Recorder
    users: 2
    think_time: 50ms
  api:
    simulator: tests.sims:Recorder
    arrival_rate: 5
"""

TOKEN = "s3cret-token-for-tests"


def _app(tmp_path: Path, **config: Any) -> Iterator[Flask]:
    app = create_app({"HARNESS_DB": str(tmp_path / "h.db"), **config})
    yield app
    app.extensions["harness_runs"].shutdown(who="test teardown", timeout=30)
    app.extensions["harness_store"].close()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    """A panel without a token, on a fresh database."""
    yield from _app(tmp_path)


@pytest.fixture
def token_app(tmp_path: Path) -> Iterator[Flask]:
    """A panel that requires TOKEN."""
    yield from _app(tmp_path, TOKEN=TOKEN)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def csrf(client: FlaskClient) -> dict[str, str]:
    """The headers a page sends with a state-changing request."""
    token = client.get("/api/session").get_json()["csrf_token"]
    return {"X-CSRF-Token": token}


def post(client: FlaskClient, url: str, body: Any = None, **kwargs: Any) -> Any:
    headers = {**csrf(client), **kwargs.pop("headers", {})}
    return client.post(url, json=body if body is not None else {}, headers=headers, **kwargs)


# -- security ----------------------------------------------------------------------------------------
def test_loopback_and_bind_check() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com", ""):
        assert not is_loopback(host), host
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "t")
    with pytest.raises(UsageError, match="HARNESS_TOKEN"):
        check_bind("0.0.0.0", None)
    with pytest.raises(UsageError):
        create_app({"HOST": "0.0.0.0", "TOKEN": None})


def test_session_without_token(client: FlaskClient) -> None:
    body = client.get("/api/session").get_json()
    assert body["auth_required"] is False and body["authenticated"] is True
    assert len(body["csrf_token"]) >= 32
    assert client.get("/api/session").get_json()["csrf_token"] == body["csrf_token"]


def test_state_changes_need_csrf_and_same_origin(client: FlaskClient) -> None:
    body = {"yaml": RECORDER}
    assert client.post("/api/profiles/validate", json=body).status_code == 403
    assert (
        client.post("/api/profiles/validate", json=body, headers={"X-CSRF-Token": "x" * 43}).status_code
        == 403
    )
    headers = csrf(client)
    evil = client.post(
        "/api/profiles/validate", json=body, headers={**headers, "Origin": "http://evil.example"}
    )
    assert evil.status_code == 403 and "cross-site" in evil.get_json()["error"]
    assert (
        client.post("/api/profiles/validate", json=body, headers={**headers, "Origin": "null"}).status_code
        == 403
    )
    same = client.post("/api/profiles/validate", json=body, headers={**headers, "Origin": "http://localhost"})
    assert same.status_code == 200, same.get_json()
    assert client.post("/api/profiles/validate", json=body, headers=headers).status_code == 200
    # a fresh browser (another cookie jar) cannot reuse someone else's CSRF token
    other = client.application.test_client()
    assert other.post("/api/profiles/validate", json=body, headers=headers).status_code == 403


def test_token_login_session_cookie_and_bearer(token_app: Flask) -> None:
    client = token_app.test_client()
    session = client.get("/api/session").get_json()
    assert session["auth_required"] is True and session["authenticated"] is False
    for url in ("/api/runs", "/api/profiles", "/api/runs/x", "/api/compare?run=x"):
        response = client.get(url)
        assert response.status_code == 401 and "error" in response.get_json(), url
    assert post(client, "/api/runs", {"profile": "smoke"}).status_code == 401
    wrong = post(client, "/api/login", {"token": "nope"})
    assert wrong.status_code == 401 and wrong.get_json()["field"] == "token"
    assert client.post("/api/login", json={"token": TOKEN}).status_code == 403  # login needs CSRF too
    ok = post(client, "/api/login", {"token": TOKEN})
    assert ok.status_code == 200 and ok.get_json()["authenticated"] is True
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert client.get("/api/session").get_json()["authenticated"] is True
    assert client.get("/api/runs").status_code == 200
    assert post(client, "/api/logout").status_code == 200
    assert client.get("/api/runs").status_code == 401

    api = token_app.test_client()  # a script: Bearer token, no cookie, no CSRF header
    assert api.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert api.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    validated = api.post(
        "/api/profiles/validate", json={"yaml": RECORDER}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert validated.status_code == 200 and validated.get_json()["name"] == "rec"


def test_socketio_connection_needs_the_token(token_app: Flask) -> None:
    anonymous = socketio.test_client(token_app)
    assert not anonymous.is_connected()
    wrong = socketio.test_client(token_app, auth={"token": "nope"})
    assert not wrong.is_connected()
    with_token = socketio.test_client(token_app, auth={"token": TOKEN})
    assert with_token.is_connected()
    with_token.disconnect()

    browser = token_app.test_client()
    post(browser, "/api/login", {"token": TOKEN})
    logged_in = socketio.test_client(token_app, flask_test_client=browser)
    assert logged_in.is_connected()
    logged_in.emit("join", {"run_id": "nope"})
    joined = [m for m in logged_in.get_received() if m["name"] == "joined"]
    assert joined and joined[0]["args"][0] == {"run_id": "nope", "status": None, "ticks": []}
    logged_in.disconnect()


def test_non_loopback_server_without_token_is_refused(client: FlaskClient) -> None:
    # what gunicorn -b 0.0.0.0 without HARNESS_TOKEN looks like to the app
    response = client.get("/api/runs", environ_overrides={"SERVER_NAME": "0.0.0.0"})
    assert response.status_code == 403 and "HARNESS_TOKEN" in response.get_json()["error"]


def test_ui_page_and_static_files(client: FlaskClient) -> None:
    with client.get("/") as page:
        assert page.status_code == 200 and b"<html" in page.data.lower()
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Frame-Options"] == "DENY"
    with client.get("/static/vendor/socket.io.min.js") as script:
        assert script.status_code == 200
    missing = client.get("/api/nothing-here")
    assert missing.status_code == 404 and "error" in missing.get_json()


# -- profiles -----------------------------------------------------------------------------------------
def test_profiles(client: FlaskClient) -> None:
    names = {p["name"]: p for p in client.get("/api/profiles").get_json()["profiles"]}
    assert {"smoke", "demo"} <= set(names) and names["smoke"]["description"]
    smoke = client.get("/api/profiles/smoke").get_json()
    assert smoke["name"] == "smoke" and "groups:" in smoke["yaml"]
    assert client.get("/api/profiles/nope").status_code == 404

    ok = post(client, "/api/profiles/validate", {"yaml": RECORDER, "overrides": ["groups.rec.users=3"]})
    body = ok.get_json()
    assert ok.status_code == 200 and body["ok"] is True and body["name"] == "rec"
    assert {g["name"]: g["users"] for g in body["groups"]}["rec"] == 3

    bad = post(client, "/api/profiles/validate", {"yaml": RECORDER.replace("users: 2", "users: -1")})
    assert bad.status_code == 400 and bad.get_json()["field"] == "groups.rec.users"
    broken = post(client, "/api/profiles/validate", {"yaml": "name: [unclosed"})
    assert broken.status_code == 400 and "invalid YAML" in broken.get_json()["error"]
    assert post(client, "/api/profiles/validate", {"yaml": ""}).status_code == 400
    assert post(client, "/api/profiles/validate", {"yaml": RECORDER, "overrides": "x=1"}).status_code == 400
    too_big = post(client, "/api/profiles/validate", {"yaml": RECORDER + "#" * 70_000})
    assert too_big.status_code == 413 and too_big.get_json()["field"] == "yaml"
    huge = post(client, "/api/profiles/validate", {"yaml": "#" * 1_000_000})
    assert huge.status_code == 413 and "error" in huge.get_json()
    not_json = client.post("/api/profiles/validate", data="yaml", headers=csrf(client))
    assert not_json.status_code == 400


def test_secrets_stay_out_of_the_panel(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_TEST_SECRET", "hunter2-very-secret")
    text = RECORDER.replace("think_time: 50ms", "think_time: 50ms\n    options: {sleep: 0.01}") + (
        "targets:\n  svc: {url: 'http://user:pw@127.0.0.1:9', token: '${WEB_TEST_SECRET}'}\n"
    )
    body = post(client, "/api/profiles/validate", {"yaml": text}).get_json()
    assert body["ok"] is True
    assert "hunter2" not in json.dumps(body)


# -- runs: bad input ----------------------------------------------------------------------------------
def test_start_run_bad_input(client: FlaskClient) -> None:
    cases = [
        ({}, 400, "profile"),
        ({"profile": "smoke", "yaml": RECORDER}, 400, "profile"),
        ({"profile": "no-such-profile"}, 400, "profile"),
        ({"profile": "/etc/passwd"}, 400, "profile"),
        ({"profile": "smoke", "duration": "banana"}, 400, "duration"),
        ({"profile": "smoke", "duration": True}, 400, "duration"),
        ({"profile": "smoke", "overrides": [1]}, 400, "overrides"),
        ({"yaml": RECORDER.replace("users: 2", "users: lots")}, 400, "groups.rec.users"),
        ({"yaml": RECORDER + "#" * 70_000}, 413, "yaml"),
    ]
    for body, status, field in cases:
        response = post(client, "/api/runs", body)
        assert response.status_code == status, (body, response.get_json())
        assert response.get_json()["field"] == field, (body, response.get_json())
    bad_set = post(client, "/api/runs", {"profile": "smoke", "overrides": ["noequals"]})
    assert bad_set.status_code == 400 and "dotted.key=value" in bad_set.get_json()["error"]
    assert client.get("/api/runs").get_json() == {"runs": []}


def test_unknown_runs_are_404(client: FlaskClient) -> None:
    for url in (
        "/api/runs/nope",
        "/api/runs/nope/series",
        "/api/runs/nope/events",
        "/api/runs/nope/errors",
        "/api/runs/nope/datapoints",
        "/api/runs/nope/report/html",
        "/api/compare?run=nope&baseline=nope2",
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert "error" in response.get_json()
    for url in ("/api/runs/nope/stop", "/api/runs/nope/groups/rec", "/api/runs/nope/baseline"):
        assert post(client, url, {"users": 1}).status_code == 404, url
    assert client.get("/api/compare").status_code == 400
    local_file = client.get("/api/compare?run=/etc/passwd")
    assert local_file.status_code == 400 and local_file.get_json()["field"] == "run"


def test_run_that_cannot_start_reports_its_error(app: Flask, client: FlaskClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    text = RECORDER + f"targets:\n  down: {{url: 'http://127.0.0.1:{port}', start_timeout: 1s}}\n"
    sio = socketio.test_client(app, flask_test_client=client)
    response = post(client, "/api/runs", {"yaml": text})
    assert response.status_code == 201
    run_id = response.get_json()["run_id"]

    def errored() -> Any:
        run = client.get(f"/api/runs/{run_id}").get_json()["run"]
        return run if run["status"] == "error" and run["exit_code"] is not None else None

    run = wait_for(errored, 30, "the run to fail at start")
    assert "down" in run["error"] and run["exit_code"] == 2 and run["active"] is False
    listed = {r["id"]: r for r in client.get("/api/runs").get_json()["runs"]}
    assert listed[run_id]["status"] == "error"

    def final_status() -> Any:
        for message in sio.get_received():
            if message["name"] == "run_status" and message["args"][0].get("exit_code") is not None:
                return message["args"][0]
        return None

    status = wait_for(final_status, 10, "the final run_status event")
    assert status["run_id"] == run_id and status["status"] == "error" and "down" in status["error"]
    sio.disconnect()


# -- a real run through the API -----------------------------------------------------------------------
def _ticks(messages: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    return [m["args"][0] for m in messages if m["name"] == "tick" and m["args"][0]["run_id"] == run_id]


@pytest.mark.slow
def test_a_run_through_the_api_and_socketio(app: Flask, client: FlaskClient, tmp_path: Path) -> None:
    sio: SocketIOTestClient = socketio.test_client(app, flask_test_client=client)
    assert sio.is_connected()
    started = post(client, "/api/runs", {"yaml": RECORDER, "overrides": ["groups.rec.users=2"]})
    assert started.status_code == 201, started.get_json()
    run_id = started.get_json()["run_id"]
    sio.emit("join", {"run_id": run_id})
    received: list[dict[str, Any]] = []

    def ticks_with(predicate: Callable[[dict[str, Any]], bool]) -> Any:
        received.extend(sio.get_received())
        return [t for t in _ticks(received, run_id) if predicate(t)]

    received.extend(sio.get_received())
    assert next(m for m in received if m["name"] == "joined")["args"][0]["run_id"] == run_id
    wait_for(
        lambda: len(ticks_with(lambda t: t["groups"].get("rec", {}).get("users") == 2)) >= 2, 40, "ticks"
    )
    tick = _ticks(received, run_id)[-1]
    assert {"t", "elapsed", "groups", "endpoints", "totals", "health", "errors"} <= set(tick)

    # a second run while this one is active
    assert post(client, "/api/runs", {"profile": "smoke"}).status_code == 409
    detail = client.get(f"/api/runs/{run_id}").get_json()
    assert detail["run"]["active"] is True and detail["run"]["status"] == "running"
    assert detail["summary"] is None and detail["live"]["totals"]["requests"] > 0
    assert detail["groups"]["rec"]["mode"] == "closed" and detail["groups"]["api"]["mode"] == "open"
    assert detail["profile"]["groups"]["rec"]["simulator"] == "tests.sims:Recorder"
    listed = client.get("/api/runs").get_json()["runs"]
    assert listed[0]["id"] == run_id and listed[0]["active"] is True

    # a late joiner gets the recent ticks at once
    late = socketio.test_client(app, flask_test_client=app.test_client())
    late.emit("join", {"run_id": run_id})
    joined = next(m for m in late.get_received() if m["name"] == "joined")["args"][0]
    assert joined["status"] == "running" and len(joined["ticks"]) >= 2
    late.emit("leave", {"run_id": run_id})
    late.disconnect()

    # scale
    url = f"/api/runs/{run_id}/groups"
    assert post(client, f"{url}/nope", {"users": 3}).status_code == 400
    for body in (
        {"users": -1},
        {"users": "many"},
        {"users": True},
        {"users": 1.5},
        {},
        {"users": 1, "rate": 2},
    ):
        response = post(client, f"{url}/rec", body)
        assert response.status_code == 400, body
    wrong_model = post(client, f"{url}/rec", {"rate": 3})
    assert wrong_model.status_code == 400 and wrong_model.get_json()["field"] == "rate"
    assert post(client, f"{url}/rec", {"users": 4}).status_code == 202
    assert post(client, f"{url}/api", {"rate": 8}).status_code == 202
    wait_for(lambda: ticks_with(lambda t: t["groups"]["rec"].get("users") == 4), 30, "4 users")
    wait_for(lambda: ticks_with(lambda t: t["groups"]["api"].get("target") == 8), 30, "rate 8")
    assert post(client, f"{url}/rec", {"users": None}).status_code == 202  # back to its shape

    # stop, and the run ends with a summary
    stopped = post(client, f"/api/runs/{run_id}/stop")
    assert stopped.status_code == 202

    def finished() -> Any:
        body = client.get(f"/api/runs/{run_id}").get_json()
        return body if body["summary"] is not None else None

    body = wait_for(finished, 40, "the run to end")
    assert body["run"]["status"] == "aborted" and body["run"]["active"] is False
    assert body["summary"]["reason"] == "stopped by panel 127.0.0.1"
    assert body["summary"]["totals"]["requests"] > 0 and body["live"] is None

    def final_status() -> Any:
        received.extend(sio.get_received())
        return [
            m["args"][0]
            for m in received
            if m["name"] == "run_status" and m["args"][0].get("exit_code") is not None
        ]

    final = wait_for(final_status, 10, "the final run_status")[0]
    assert final == {"run_id": run_id, "status": "aborted", "profile": "rec", "exit_code": 3}
    statuses = [m["args"][0]["status"] for m in received if m["name"] == "run_status"]
    assert statuses[:2] == ["starting", "running"] and "stopping" in statuses
    assert post(client, f"/api/runs/{run_id}/stop").status_code == 409
    assert post(client, f"{url}/rec", {"users": 1}).status_code == 409

    # history views
    events = client.get(f"/api/runs/{run_id}/events").get_json()["events"]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_type.setdefault(e["type"], []).append(e)
    assert by_type["operator_action"][0]["detail"] == {"action": "start", "who": "panel 127.0.0.1"}
    assert {"value": 4.0, "unit": "users", "who": "panel 127.0.0.1"} in [
        e["detail"] for e in by_type["scaled_manually"]
    ]
    series = client.get(f"/api/runs/{run_id}/series?by=group&window=2").get_json()
    assert series["rows"] and {r["group"] for r in series["rows"]} == {"rec", "api"}
    assert client.get(f"/api/runs/{run_id}/series?by=nope").status_code == 400
    assert client.get(f"/api/runs/{run_id}/series?window=0").status_code == 400
    assert client.get(f"/api/runs/{run_id}/errors").get_json()["errors"] == []
    points = client.get(f"/api/runs/{run_id}/datapoints?limit=3").get_json()["datapoints"]
    assert len(points) == 3 and points[0]["entity"].startswith("user-") and "n" in points[0]["values"]

    # reports: written at the end of the run into the folder next to the database; missing ones are made
    report_dir = tmp_path / "runs" / run_id
    assert (report_dir / "summary.json").is_file()
    (report_dir / "junit.xml").unlink()
    for fmt, marker in (
        ("html", b"<html"),
        ("json", b'"totals"'),
        ("junit", b"<testsuite"),
        ("csv", b"Name"),
    ):
        with client.get(f"/api/runs/{run_id}/report/{fmt}") as response:
            assert response.status_code == 200, fmt
            assert marker in response.data, fmt
            assert "attachment" in response.headers["Content-Disposition"]
            assert response.headers["Content-Security-Policy"] == "sandbox allow-scripts"
    assert (report_dir / "junit.xml").is_file()
    assert client.get(f"/api/runs/{run_id}/report/pdf").status_code == 404

    # baseline and comparison
    marked = post(client, f"/api/runs/{run_id}/baseline")
    assert marked.status_code == 200 and marked.get_json()["profile"] == "rec"
    assert client.get("/api/runs").get_json()["runs"][0]["baseline"] is True
    result = client.get(f"/api/compare?run={run_id}").get_json()
    assert result["baseline"]["run_id"] == run_id and result["regression"] is False
    assert client.get(f"/api/compare?run={run_id}&baseline={run_id}&p95=bad").status_code == 400
    store = Store(tmp_path / "h.db")
    try:
        assert store.get_baseline("rec") == run_id
    finally:
        store.close()
    sio.disconnect()


# -- the CLI ------------------------------------------------------------------------------------------
def test_serve_refuses_a_public_address_without_a_token(cli: Any, one_line_error: Any) -> None:
    one_line_error(cli("serve", "--host", "0.0.0.0"), "0.0.0.0", "--token", "HARNESS_TOKEN")
    one_line_error(
        cli("start", "--profile", "smoke", "--host", "0.0.0.0", "--duration", "2s"), "HARNESS_TOKEN"
    )


def _spawn(args: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HARNESS_")}
    env["HARNESS_DB"] = str(tmp_path / "cli.db")
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 60) -> re.Match[str]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r} in {seen!r}")


def test_serve_answers_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc = _spawn(["serve", "--port", "0"], tmp_path)
    try:
        url = _read_until(proc, r"panel: (http://\S+)").group(1)
        with requests.Session() as http:
            session = http.get(url + "api/session", timeout=5).json()
            assert session == {
                "auth_required": False,
                "authenticated": True,
                "csrf_token": session["csrf_token"],
            }
            assert http.get(url + "api/runs", timeout=5).json() == {"runs": []}
            with http.get(url, timeout=5) as page:
                assert page.status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.slow
def test_start_serves_the_panel_and_keeps_it_up_after_the_run(tmp_path: Path) -> None:
    proc = _spawn(["start", "--profile", "smoke", "--duration", "3s", "--quiet", "--port", "0"], tmp_path)
    try:
        url = _read_until(proc, r"panel: (http://\S+)").group(1)
        runs = requests.get(url + "api/runs", timeout=5).json()["runs"]
        assert len(runs) == 1 and runs[0]["profile"] == "smoke"
        _read_until(proc, r"passed \(exit code 0\); the panel keeps serving", timeout=60)
        runs = requests.get(url + "api/runs", timeout=5).json()["runs"]
        assert runs[0]["status"] == "passed" and runs[0]["requests"] > 0
        assert (tmp_path / "runs" / runs[0]["id"] / "summary.json").is_file()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.slow
def test_ctrl_c_stops_a_panel_run_gracefully(tmp_path: Path) -> None:
    proc = _spawn(["start", "--profile", "smoke", "--duration", "60s", "--quiet", "--port", "0"], tmp_path)
    try:
        url = _read_until(proc, r"panel: (http://\S+)").group(1)
        wait_for(
            lambda: requests.get(url + "api/runs", timeout=5).json()["runs"][0]["status"] == "running",
            30,
            "the run to be running",
        )
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _read_until(proc, r"aborted \(exit code 3\); the panel keeps serving", timeout=30)
        run = requests.get(url + "api/runs", timeout=5).json()["runs"][0]
        assert run["status"] == "aborted" and run["reason"] == "stopped by SIGINT"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_agents_hub_lists_connected_agents_and_refuses_a_wrong_token(token_app: Flask) -> None:
    wrong = socketio.test_client(token_app, namespace="/agents", auth={"token": "nope"})
    assert not wrong.is_connected("/agents")
    agent = socketio.test_client(token_app, namespace="/agents", auth={"token": TOKEN})
    assert agent.is_connected("/agents")
    hello = {"agent_id": "x1", "name": "a1", "labels": ["eu"], "capacity": {"cores": 2, "processes": 2}}
    answer = agent.emit("hello", hello, namespace="/agents", callback=True)
    assert answer["ack"] == 0 and answer["cseq"] == 1
    api = token_app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    listed = api.get("/api/agents", headers=auth).get_json()
    assert listed["clock_warning_s"] == 0.5
    [one] = listed["agents"]
    assert (one["name"], one["labels"], one["health"], one["state"]) == ("a1", ["eu"], "ok", "idle")
    assert one["capacity"] == {"cores": 2, "processes": 2} and one["run_id"] is None
    agent.disconnect(namespace="/agents")
    [gone] = api.get("/api/agents", headers=auth).get_json()["agents"]
    assert gone["health"] == "disconnected"
    assert api.get("/api/agents").status_code == 401
