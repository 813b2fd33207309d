"""RunController driven from another thread, as the panel drives it: scale a group, then stop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from harness.controller import RunController, RunOptions
from harness.errors import UsageError
from harness.profile import load_profile_text
from harness.store import Store

PROFILE = """
name: ctl
duration: 60s
stop_grace: 2s
groups:
  rec:
    simulator: tests.sims:Recorder
    users: 2
    think_time: 50ms
"""


def test_scale_and_stop_from_another_thread(tmp_path: Path) -> None:
    options = RunOptions(db_path=tmp_path / "h.db", report_dir=tmp_path / "report", view_mode="none")
    controller = RunController(load_profile_text(PROFILE), options)
    ticks: list[dict] = []
    controller.add_listener(ticks.append)
    thread = threading.Thread(target=controller.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
        g.get("users") == 2 for t in ticks for g in t["groups"].values()
    ):
        time.sleep(0.2)
    assert controller.status == "running"
    with pytest.raises(UsageError):
        controller.scale("nope", 3)
    controller.scale("rec", 5, who="alice")
    while time.monotonic() < deadline and not any(t["groups"]["rec"].get("users") == 5 for t in ticks):
        time.sleep(0.2)
    assert ticks[-1]["groups"]["rec"]["users"] == 5
    # live percentiles for the run and each group, merged from the last seconds' histograms
    assert 9.0 <= ticks[-1]["totals"]["p95_ms"] == ticks[-1]["groups"]["rec"]["p95_ms"] < 100
    controller.stop(who="bob")
    thread.join(timeout=20)
    assert controller.done.is_set() and controller.result is not None
    assert controller.result.status == "aborted" and controller.result.summary["reason"] == "stopped by bob"
    store = Store(tmp_path / "h.db")
    events = {e["type"]: e for e in store.events(controller.run_id)}
    store.close()
    assert events["scaled_manually"]["detail"] == {"value": 5, "unit": "users", "who": "alice"}
    assert events["stopping"]["detail"]["reason"] == "stopped by bob"
