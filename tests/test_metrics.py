"""The metric-recording API: per-second windows, errors, timers, custom metrics, mergeable histograms."""

from __future__ import annotations

import asyncio
import math
import random
import time
from fractions import Fraction
from typing import Any

import pytest

from harness.metrics import (
    HIGHEST_US,
    MAX_ERROR_MESSAGES,
    Metrics,
    Timer,
    decode_histogram,
    error_text,
    merge_into,
    new_histogram,
    percentiles_ms,
    schedule_lag,
)


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_000.25) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics(clock: FakeClock) -> Metrics:
    return Metrics(clock=clock)


def windows(batch: dict[str, Any]) -> dict[tuple[int, str], dict[str, Any]]:
    return {(w["t"], w["name"]): w for w in batch["windows"]}


def only(metrics: Metrics, name: str) -> dict[str, Any]:
    found = [w for w in metrics.drain(everything=True)["windows"] if w["name"] == name]
    assert len(found) == 1, found
    return found[0]


# -- requests per second ---------------------------------------------------------------------------


def test_requests_are_counted_per_second_and_name(metrics: Metrics, clock: FakeClock) -> None:
    for _ in range(3):
        metrics.request("GET /", 0.010)
    metrics.request("POST /login", 0.020, kind="http")
    clock.now = 1_001.5
    metrics.request("GET /", 0.030)
    metrics.request("GET /", 0.040)

    batch = metrics.drain()  # at 1001.5: only second 1000 is finished
    got = windows(batch)
    assert set(got) == {(1000, "GET /"), (1000, "POST /login")}
    assert got[(1000, "GET /")]["count"] == 3
    assert got[(1000, "GET /")]["kind"] == "request"
    assert got[(1000, "POST /login")]["kind"] == "http"
    assert got[(1000, "GET /")]["failures"] == 0
    assert got[(1000, "GET /")]["errors"] == {}
    assert got[(1000, "GET /")]["hist_intended"] is None

    assert metrics.drain()["windows"] == []  # second 1001 is still open
    clock.now = 1_002.0
    got = windows(metrics.drain())
    assert set(got) == {(1001, "GET /")}
    assert got[(1001, "GET /")]["count"] == 2
    hist = decode_histogram(got[(1001, "GET /")]["hist"])
    assert hist.get_total_count() == 2
    assert hist.get_max_value() == pytest.approx(40_000, rel=1e-3)
    assert hist.get_min_value() == pytest.approx(30_000, rel=1e-3)
    assert metrics.drain(everything=True)["windows"] == []


def test_drain_everything_includes_the_current_second(metrics: Metrics) -> None:
    metrics.request("x", 0.001)
    assert metrics.drain()["windows"] == []
    batch = metrics.drain(everything=True)
    assert [(w["t"], w["name"], w["count"]) for w in batch["windows"]] == [(1000, "x", 1)]
    assert metrics.drain(everything=True) == {"windows": [], "metrics": [], "datapoints": [], "events": []}


def test_bytes_are_summed(metrics: Metrics) -> None:
    metrics.request("up", 0.001, bytes_sent=100, bytes_received=5)
    metrics.request("up", 0.001, bytes_sent=50)
    window = only(metrics, "up")
    assert (window["bytes_sent"], window["bytes_received"]) == (150, 5)


def test_latency_is_clamped_to_the_histogram_range(metrics: Metrics) -> None:
    metrics.request("fast", 0.0)
    metrics.request("fast", -1.0)
    metrics.request("slow", 10 * 3600.0)
    batch = windows(metrics.drain(everything=True))
    fast = decode_histogram(batch[(1000, "fast")]["hist"])
    assert fast.get_total_count() == 2 and fast.get_max_value() == 1
    slow = decode_histogram(batch[(1000, "slow")]["hist"])
    assert slow.get_max_value() == pytest.approx(HIGHEST_US, rel=1e-3)


# -- failures and error messages -------------------------------------------------------------------


def test_failures_and_deduplicated_errors(metrics: Metrics) -> None:
    for _ in range(3):
        metrics.request("op", 0.01, ok=False, error=ValueError("bad input"))
    metrics.request("op", 0.01, ok=False, error="timeout")
    metrics.request("op", 0.01, ok=False, error="timeout")
    metrics.request("op", 0.01, ok=False)
    metrics.request("op", 0.01)
    window = only(metrics, "op")
    assert window["count"] == 7
    assert window["failures"] == 6
    assert window["errors"] == {"ValueError: bad input": 3, "timeout": 2, "failed": 1}


def test_error_messages_are_capped(metrics: Metrics) -> None:
    for i in range(MAX_ERROR_MESSAGES + 10):
        metrics.request("op", 0.01, ok=False, error=f"error {i}")
    metrics.request("op", 0.01, ok=False, error="error 0")  # a known message still counts as itself
    metrics.request("op", 0.01, ok=False, error="brand new")
    errors = only(metrics, "op")["errors"]
    assert len(errors) == MAX_ERROR_MESSAGES + 1
    assert errors["error 0"] == 2
    assert errors["(other errors)"] == 11
    assert "brand new" not in errors
    assert sum(errors.values()) == MAX_ERROR_MESSAGES + 12


def test_error_cap_is_per_second(metrics: Metrics, clock: FakeClock) -> None:
    for i in range(MAX_ERROR_MESSAGES + 1):
        metrics.request("op", 0.01, ok=False, error=f"e{i}")
    clock.now += 1
    metrics.request("op", 0.01, ok=False, error="later")
    got = windows(metrics.drain(everything=True))
    assert "(other errors)" in got[(1000, "op")]["errors"]
    assert got[(1001, "op")]["errors"] == {"later": 1}


class Quiet(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (None, "failed"),
        ("", "failed"),
        ("   \n ", "failed"),
        ("timeout", "timeout"),
        ("  first line\nsecond line", "first line"),
        (ValueError("bad"), "ValueError: bad"),
        (Quiet(), "Quiet"),
        (KeyError("k"), "KeyError: 'k'"),
        (Quiet("Quiet already named"), "Quiet already named"),
        ("x" * 1000, "x" * 300),
    ],
)
def test_error_text(error: Any, text: str) -> None:
    assert error_text(error) == text


# -- timers ----------------------------------------------------------------------------------------


def test_timer_as_context_manager(metrics: Metrics) -> None:
    with metrics.timer("block", kind="sdk") as timer:
        assert isinstance(timer, Timer)
        timer.bytes_received = 10
        timer.bytes_sent = 3
        time.sleep(0.005)
    window = only(metrics, "block")
    assert (window["count"], window["failures"], window["kind"]) == (1, 0, "sdk")
    assert (window["bytes_sent"], window["bytes_received"]) == (3, 10)
    assert decode_histogram(window["hist"]).get_max_value() >= 5_000


def test_timer_records_a_raised_exception_as_failure(metrics: Metrics) -> None:
    with pytest.raises(KeyError), metrics.timer("block"):
        raise KeyError("k")
    window = only(metrics, "block")
    assert (window["count"], window["failures"]) == (1, 1)
    assert window["errors"] == {"KeyError: 'k'": 1}


def test_timer_fail_marks_failure_without_raising(metrics: Metrics) -> None:
    with metrics.timer("block") as timer:
        timer.fail("status 503")
    with metrics.timer("block") as timer:
        timer.fail()
    window = only(metrics, "block")
    assert (window["count"], window["failures"]) == (2, 2)
    assert window["errors"] == {"status 503": 1, "failed": 1}


def test_timer_factory_can_be_reused(metrics: Metrics) -> None:
    timer = metrics.timer("again")
    with timer:
        pass
    with timer:
        pass
    assert only(metrics, "again")["count"] == 2


def test_cancelled_block_is_not_recorded(metrics: Metrics) -> None:
    with pytest.raises(asyncio.CancelledError), metrics.timer("cancelled"):
        raise asyncio.CancelledError()
    assert metrics.drain(everything=True)["windows"] == []


def test_async_timer(metrics: Metrics) -> None:
    async def main() -> None:
        async with metrics.timer("async block") as timer:
            await asyncio.sleep(0.002)
            timer.bytes_received = 7
        with pytest.raises(RuntimeError):
            async with metrics.timer("async block"):
                raise RuntimeError("boom")

    asyncio.run(main())
    window = only(metrics, "async block")
    assert (window["count"], window["failures"], window["bytes_received"]) == (2, 1, 7)
    assert window["errors"] == {"RuntimeError: boom": 1}


def test_async_timer_is_not_recorded_when_cancelled(metrics: Metrics) -> None:
    async def main() -> None:
        entered = asyncio.Event()

        async def slow() -> None:
            async with metrics.timer("slow"):
                entered.set()
                await asyncio.sleep(10)

        task = asyncio.create_task(slow())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert metrics.drain(everything=True)["windows"] == []


def test_timer_as_decorator(metrics: Metrics) -> None:
    @metrics.timer("double")
    def double(x: int) -> int:
        """Twice x."""
        if x < 0:
            raise ValueError("negative")
        return 2 * x

    assert double(21) == 42
    assert double(1) == 2
    with pytest.raises(ValueError):
        double(-1)
    assert double.__name__ == "double" and double.__doc__ == "Twice x."
    window = only(metrics, "double")
    assert (window["count"], window["failures"]) == (3, 1)
    assert window["errors"] == {"ValueError: negative": 1}


def test_timer_as_async_decorator(metrics: Metrics) -> None:
    @metrics.timer("fetch", kind="http")
    async def fetch(x: int) -> int:
        await asyncio.sleep(0)
        if x < 0:
            raise ValueError("negative")
        return x + 1

    @metrics.timer("hang")
    async def hang() -> None:
        await asyncio.sleep(10)

    async def main() -> None:
        assert await fetch(1) == 2
        with pytest.raises(ValueError):
            await fetch(-1)
        task = asyncio.create_task(hang())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert asyncio.iscoroutinefunction(fetch)
    asyncio.run(main())
    batch = metrics.drain(everything=True)["windows"]
    assert [(w["name"], w["count"], w["failures"], w["kind"]) for w in batch] == [("fetch", 2, 1, "http")]


# -- counters, gauges, datapoints, events ----------------------------------------------------------


def test_counters_gauges_datapoints_events(metrics: Metrics, clock: FakeClock) -> None:
    metrics.counter("sent")
    metrics.counter("sent")
    metrics.counter("sent", 2.5)
    metrics.gauge("depth", 3)
    metrics.gauge("depth", 7)
    metrics.datapoint("peer-1", {"rtt_ms": 3.1})
    metrics.datapoint("peer-2", {"rtt_ms": 4.0}, t=999.0)
    metrics.event("talk finished", {"talk": 1})
    clock.now = 1_001.1
    metrics.counter("sent")
    metrics.event("bare")

    batch = metrics.drain()
    assert sorted(batch["metrics"], key=lambda m: m["name"]) == [
        {"t": 1000, "name": "depth", "type": "gauge", "value": 7.0},
        {"t": 1000, "name": "sent", "type": "counter", "value": 4.5},
    ]
    assert batch["datapoints"] == [
        {"t": 1_000.25, "entity": "peer-1", "values": {"rtt_ms": 3.1}},
        {"t": 999.0, "entity": "peer-2", "values": {"rtt_ms": 4.0}},
    ]
    assert batch["events"] == [
        {"t": 1_000.25, "type": "talk finished", "detail": {"talk": 1}},
        {"t": 1_001.1, "type": "bare", "detail": {}},
    ]
    assert batch["windows"] == []
    later = metrics.drain(everything=True)
    assert later["metrics"] == [{"t": 1001, "name": "sent", "type": "counter", "value": 1.0}]
    assert later["datapoints"] == [] and later["events"] == []


# -- histograms: exact merge across workers --------------------------------------------------------


def _exact(sorted_us: list[int], p: float) -> int:
    """The nearest-rank percentile of the raw values (rank computed without float rounding)."""
    return sorted_us[max(0, math.ceil(Fraction(str(p)) / 100 * len(sorted_us)) - 1)]


def test_histograms_merge_to_exact_percentiles() -> None:
    rng = random.Random(2024)
    recorded: list[int] = []
    batches = []
    for worker, n in enumerate((4_000, 6_000)):  # 10,000 samples: p50 and p99 are exact ranks
        clock = FakeClock(5_000.0)
        worker_metrics = Metrics(clock=clock)
        for i in range(n):
            latency = rng.lognormvariate(math.log(0.05 if worker else 0.02), 1.0)
            worker_metrics.request("GET /", latency)
            recorded.append(max(1, int(latency * 1e6)))
            if i % 1000 == 999:
                clock.now += 1  # spread over several seconds, several windows
        batches.append(worker_metrics.drain(everything=True))

    merged = new_histogram()
    windows_seen = 0
    for batch in batches:
        for window in batch["windows"]:
            merge_into(merged, window["hist"])
            merge_into(merged, window["hist_intended"])  # None: no-op
            windows_seen += 1
    assert windows_seen > 2
    recorded.sort()
    assert merged.get_total_count() == len(recorded) == 10_000
    for p in (50, 90, 99, 99.9):
        exact = _exact(recorded, p)
        assert merged.get_value_at_percentile(p) == pytest.approx(exact, rel=1e-3, abs=1), p
    assert merged.get_max_value() == pytest.approx(recorded[-1], rel=1e-3)
    assert merged.get_min_value() == pytest.approx(recorded[0], rel=1e-3, abs=1)

    in_ms = percentiles_ms(merged, (50, 99))
    assert in_ms[50] == pytest.approx(_exact(recorded, 50) / 1000, rel=1e-3)
    assert in_ms[99] == pytest.approx(_exact(recorded, 99) / 1000, rel=1e-3)


def test_merge_order_does_not_matter_and_encoding_round_trips(metrics: Metrics, clock: FakeClock) -> None:
    for i in range(1, 301):
        metrics.request("x", i / 1000)
        if i % 100 == 0:
            clock.now += 1
    encoded = [w["hist"] for w in metrics.drain(everything=True)["windows"]]
    assert len(encoded) == 3  # seconds 1000, 1001 and 1002, 100 samples each
    forward, backward = new_histogram(), new_histogram()
    for item in encoded:
        merge_into(forward, item)
    for item in reversed(encoded):
        merge_into(backward, item)
    assert forward.encode() == backward.encode()
    median = forward.get_value_at_percentile(50)
    assert decode_histogram(forward.encode()).get_value_at_percentile(50) == median
    assert forward.get_value_at_percentile(50) == pytest.approx(150_000, rel=1e-3)


def test_percentiles_of_an_empty_histogram_are_zero() -> None:
    assert percentiles_ms(new_histogram()) == {50: 0.0, 90: 0.0, 95: 0.0, 99: 0.0}
    merge_into(new_histogram(), None)
    merge_into(new_histogram(), b"")


# -- open model: latency from the intended start ---------------------------------------------------


def test_schedule_lag_adds_an_intended_histogram(metrics: Metrics) -> None:
    metrics.request("late", 0.100)
    token = schedule_lag.set(0.5)
    try:
        metrics.request("late", 0.100)
        metrics.request("late", 0.200)
        metrics.request("on time", 0.010)
    finally:
        schedule_lag.reset(token)
    metrics.request("after", 0.010)
    got = windows(metrics.drain(everything=True))
    late = got[(1000, "late")]
    actual = decode_histogram(late["hist"])
    intended = decode_histogram(late["hist_intended"])
    assert actual.get_total_count() == 3
    assert intended.get_total_count() == 2  # only the requests made while a lag was set
    assert intended.get_min_value() == pytest.approx(600_000, rel=1e-3)
    assert intended.get_max_value() == pytest.approx(700_000, rel=1e-3)
    assert actual.get_max_value() == pytest.approx(200_000, rel=1e-3)
    assert decode_histogram(got[(1000, "on time")]["hist_intended"]).get_max_value() == pytest.approx(
        510_000, rel=1e-3
    )
    assert got[(1000, "after")]["hist_intended"] is None


def test_schedule_lag_follows_asyncio_tasks(metrics: Metrics) -> None:
    async def iteration(lag: float) -> None:
        schedule_lag.set(lag)
        async with metrics.timer("op"):
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(iteration(1.0), iteration(2.0))

    asyncio.run(main())
    assert schedule_lag.get() is None  # each task had its own context
    intended = decode_histogram(only(metrics, "op")["hist_intended"])
    assert intended.get_total_count() == 2
    assert intended.get_min_value() == pytest.approx(1_000_000, rel=2e-3)
    assert intended.get_max_value() == pytest.approx(2_000_000, rel=2e-3)
