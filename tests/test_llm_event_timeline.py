"""A laptop-scaled llm-event run ramps participants past the embedded assistant's capacity, and
`harness timeline` names the degradation point and the users at it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clitools import harness

pytestmark = pytest.mark.slow

SCALED = [
    "--duration", "110s",
    "--set", "stop_grace=5s",
    "--set", "groups.speakers.users=4",
    "--set", "groups.speakers.options.conversations=4",
    "--set", "groups.participants.options.conversations=4",
    "--set", "groups.speakers.options.chunk_interval=1s",
    "--set", "groups.participants.start_delay=3s",
    "--set", "groups.participants.shape.stages=[{duration: 20s, target: 15}, {duration: 20s, target: 15}, "
    "{duration: 20s, target: 30}, {duration: 20s, target: 30}, {duration: 20s, target: 45}, "
    "{duration: 20s, target: 45}]",
    "--set", "groups.participants.think_time={type: uniform, min: 1s, max: 3s}",
]  # fmt: skip


@pytest.mark.timeout(400)
def test_timeline_finds_where_the_assistant_degrades(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    run = harness(
        "start", "--profile", "llm-event", "--headless", "--quiet", "--db", str(db),
        "--report-dir", str(tmp_path / "report"), *SCALED, timeout=360,
    )  # fmt: skip
    # the original's thresholds fail once answers slow down: that is the point of the ramp
    assert run.returncode in (0, 1), run.stderr
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    names = {(e["group"], e["name"]) for e in summary["endpoints"]}
    assert ("speakers", "transcript") in names and ("participants", "user_message") in names
    timeline = harness(
        "timeline", summary["run_id"], "--db", str(db), "--window", "10s", "--max-p95", "4s", "--json"
    )
    assert timeline.returncode == 0, timeline.stderr
    result = json.loads(timeline.stdout)
    degradation = result["degradation"]
    assert degradation is not None, result["rows"]
    assert 30 <= degradation["t"] <= 110
    assert degradation["users"] > 15  # past the first plateau
    assert result["capacity"]["low"] <= result["capacity"]["high"] == degradation["users"]
