"""The panel stays responsive while a run pushes every core to the limit: API calls answer in under a
second and ticks keep arriving once a second."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import socketio

from web import create_app, make_server, panel_url

SATURATE = [
    "duration=15s",
    "groups.browse.processes=2",
    "groups.browse.users=200",
    "groups.browse.think_time=0",
    "targets.echo.concurrency=64",
    "targets.echo.service_time=0",
    "thresholds=[]",
    # and a worker per core that only burns CPU, so the machine is at its limit whatever the HTTP side does
    "groups.burn.simulator=tests.sims:Burner",
    "groups.burn.users=2",
    "groups.burn.processes=2",
]


@pytest.fixture
def panel(tmp_path: Path) -> Iterator[str]:
    """The panel served over real HTTP from this process, as `harness serve` does."""
    app = create_app({"HARNESS_DB": str(tmp_path / "h.db")})
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield panel_url("127.0.0.1", server.port)
    app.extensions["harness_runs"].shutdown(who="test teardown", timeout=30)
    server.shutdown()
    server.server_close()
    app.extensions["harness_store"].close()


@pytest.mark.slow
@pytest.mark.exclusive  # it saturates every core on purpose, and times the panel meanwhile
def test_panel_answers_and_ticks_while_the_cores_are_saturated(panel: str) -> None:
    http = requests.Session()
    csrf = http.get(panel + "api/session", timeout=5).json()["csrf_token"]
    started = http.post(
        panel + "api/runs",
        json={"profile": "smoke", "overrides": SATURATE},
        headers={"X-CSRF-Token": csrf},
        timeout=10,
    )
    assert started.status_code == 201, started.text
    run_id = started.json()["run_id"]

    ticks: list[float] = []
    client = socketio.Client(reconnection=False)
    client.on("tick", lambda tick: ticks.append(time.monotonic()))
    client.connect(panel, transports=["websocket"], wait_timeout=10)
    client.emit("join", {"run_id": run_id})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            live = http.get(panel + f"api/runs/{run_id}", timeout=5).json()["live"]
            if live and live["totals"]["rps"] > 100:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the run never got going")

        psutil.cpu_percent(percpu=False)
        window_start = time.monotonic()
        first_tick = len(ticks)
        latencies: dict[str, list[float]] = {"runs": [], "run": []}
        for i in range(10):
            for key, url in (("runs", "api/runs"), ("run", f"api/runs/{run_id}")):
                t0 = time.perf_counter()
                response = http.get(panel + url, timeout=5)
                latencies[key].append(time.perf_counter() - t0)
                assert response.status_code == 200
            time.sleep(max(0.0, window_start + i + 1 - time.monotonic()))  # about one pair a second
        elapsed = time.monotonic() - window_start
        cpu = psutil.cpu_percent(percpu=False)
        arrived = len(ticks) - first_tick
        detail: dict[str, Any] = http.get(panel + f"api/runs/{run_id}", timeout=5).json()
        print(
            f"cpu {cpu:.0f}% over {elapsed:.1f}s; rps {detail['live']['totals']['rps']:.0f}; "
            f"max latency /api/runs {max(latencies['runs']) * 1000:.0f} ms, "
            f"/api/runs/<id> {max(latencies['run']) * 1000:.0f} ms; ticks {arrived}"
        )
        assert cpu >= 80, f"the run did not saturate the machine ({cpu:.0f}% CPU)"
        assert max(latencies["runs"]) < 1.0, latencies
        assert max(latencies["run"]) < 1.0, latencies
        assert arrived >= 8 * elapsed / 10, (arrived, elapsed)
    finally:
        client.disconnect()
        http.close()
