"""The HTML report: self-contained, offline, escaped — and its charts really render in headless Chromium
started in a network namespace with nothing but loopback."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.metrics import new_histogram
from harness.report.html import redact, render_html, write_html
from harness.report.summary import summarize
from harness.store import Run, Store

EVIL_NAME = "<script>alert(1)</script>"
EVIL_MESSAGE = 'boom <img src=x onerror=alert(2)> & "quotes" </script><!--'
EVIL_GROUP = "g<b>1</b>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# a reference that would make the browser fetch something from the network
NETWORK_REF = re.compile(
    r"""(?:\b(?:src|href|action|poster|data|srcset)\s*=\s*["']?\s*(?:https?:)?//)"""
    r"""|url\(\s*["']?\s*(?:https?:)?//|@import|<link\b|<iframe\b""",
    re.I,
)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, str, Path]]:
    """A real 12-second run of the built-in demo profile, through the real CLI."""
    work = tmp_path_factory.mktemp("demo")
    db = work / "h.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "start",
            "--profile",
            "demo",
            "--headless",
            "--quiet",
            "--duration",
            "12s",
            "--db",
            str(db),
            "--report-dir",
            str(work / "report"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=work,
    )
    assert proc.returncode in (0, 1), proc.stderr
    store = Store(db)
    run = store.list_runs(1)[0]
    yield store, run.id, work
    store.close()


def _hist(values_ms: list[float]) -> bytes:
    hist = new_histogram()
    for v in values_ms:
        hist.record_value(int(v * 1000))
    encoded: bytes = hist.encode()
    return encoded


def crafted_run(db: Path) -> tuple[Store, str, dict[str, Any]]:
    """A run written through the store API: hostile names and messages, a saturated load generator,
    a failed threshold and a worker that crashed and was restarted."""
    store = Store(db)
    run_id = "20260101-000000-evil"
    started = time.time() - 30
    profile = {
        "name": "evil<i>profile</i>",
        "description": "</script><script>alert(3)</script>",
        "targets": {"shop": {"url": "https://user:hunter2@shop.example/?api_key=abc123&x=1"}},
        "groups": {
            EVIL_GROUP: {
                "simulator": "http",
                "users": 5,
                "options": {
                    "headers": {"Authorization": "Bearer ${SHOP_TOKEN}", "X-Api-Key": "literal-key-999"},
                    "password": "pa55w0rd",
                    "requests": [{"name": EVIL_NAME, "url": "/"}],
                },
            }
        },
    }
    store.create_run(
        Run(
            id=run_id,
            profile="evil<i>profile</i>",
            started_at=started,
            ended_at=started + 20,
            status="failed",
            profile_json=json.dumps(profile),
            host="test",
        )
    )
    for i in range(20):
        t = int(started) + i
        failures = 3 if i >= 8 else 0
        events: list[dict[str, Any]] = []
        if i == 0:
            events.append({"t": started, "type": "run_started", "detail": {"profile": "evil"}})
        if i == 6:
            events.append(
                {"t": t + 0.2, "type": "worker_exited", "group": EVIL_GROUP, "detail": {"exit_code": -9}}
            )
        if i == 7:
            events.append(
                {"t": t + 0.4, "type": "worker_restarted", "group": EVIL_GROUP, "detail": {"restarts": 1}}
            )
        if i == 19:
            events.append({"t": started + 20, "type": "stopping", "detail": {"reason": EVIL_MESSAGE}})
        store.write_second(
            run_id,
            windows=[
                {
                    "t": t,
                    "group": EVIL_GROUP,
                    "name": EVIL_NAME,
                    "kind": "http",
                    "count": 10 + i,
                    "failures": failures,
                    "bytes_sent": 0,
                    "bytes_received": 0,
                    "hist": _hist([5 + i + k for k in range(10 + i)]),
                    "hist_intended": None,
                }
            ],
            errors=[
                {
                    "group": EVIL_GROUP,
                    "name": EVIL_NAME,
                    "message": EVIL_MESSAGE,
                    "count": failures,
                    "t": t + 0.5,
                }
            ]
            if failures
            else [],
            metrics=[],
            datapoints=[],
            health=[
                {
                    "t": t + 1.0,
                    "group": EVIL_GROUP,
                    "worker": 0,
                    "users": min(5, i + 1),
                    "cpu_percent": 97.0 if i >= 10 else 30.0,
                    "loop_lag_max_ms": 80.0 if i >= 10 else 2.0,
                    "dropped": 0,
                }
            ],
            events=events,
            logs=[],
        )
    run = store.get_run(run_id)
    assert run is not None
    summary = summarize(store, run)
    summary["status"] = "failed"
    summary["thresholds"] = [
        {"expr": f"p95_ms[{EVIL_GROUP}/{EVIL_NAME}] < 10", "value": 27.0, "ok": False, "abort": True},
        {"expr": "error_rate < 0.5", "value": 0.1, "ok": True, "abort": False},
    ]
    return store, run_id, summary


# -- headless Chromium, no network ----------------------------------------------------------------


def _offline_prefix() -> list[str]:
    """A command prefix that runs a program in a new network namespace with only loopback."""
    for prefix in (["unshare", "-n", "--"], ["unshare", "-r", "-n", "--"]):
        if shutil.which(prefix[0]) and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    pytest.fail("cannot create a network namespace (unshare -n needs root or user namespaces)")


def chromium(html_file: Path, *args: str, size: str = "1400,2400") -> subprocess.CompletedProcess[str]:
    """Headless Chromium on a file:// URL, offline (a fresh network namespace)."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: scripts/test installs it with scripts/install-system")
    profile = html_file.parent / f"chromium-profile-{len(args)}"
    cmd = [
        *_offline_prefix(),
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        f"--window-size={size}",
        *args,
        html_file.resolve().as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def rendered_page(html_file: Path, shot: Path) -> tuple[dict[str, str], Any]:
    """The body's data attributes after the scripts ran, and the screenshot as a Pillow image."""
    from PIL import Image

    dom = chromium(html_file, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:2000]
    attrs = {k: v.replace("&quot;", '"') for k, v in re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1))}
    snap = chromium(html_file, f"--screenshot={shot}")
    assert snap.returncode == 0 and shot.exists(), snap.stderr[-2000:]
    return attrs, Image.open(shot).convert("RGB")


def assert_chart_drawn(image: Any, box: dict[str, int]) -> None:
    """The plot area holds coloured lines, not an empty frame."""
    crop = image.crop((box["x"], box["y"], box["x"] + box["w"], box["y"] + box["h"]))
    raw = crop.tobytes()
    pixels = [(raw[i], raw[i + 1], raw[i + 2]) for i in range(0, len(raw), 3)]
    coloured = [p for p in pixels if max(p) - min(p) > 60]
    buckets = {(r // 32, g // 32, b // 32) for r, g, b in coloured}
    assert len(coloured) > 300, f"{box['chart']}: only {len(coloured)} coloured pixels"
    assert len(buckets) >= 3, f"{box['chart']}: colours {buckets}"
    non_white = sum(1 for p in pixels if min(p) < 235)
    assert non_white > 0.01 * len(pixels), f"{box['chart']}: blank"


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.exclusive  # the demo run must not report a saturated load generator
def test_demo_report_is_self_contained(demo: tuple[Store, str, Path]) -> None:
    store, run_id, work = demo
    path = write_html(store, run_id, work / "report")  # an existing directory: report.html inside
    assert path == work / "report" / "report.html"
    text = path.read_text(encoding="utf-8")
    assert not NETWORK_REF.findall(text)
    for cdn in ("cdn.", "unpkg", "jsdelivr", "googleapis", "cdnjs"):
        assert cdn not in text
    assert "uPlot" in text and "default-src 'none'" in text
    summary = json.loads((work / "report" / "summary.json").read_text())
    for endpoint in summary["endpoints"]:
        assert f">{endpoint['name']}<" in text
    for event_type in ("run_started", "scaled", "stopping", "run_stopped"):
        assert event_type in text
    assert summary["status"].upper() in text
    assert summary["thresholds"]
    for threshold in summary["thresholds"]:
        assert f"<code>{html.escape(threshold['expr'])}</code>" in text  # escaped: they hold "<"
    assert "The load generator itself was saturated" not in text


@pytest.mark.exclusive  # shares the demo run (a module fixture) with the test above
def test_demo_report_renders_its_charts_offline(demo: tuple[Store, str, Path]) -> None:
    store, run_id, work = demo
    path = write_html(store, run_id, work / "demo.html")
    attrs, image = rendered_page(path, work / "demo.png")
    assert int(attrs.get("charts-rendered", "0")) >= 4, attrs
    boxes = json.loads(attrs["chart-boxes"])
    assert {b["chart"] for b in boxes} >= {"users", "rps", "latency", "errors", "health"}
    for box in boxes:  # a chart with no errors still draws its flat coloured lines and markers
        assert_chart_drawn(image, box)


def test_hostile_names_and_messages_are_escaped(tmp_path: Path) -> None:
    store, run_id, summary = crafted_run(tmp_path / "evil.db")
    text = render_html(store, run_id, summary)
    for raw in (EVIL_NAME, "<img src=x", "<b>1</b>", "<i>profile</i>", "alert(3)</script>"):
        assert raw not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "boom &lt;img src=x onerror=alert(2)&gt; &amp; &quot;quotes&quot;" in text
    data = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    assert data is not None
    assert "<" not in data.group(1)  # nothing in the data block can close it or open a comment
    assert EVIL_NAME in json.dumps(json.loads(data.group(1)))  # yet the data is intact
    assert text.count("<script") == 3  # the data block, uPlot, the report's own script
    store.close()


def test_warning_banner_thresholds_events_and_secrets(tmp_path: Path) -> None:
    store, run_id, summary = crafted_run(tmp_path / "evil.db")
    assert summary["health"]["warnings"]
    timeline = {
        "window_s": 5,
        "rows": [
            {
                "t": 0,
                "users": 1,
                "requests": 50,
                "failures": 0,
                "failure_pct": 0.0,
                "p50_ms": 7,
                "p95_ms": 9,
                "timeouts": 0,
            },
            {
                "t": 10,
                "users": 5,
                "requests": 120,
                "failures": 15,
                "failure_pct": 12.5,
                "p50_ms": 20,
                "p95_ms": 27,
                "timeouts": 2,
            },
        ],
        "degradation": {"t": 10, "users": 5, "reason": "failures above 5%"},
        "capacity": {"low": 3, "high": 5},
    }
    path = write_html(store, run_id, tmp_path / "evil.html", summary, timeline)
    text = path.read_text(encoding="utf-8")
    assert "The load generator itself was saturated" in text and 'class="banner danger"' in text
    assert 'class="badge status-failed">FAILED<' in text
    assert "✗" in text and "✓" in text and ">abort<" in text
    assert "failures above 5%" in text and '<tr class="marked">' in text
    assert '"degradation"' in text and "worker_restarted" in text
    for secret in ("hunter2", "abc123", "literal-key-999", "pa55w0rd"):
        assert secret not in text
    assert "${SHOP_TOKEN}" not in text  # under an Authorization key: shown as ***
    assert "***" in text
    attrs, image = rendered_page(path, tmp_path / "evil.png")
    assert attrs.get("charts-rendered") == "5", attrs
    for box in json.loads(attrs["chart-boxes"]):
        assert_chart_drawn(image, box)
    store.close()


def test_redact() -> None:
    doc = {
        "token": "t",
        "nested": {"api_key": {"a": 1}, "Password": "p", "harmless": "ok", "list": [{"secret_x": 1}]},
        "url": "postgres://me:pw@db/x?token=zzz&b=2",
        "users": 3,
    }
    assert redact(doc) == {
        "token": "***",
        "nested": {"api_key": "***", "Password": "***", "harmless": "ok", "list": [{"secret_x": "***"}]},
        "url": "postgres://***@db/x?token=***&b=2",
        "users": 3,
    }


def test_unknown_run_is_an_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "empty.db")
    with pytest.raises(KeyError):
        render_html(store, "nope")
    store.close()
