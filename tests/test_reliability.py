"""Failure handling: killed workers and controllers, dead and hanging targets, Ctrl-C."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.clitools import ROOT, harness, wait_for
from tests.test_run import recorder_profile, rows, start

pytestmark = pytest.mark.slow


def launch(tmp_path: Path, profile: dict[str, Any]) -> tuple[subprocess.Popen[str], Path, Path]:
    """Start a headless run in the background; returns the process, the database and the report dir."""
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    db, report = tmp_path / "h.db", tmp_path / "report"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness",
            "start",
            "--profile",
            str(path),
            "--headless",
            "--quiet",
            "--db",
            str(db),
            "--report-dir",
            str(report),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return proc, db, report


def worker_pids(db: Path, group: str) -> list[int]:
    return [r[0] for r in rows(db, 'SELECT pid FROM worker WHERE "group"=? ORDER BY id', group)]


def test_sigkill_worker_is_restarted_and_no_other_data_is_lost(tmp_path: Path) -> None:
    profile = recorder_profile()
    profile["groups"]["steady"] = {**profile["groups"]["rec"]}
    profile["duration"] = "12s"
    proc, db, report = launch(tmp_path, profile)
    pid = wait_for(lambda: worker_pids(db, "rec"))[0]
    wait_for(lambda: rows(db, "SELECT COUNT(*) FROM window")[0][0] >= 4)
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    summary = json.loads((report / "summary.json").read_text())
    events = [(e["type"], e["group"], e["detail"]) for e in summary["events"]]
    exited = [d for t, g, d in events if t == "worker_exited" and g == "rec" and d.get("signal") == "SIGKILL"]
    assert exited and exited[0]["pid"] == pid
    assert any(t == "worker_restarted" and g == "rec" for t, g, _ in events)
    assert len(worker_pids(db, "rec")) == 2
    # the other group has every second from its first to its last
    seconds = [r[0] for r in rows(db, "SELECT DISTINCT t FROM window WHERE \"group\"='steady' ORDER BY t")]
    assert len(seconds) >= 10 and seconds == list(range(seconds[0], seconds[-1] + 1))
    # the killed group recorded before the kill and again after the restart
    rec_seconds = [r[0] for r in rows(db, "SELECT DISTINCT t FROM window WHERE \"group\"='rec' ORDER BY t")]
    assert rec_seconds[-1] >= seconds[-1] - 2
    assert "restarting" in err


def test_sigkill_controller_leaves_a_consistent_db_marked_aborted_next_time(tmp_path: Path) -> None:
    profile = recorder_profile()
    profile["duration"] = "60s"
    proc, db, _ = launch(tmp_path, profile)
    pid = wait_for(lambda: worker_pids(db, "rec"))[0]
    wait_for(lambda: rows(db, "SELECT COUNT(DISTINCT t) FROM window")[0][0] >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    flushed = rows(db, "SELECT COUNT(*), SUM(count) FROM window")[0]
    assert flushed[0] >= 3 and flushed[1] > 0
    # orphaned workers notice the controller is gone and exit by themselves
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 15)
    with __import__("sqlite3").connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert rows(db, "SELECT status FROM run") == [("running",)]
    listed = harness("runs", "--db", str(db), "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["status"] == "aborted"
    shown = harness("show", rows(db, "SELECT id FROM run")[0][0], "--db", str(db), "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["status"] == "aborted"
    assert summary["totals"]["requests"] == flushed[1]


@pytest.fixture
def dying_server() -> Iterator[tuple[str, threading.Event]]:
    """A real HTTP server on loopback that stops listening when the event is set."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # a new connection per request, so none outlives the server

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    kill = threading.Event()

    def serve() -> None:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        kill.wait()
        server.shutdown()
        server.server_close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", kill
    kill.set()


def test_target_that_dies_mid_run_gives_recorded_errors(tmp_path: Path, dying_server: Any) -> None:
    url, kill = dying_server
    profile = {
        "name": "dies",
        "duration": "6s",
        "stop_grace": "2s",
        "targets": {"api": {"url": url}},
        "groups": {
            "g": {
                "simulator": "http",
                "users": 3,
                "think_time": "50ms",
                "options": {"timeout": "1s", "connections": 1, "requests": [{"name": "get", "url": "/"}]},
            }
        },
    }
    threading.Timer(2.5, kill.set).start()
    proc, summary, _ = start(tmp_path, profile)
    assert proc.returncode == 0, proc.stderr
    get = summary["endpoints"][0]
    assert get["requests"] > get["failures"] > 0
    messages = " ".join(e["message"] for e in summary["errors"])
    assert any(kind in messages for kind in ("ConnectError", "ServerDisconnected")), messages


def test_hanging_target_times_out_and_stop_completes_within_grace(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(100)  # accepts connections (the kernel does) but never answers
    port = listener.getsockname()[1]
    profile = {
        "name": "hangs",
        "duration": "4s",
        "stop_grace": "2s",
        "targets": {"api": {"url": f"http://127.0.0.1:{port}"}},
        "groups": {
            "g": {
                "simulator": "http",
                "users": 5,
                "options": {"timeout": "30s", "requests": [{"name": "get", "url": "/"}]},
            },
            "quick": {
                "simulator": "http",
                "users": 2,
                "options": {"timeout": "500ms", "requests": [{"name": "get", "url": "/"}]},
            },
        },
    }
    try:
        began = time.monotonic()
        proc, summary, _ = start(tmp_path, profile)
        took = time.monotonic() - began
    finally:
        listener.close()
    assert proc.returncode == 0, proc.stderr
    quick = next(e for e in summary["endpoints"] if e["group"] == "quick")
    assert quick["failures"] > 0 and quick["failures"] == quick["requests"]
    assert any("timeout" in e["message"] for e in summary["errors"])
    # 4 s run + 2 s grace + start-up and the final report: never the 30 s request timeout
    assert took < 20, took


def test_sigint_stops_gracefully_and_writes_the_summary(tmp_path: Path) -> None:
    profile = recorder_profile()
    profile["duration"] = "60s"
    proc, db, report = launch(tmp_path, profile)
    wait_for(lambda: rows(db, "SELECT COUNT(DISTINCT t) FROM window")[0][0] >= 2)
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - began < 10
    assert proc.returncode == 3, err
    summary = json.loads((report / "summary.json").read_text())
    assert summary["status"] == "aborted" and "SIGINT" in summary["reason"]
    assert summary["totals"]["requests"] > 0
    assert rows(db, "SELECT status, exit_code FROM run") == [("aborted", 3)]
    assert "stopping" in err
