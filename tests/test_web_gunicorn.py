"""gunicorn serves the panel with the documented command, Socket.IO clients (WebSocket and
long-polling) receive a run's ticks from it, and its graceful shutdown stops the run gracefully."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import socketio

from harness.store import Store
from tests.clitools import ROOT

TOKEN = "gunicorn-test-token"
PROFILE = """
name: gunicorn-rec
duration: 60s
stop_grace: 2s
groups:
  rec:
    simulator: tests.sims:Recorder
    users: 2
    think_time: 50ms
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "gunicorn exited"
        try:
            requests.get(url + "api/session", timeout=1).close()
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError("gunicorn did not answer")


class Ticks:
    """A Socket.IO client that joins a run and counts its ticks."""

    def __init__(self, url: str, run_id: str, transport: str) -> None:
        self.client = socketio.Client(reconnection=False)
        self.ticks: list[dict[str, Any]] = []
        self.joined = threading.Event()
        self.client.on("tick", self.ticks.append)
        self.client.on("joined", lambda _data: self.joined.set())
        self.client.connect(url, auth={"token": TOKEN}, transports=[transport], wait_timeout=10)
        self.client.emit("join", {"run_id": run_id})


@pytest.mark.slow
def test_gunicorn_serves_the_panel_and_socketio_clients_get_ticks(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    env.update(HARNESS_DB=str(tmp_path / "h.db"), HARNESS_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
    gunicorn = Path(sys.executable).with_name("gunicorn")
    command = [str(gunicorn), "--worker-class", "gthread", "-w", "1", "--threads", "100"]
    command += ["-b", f"127.0.0.1:{port}", "web:create_app()"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    clients: list[Ticks] = []
    try:
        _wait_until_up(url, proc)
        assert requests.get(url + "api/runs", timeout=5).status_code == 401
        with pytest.raises(socketio.exceptions.ConnectionError):
            socketio.Client(reconnection=False).connect(url, transports=["websocket"], wait_timeout=5)

        auth = {"Authorization": f"Bearer {TOKEN}"}
        started = requests.post(url + "api/runs", json={"yaml": PROFILE}, headers=auth, timeout=10)
        assert started.status_code == 201, started.text
        run_id = started.json()["run_id"]
        clients = [Ticks(url, run_id, "websocket"), Ticks(url, run_id, "polling")]
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and min(len(c.ticks) for c in clients) < 2:
            time.sleep(0.2)
        for c in clients:
            assert c.joined.is_set()
            assert len(c.ticks) >= 2, c.client.transport()
            assert c.ticks[-1]["run_id"] == run_id and "rec" in c.ticks[-1]["groups"]

        for c in clients:
            c.client.disconnect()
        clients = []
        # gunicorn's graceful shutdown stops the active run gracefully: the run is recorded, not lost
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        store = Store(tmp_path / "h.db")
        try:
            run = store.get_run(run_id)
        finally:
            store.close()
        assert run is not None and run.status == "aborted" and run.reason == "stopped by panel shutdown"
    finally:
        for c in clients:
            c.client.disconnect()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            assert proc.stderr is not None
            proc.stderr.close()
