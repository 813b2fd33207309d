"""scripts/bench runs end to end: harness, Locust and k6 against a local nginx, plus idle memory.

Only that numbers come out is checked, never a speed ratio (timed assertions would be flaky).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench"


def _missing() -> str | None:
    if not (shutil.which("nginx") or os.access("/usr/sbin/nginx", os.X_OK)) and os.geteuid() != 0:
        return "nginx is not installed (and not root to apt-get it)"
    if shutil.which("taskset") is None:
        return "taskset is not available"
    return None


@pytest.mark.slow
@pytest.mark.exclusive  # a benchmark: it checks for other load and would measure the other tests
@pytest.mark.timeout(420)
def test_bench_quick_produces_numbers_for_every_tool(tmp_path: Path) -> None:
    reason = _missing()
    assert reason is None, f"{reason}: scripts/install-system installs what the benchmark needs"
    out = tmp_path / "bench.json"
    # TMPDIR puts the bench's work directory (nginx prefix, tool logs) under tmp_path, so any process
    # left running would show tmp_path in its command line
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [str(BENCH), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    assert not data["errors"]

    by_tool = {row["tool"].split()[0]: row for row in data["rps"]}
    assert set(by_tool) == {"harness", "locust", "k6"}
    for tool, row in by_tool.items():
        assert row["error"] is None, (tool, row["error"])
        assert row["rps"] > 0, (tool, row)
        assert row["requests"] > 0, (tool, row)
        assert row["failures"] == 0, (tool, row)
    assert by_tool["harness"]["ratio"] is not None and by_tool["harness"]["ratio"] > 0

    idle = data["idle"]["harness"]
    assert idle["users"] == 2000
    assert idle["rss_bytes"] > idle["baseline_rss_bytes"] > 0
    assert idle["kb_per_user"] > 0
    assert idle["rss_100k_bytes"] > 0
    assert {t["name"].split(" ")[0] for t in data["targets"]} == {"harness", "100,000"}

    # the table was printed, and nothing was left running
    assert "Requests/s on one core" in proc.stdout
    assert "Memory per idle virtual user" in proc.stdout
    assert str(tmp_path) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
