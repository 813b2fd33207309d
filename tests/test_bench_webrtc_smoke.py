"""scripts/bench-webrtc runs end to end: aiortc peers in one worker, then one headless Chromium peer.

Only that sane numbers come out is checked, never a capacity (timed assertions would be flaky on a
shared two-core machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench-webrtc"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh folder with a short path, removed afterwards. Chromium puts its singleton socket in
    $TMPDIR/org.chromium.Chromium.XXXXXX/SingletonSocket, and a Unix socket's path must fit in 107 bytes:
    pytest's tmp_path is too long for that under pytest-xdist (…/popen-gw1/…) and Chromium exits."""
    folder = Path(tempfile.mkdtemp(prefix="h-bw-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.exclusive  # a benchmark: it checks for other load and would measure the other tests
@pytest.mark.timeout(300)
def test_bench_webrtc_quick_reports_peers_per_worker_and_browser_memory(short_tmp: Path) -> None:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("chromium and chromedriver are needed: scripts/install-system installs them")
    out = short_tmp / "bench-webrtc.json"
    # TMPDIR puts the work directory and the browsers' profiles under short_tmp, so any process left
    # running would show short_tmp in its command line; no waiting for a quiet machine, no retries
    env = {**os.environ, "TMPDIR": str(short_tmp)}
    proc = subprocess.run(
        [str(BENCH), "--quick", "--json", str(out), "--max-wait", "0", "--retries", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    assert not data["errors"]

    # aiortc peers: 4 then 8 (quick), each with numbers from the run's database
    steps = data["peers"]
    assert [s["users"] for s in steps][:1] == [4]
    assert data["peers_sustained"] >= 1
    for step in steps:
        assert step["cpu_mean"] is not None and 0 <= step["cpu_mean"] <= 100, step
        assert step["cpu_p90"] is not None and step["cpu_p90"] >= step["cpu_mean"] - 1e-9, step
        assert step["rss_bytes"] > 50e6 and step["rss_per_peer_bytes"] > 0, step
        assert step["tick_hz"] is not None and step["tick_hz"] > 0, step
        assert step["deliver_position"]["count"] > 0 and step["deliver_position"]["p95_ms"] > 0, step
        assert step["received_per_peer_s"] > 0 and step["connections_per_peer"] >= 1, step
        assert step["steady_s"] > 0, step
        if step["sustained"]:
            assert step["publishing_peers"] == step["users"] and not step["failed"], step

    # one browser: its PSS, and the ratio to aiortc peers
    (browser,) = data["browsers"]
    assert browser["browsers"] == 1 and not browser.get("error"), browser
    assert browser["total_mb"] > 50 and browser["connections_per_browser"] >= 1, browser
    memory = data["memory"]
    assert memory["first_browser_mb"] > 50
    assert memory["memory_per_browser_mb"] > 50
    assert memory["per_additional_browser_mb"] is None  # one browser: no marginal figure
    assert memory["aiortc_rss_per_peer_mb"] > 0
    assert memory["aiortc_peers_per_browser"] > 1

    # the tables were printed, and nothing was left running
    assert "aiortc peers in one worker" in proc.stdout
    assert "Memory of headless Chromium peers" in proc.stdout
    assert str(short_tmp) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
