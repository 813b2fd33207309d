"""The terminal output: live display, CI lines, quiet mode and the final summary."""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from rich.console import Console

from harness.console import (
    SATURATED,
    LiveView,
    _worst_p95,
    choose_mode,
    fmt_duration,
    fmt_ms,
    fmt_pct,
    fmt_rps,
    print_summary,
    saturation,
)


def make_console(**kwargs: Any) -> Console:
    """A plain 120-column console writing into a string buffer."""
    kwargs.setdefault("force_terminal", False)
    return Console(file=io.StringIO(), width=120, **kwargs)


def output(console: Console) -> str:
    """Everything printed to a `make_console` console."""
    file = console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def sample_tick(
    elapsed: float = 35.2, cpu: float = 63.0, lag: float = 2.0, dropped: int = 0
) -> dict[str, Any]:
    """A tick shaped like `Collector._tick()`'s."""
    return {
        "t": 1_700_000_000.0 + elapsed,
        "elapsed": elapsed,
        "duration": 120.0,
        "groups": {
            "api": {
                "rps": 700.0,
                "errors_per_s": 3.2,
                "requests": 24000,
                "failures": 96,
                "users": 30,
                "target": 30,
                "mode": "closed",
                "workers": 2,
                "state": "running",
            },
            "ingest": {
                "rps": 112.3,
                "errors_per_s": 0.0,
                "requests": 3900,
                "failures": 0,
                "users": 10,
                "target": 120.0,
                "mode": "open",
                "workers": 1,
            },
        },
        "endpoints": [
            {
                "group": "ingest",
                "name": "POST /events",
                "kind": "http",
                "rps": 112.3,
                "errors_per_s": 0.0,
                "p50_ms": 3.25,
                "p95_ms": 9.0,
                "p99_ms": 15.0,
                "requests": 3900,
                "failures": 0,
            },
            {
                "group": "api",
                "name": "GET /users",
                "kind": "http",
                "rps": 700.0,
                "errors_per_s": 3.2,
                "p50_ms": 4.5,
                "p95_ms": 12.14,
                "p99_ms": 250.4,
                "requests": 24000,
                "failures": 96,
            },
        ],
        "totals": {"requests": 27900, "failures": 96, "rps": 812.3, "error_rate": 0.004},
        "health": {"workers": 3, "cpu_max": cpu, "loop_lag_max_ms": lag, "rss_mb": 312.0, "dropped": dropped},
        "errors": [
            {"group": "api", "name": "GET /users", "message": "HTTP 503", "count": 90},
            {"group": "api", "name": "GET /users", "message": "TimeoutError: read timed out", "count": 6},
        ],
    }


def sample_summary(**overrides: Any) -> dict[str, Any]:
    """A summary.json dict of a failed run."""
    summary: dict[str, Any] = {
        "run_id": "20240501-120000-abcd",
        "profile": "checkout",
        "status": "failed",
        "started_at": 1_714_564_800.0,
        "ended_at": 1_714_564_920.0,
        "totals": {
            "requests": 27900,
            "failures": 96,
            "error_rate": 0.00344,
            "rps": 232.5,
            "p50_ms": 4.4,
            "p95_ms": 11.8,
            "p99_ms": 240.7,
            "max_ms": 1834.2,
        },
        "endpoints": [
            {
                "group": "api",
                "name": "GET /users",
                "requests": 24000,
                "failures": 96,
                "rps": 200.0,
                "p50_ms": 4.5,
                "p90_ms": 9.9,
                "p95_ms": 12.1,
                "p99_ms": 250.4,
                "max_ms": 1834.2,
            },
            {
                "group": "ingest",
                "name": "POST /events",
                "requests": 3900,
                "failures": 0,
                "rps": 32.5,
                "p50_ms": 3.2,
                "p90_ms": 7.0,
                "p95_ms": 9.0,
                "p99_ms": 15.0,
                "max_ms": 40.0,
            },
        ],
        "thresholds": [
            {"expr": "p95_ms < 500", "value": 11.8, "ok": True},
            {"expr": "error_rate < 0.001", "value": 0.00344, "ok": False},
        ],
        "groups": {
            "api": {"simulator": "http", "users_max": 30},
            "ingest": {"simulator": "http", "users_max": 10},
        },
        "health": {
            "cpu_max": 63.0,
            "loop_lag_max_ms": 2.0,
            "dropped": 0,
            "warnings": ["worker api#1 restarted once"],
        },
        "errors": [
            {"group": "api", "name": "GET /users", "message": f"error kind {i}", "count": i}
            for i in range(1, 8)
        ],
        "report_dir": "harness-data/runs/20240501-120000-abcd",
    }
    summary.update(overrides)
    return summary


@contextmanager
def stderr_handler() -> Iterator[logging.StreamHandler[Any]]:
    """A root-logger handler on the current sys.stderr, as `logging.basicConfig` would install."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


# -- format helpers ----------------------------------------------------------------------------
def test_format_helpers() -> None:
    assert fmt_ms(12.14) == "12.1"
    assert fmt_ms(99.94) == "99.9"
    assert fmt_ms(250.4) == "250"
    assert fmt_ms(None) == "-"
    assert fmt_rps(812.345) == "812.3"
    assert fmt_pct(0.004) == "0.40%"
    assert fmt_pct(None) == "-"
    assert fmt_duration(35.2) == "35s"
    assert fmt_duration(125) == "2m05s"
    assert fmt_duration(3720) == "1h02m"


def test_saturation_levels() -> None:
    assert saturation({"cpu_max": 63, "loop_lag_max_ms": 2, "dropped": 0}) is None
    assert saturation({"cpu_max": 85}) == "yellow"
    assert saturation({"loop_lag_max_ms": 60}) == "yellow"
    assert saturation({"cpu_max": 95}) == "red"
    assert saturation({"dropped": 3}) == "red"
    assert saturation({}) is None


def test_choose_mode() -> None:
    assert choose_mode(True, make_console(force_terminal=True)) == "quiet"
    assert choose_mode(False, make_console(force_terminal=True)) == "live"
    assert choose_mode(False, make_console()) == "lines"


# -- live mode ---------------------------------------------------------------------------------
def test_live_view_renders_a_tick() -> None:
    console = make_console()
    view = LiveView("run-42", "checkout", 120.0, "live", console=console)
    view.start()
    view.update(sample_tick())
    view.stop()
    text = output(console)
    for expected in ("run-42", "checkout", "35s / 2m00s", "1m25s left"):
        assert expected in text
    # groups: closed users/target, open rate
    for expected in ("api", "ingest", "closed", "open", "30/30", "120.0/s", "running", "700.0", "3.2"):
        assert expected in text
    # endpoints, api before ingest, with percentiles formatted
    assert text.index("GET /users") < text.index("POST /events")
    for expected in ("4.5", "12.1", "250", "24000", "96", "0.40%"):
        assert expected in text
    assert "HTTP 503" in text and "TimeoutError: read timed out" in text
    assert "3 workers" in text and "cpu max 63%" in text and "rss 312 MB" in text
    assert SATURATED not in text


def test_live_view_warns_when_saturated() -> None:
    console = make_console()
    view = LiveView("run-42", "checkout", 120.0, "live", console=console)
    view.start()
    view.update(sample_tick(cpu=95.0))
    view.stop()
    assert "load generator saturated: results may be tainted" in output(console)


def test_live_view_limits_endpoint_rows() -> None:
    tick = sample_tick()
    tick["endpoints"] = [
        {"group": "api", "name": f"GET /item/{i:02d}", "rps": 1.0, "requests": 10, "failures": 0}
        for i in range(40)
    ]
    console = make_console(height=60)
    view = LiveView("run-42", "checkout", 120.0, "live", console=console)
    view.start()
    view.update(tick)
    view.stop()
    text = output(console)
    assert "GET /item/00" in text and "GET /item/13" in text
    assert "GET /item/14" not in text
    assert "+26 more" in text


def test_live_view_tolerates_sparse_ticks() -> None:
    console = make_console()
    view = LiveView("run-7", "smoke", 0.0, "live", console=console)
    view.start()
    view.update({"elapsed": 3.0, "groups": {"api": {}}, "endpoints": [{"group": "api", "name": "x"}]})
    view.stop()
    text = output(console)
    assert "run-7" in text and "3s elapsed" in text and "api" in text


def test_live_view_before_first_tick_and_ticks_after_stop() -> None:
    console = make_console()
    view = LiveView("run-42", "checkout", 120.0, "live", console=console)
    view.start()
    view.stop()
    view.update(sample_tick())  # late tick from the collector: ignored
    view.stop()
    text = output(console)
    assert "waiting for the first second" in text
    assert "GET /users" not in text


def test_live_view_routes_logging_through_the_console(capsys: pytest.CaptureFixture[str]) -> None:
    console = make_console(force_terminal=True)
    view = LiveView("run-42", "checkout", 120.0, "live", console=console)
    log = logging.getLogger("harness.test")
    with stderr_handler() as handler:
        stderr = handler.stream
        view.start()
        log.warning("worker %s restarted", "api#1")
        view.update(sample_tick())
        view.stop()
        assert handler.stream is stderr
        assert "WARNING worker api#1 restarted" in output(console)
        assert capsys.readouterr().err == ""
        log.warning("after the run")
        assert "WARNING after the run" in capsys.readouterr().err


def test_live_view_update_from_another_thread() -> None:
    console = make_console()
    view = LiveView("run-42", "checkout", 120.0, "live", console=console)
    view.start()
    threads = [threading.Thread(target=view.update, args=(sample_tick(elapsed=i),)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    view.stop()
    assert "GET /users" in output(console)


# -- lines and quiet modes ------------------------------------------------------------------------
def test_lines_mode_prints_every_five_seconds() -> None:
    console = make_console()
    view = LiveView("run-42", "checkout", 120.0, "lines", console=console)
    view.start()
    for elapsed in (1.2, 2.2, 3.3, 4.2):
        view.update(sample_tick(elapsed=elapsed))
    assert output(console) == ""
    for elapsed in (5.2, 6.2, 9.9, 10.1, 11.2, 17.0, 35.2):
        view.update(sample_tick(elapsed=elapsed))
    view.stop()
    view.update(sample_tick(elapsed=40.2))  # after stop: ignored
    lines = output(console).splitlines()
    assert [line[:12] for line in lines] == ["[   5s/120s]", "[  10s/120s]", "[  17s/120s]", "[  35s/120s]"]
    assert lines[-1] == "[  35s/120s] users 40 | 812.3 rps | p95 12.1 ms | err 0.40% | cpu 63% lag 2 ms"


def test_lines_mode_flags_saturation() -> None:
    console = make_console()
    view = LiveView("run-42", "checkout", 120.0, "lines", console=console)
    view.update(sample_tick(elapsed=5.0, lag=80.0, dropped=12))
    text = output(console)
    assert "lag 80 ms | dropped 12 | load generator saturated: results may be tainted" in text


def test_quiet_mode_prints_nothing() -> None:
    console = make_console()
    view = LiveView("run-42", "checkout", 120.0, "quiet", console=console)
    view.start()
    for elapsed in range(0, 30, 1):
        view.update(sample_tick(elapsed=float(elapsed), cpu=99.0))
    view.stop()
    assert output(console) == ""


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown console mode"):
        LiveView("run-42", "checkout", 120.0, "fancy", console=make_console())  # type: ignore[arg-type]


# -- summary -----------------------------------------------------------------------------------------
def test_summary_of_a_failed_run() -> None:
    console = make_console()
    print_summary(sample_summary(), console=console)
    text = output(console)
    for expected in ("20240501-120000-abcd", "checkout", "(2m00s)", "api (http, max 30 users)"):
        assert expected in text
    for expected in ("GET /users", "POST /events", "24000", "250", "1834", "9.9", "total", "27900", "0.34%"):
        assert expected in text
    assert "✓" in text and "✗" in text
    assert "error_rate < 0.001" in text
    # the top five errors by count, and a count of the rest
    assert "error kind 7" in text and "error kind 3" in text
    assert "error kind 2" not in text and "+2 more kinds of error" in text
    assert "warning: worker api#1 restarted once" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("FAILED")
    assert "20240501-120000-abcd" in last and "harness-data/runs/20240501-120000-abcd" in last


def test_summary_of_a_passed_run_without_color() -> None:
    console = Console(file=io.StringIO(), width=120, no_color=True)
    print_summary(sample_summary(status="passed", thresholds=[], errors=[], report_dir=None), console=console)
    text = output(console)
    assert "\x1b[" not in text
    assert "✗" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("PASSED") and "report" not in last


def test_summary_colors_thresholds_on_a_terminal() -> None:
    console = make_console(force_terminal=True, color_system="standard")
    print_summary(sample_summary(status="aborted"), console=console)
    text = output(console)
    assert "\x1b[1;32m✓" in text and "\x1b[1;31m✗" in text
    assert "ABORTED" in text


def test_summary_with_almost_nothing() -> None:
    console = make_console()
    print_summary(
        {"run_id": "r1", "status": "aborted", "thresholds": [{"expr": "p99_ms < 1", "ok": False}]}, console
    )
    text = output(console)
    assert "total" in text and "missing" in text and "✗" in text
    assert text.strip().splitlines()[-1].startswith("ABORTED  run r1")


def test_summary_with_a_saturated_harness() -> None:
    console = make_console()
    print_summary(sample_summary(health={"cpu_max": 95.0, "loop_lag_max_ms": 3.0, "dropped": 0}), console)
    assert SATURATED in output(console)


def test_summary_on_an_ascii_only_log() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    console = Console(file=stream, width=120)
    errors = [{"group": "api", "name": "GET /users", "message": "bad byte \u2603 in body", "count": 2}]
    print_summary(sample_summary(errors=errors), console=console)
    stream.flush()
    text = raw.getvalue().decode("ascii")
    assert "FAIL" in text and "bad byte ? in body" in text
    assert text.strip().splitlines()[-1].startswith("FAILED")


def test_the_live_worst_p95_leaves_out_phases_and_iteration_errors() -> None:
    endpoints = [
        {"name": "run.log", "kind": "sdk", "rps": 40.0, "p95_ms": 0.2},
        {"name": "flush_latency", "kind": "phase", "rps": 40.0, "p95_ms": 960.0},
        {"name": "(iteration)", "kind": "error", "rps": 1.0, "p95_ms": 5000.0},
        {"name": "idle", "kind": "http", "rps": 0.0, "p95_ms": 3000.0},
    ]
    assert _worst_p95(endpoints) == 0.2
