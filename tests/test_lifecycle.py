"""Supervisor lifecycle: step shapes, silent workers, and the second Ctrl-C."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.clitools import wait_for
from tests.test_reliability import launch
from tests.test_run import recorder_profile, rows, start

pytestmark = pytest.mark.slow


def test_steps_shape_adds_users_per_step_up_to_the_limit(tmp_path: Path) -> None:
    profile = recorder_profile(
        users=None,
        shape={
            "type": "steps",
            "step_time": "2s",
            "users_per_step": 2,
            "max_users": 6,
            "spawn_fraction": 1.0,
        },
    )
    del profile["groups"]["rec"]["users"]
    profile["duration"] = "9s"
    proc, summary, db = start(tmp_path, profile)
    assert proc.returncode == 0, proc.stderr
    seen = [r[0] for r in rows(db, "SELECT users FROM health ORDER BY t")]
    assert 2 in seen and 4 in seen and 6 in seen and max(seen) == 6
    # users never go down while the steps climb
    climbing = seen[: seen.index(6) + 1]
    assert climbing == sorted(climbing)
    assert summary["groups"]["rec"]["users_max"] == 6


def test_silent_worker_is_killed_and_restarted(tmp_path: Path) -> None:
    profile = recorder_profile(simulator="tests.sims:FreezeOnce", users=1, think_time="20ms", options={})
    profile["duration"] = "20s"
    proc, summary, _ = start(tmp_path, profile, env={"FREEZE_MARKER_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    types = [e["type"] for e in summary["events"]]
    assert "worker_unresponsive" in types and "worker_restarted" in types
    exited = next(e for e in summary["events"] if e["type"] == "worker_exited")
    assert exited["detail"]["signal"] == "SIGKILL"
    # it recorded again after the restart
    restarted_at = next(e["t"] for e in summary["events"] if e["type"] == "worker_restarted")
    assert summary["duration_s"] > restarted_at
    assert summary["endpoints"][0]["requests"] > 20


def test_second_interrupt_stops_at_once(tmp_path: Path) -> None:
    profile = recorder_profile(simulator="tests.sims:Sleeper", users=3, options={})
    profile["duration"] = "60s"
    profile["stop_grace"] = "60s"
    proc, db, report = launch(tmp_path, profile)
    wait_for(lambda: rows(db, "SELECT COUNT(*) FROM health")[0][0] >= 2)
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert proc.poll() is None  # the first interrupt waits for in-flight iterations
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - began < 15
    assert proc.returncode == 3, err
    summary = json.loads((report / "summary.json").read_text())
    assert summary["status"] == "aborted"
