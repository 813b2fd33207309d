"""gunicorn serves the panel with the documented command, Socket.IO clients (WebSocket and
long-polling) receive a run's ticks from it, and its graceful shutdown stops the run gracefully."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
import socketio
import yaml

from harness.store import Store
from tests.clitools import free_port
from tests.paneltools import TickClient, start_gunicorn, stop_gunicorn, wait_until_up
from tests.test_run import recorder_profile

TOKEN = "gunicorn-test-token"
PROFILE = yaml.safe_dump({**recorder_profile(users=2), "name": "gunicorn-rec", "duration": "60s"})


@pytest.mark.slow
def test_gunicorn_serves_the_panel_and_socketio_clients_get_ticks(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = start_gunicorn(port, {"HARNESS_DB": str(tmp_path / "h.db"), "HARNESS_TOKEN": TOKEN})
    clients: list[TickClient] = []
    try:
        wait_until_up(url, proc)
        assert requests.get(url + "api/runs", timeout=5).status_code == 401
        with pytest.raises(socketio.exceptions.ConnectionError):
            socketio.Client(reconnection=False).connect(url, transports=["websocket"], wait_timeout=5)

        auth = {"Authorization": f"Bearer {TOKEN}"}
        started = requests.post(url + "api/runs", json={"yaml": PROFILE}, headers=auth, timeout=10)
        assert started.status_code == 201, started.text
        run_id = started.json()["run_id"]
        clients = [TickClient(url, run_id, TOKEN, "websocket"), TickClient(url, run_id, TOKEN, "polling")]
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and min(len(c.ticks) for c in clients) < 2:
            time.sleep(0.2)
        for c in clients:
            assert c.joined.is_set()
            assert len(c.ticks) >= 2, c.client.transport()
            assert c.ticks[-1]["run_id"] == run_id and "rec" in c.ticks[-1]["groups"]

        for c in clients:
            c.close()
        clients = []
        # gunicorn's graceful shutdown stops the active run gracefully: the run is recorded, not lost
        assert stop_gunicorn(proc, timeout=40) == 0
        store = Store(tmp_path / "h.db")
        try:
            run = store.get_run(run_id)
        finally:
            store.close()
        assert run is not None and run.status == "aborted" and run.reason == "stopped by panel shutdown"
    finally:
        for c in clients:
            c.close()
        stop_gunicorn(proc)
