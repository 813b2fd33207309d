"""The `http` simulator against the real embedded echo target, driven through the simulator API,
with both of its clients (the fast path and aiohttp)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.errors import UsageError
from harness.metrics import Metrics, decode_histogram
from harness.simulator import SimulatorContext, User
from harness.targets.runner import EmbeddedTarget
from simulators.http import HttpOptions, HttpSimulator


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    """A real echo target on loopback with a small, fast service model."""
    with EmbeddedTarget("echo", "echo", {"concurrency": 16, "service_time": "1ms"}) as target:
        assert target.url is not None
        yield target.url


def make_ctx(url: str, options: dict[str, Any], metrics: Metrics, seed: int = 1) -> SimulatorContext:
    """A simulator context for one worker sending to the echo target at `url`."""
    return SimulatorContext(
        run_id="t",
        group="g",
        worker_index=0,
        workers=1,
        options=HttpOptions.model_validate(options),
        targets={"echo": url},
        metrics=metrics,
        log=logging.getLogger("test"),
        rng=random.Random(seed),
        run_dir=Path("."),
    )


@pytest.fixture(params=["fast", "aiohttp"])
def client(request: pytest.FixtureRequest) -> str:
    """The simulator's `client` option."""
    return str(request.param)


def run_sim(url: str, options: dict[str, Any], iterations: int, seed: int = 1) -> dict[str, dict[str, Any]]:
    """Run `iterations` iterations of one user; returns the drained windows merged by name."""
    metrics = Metrics()

    async def main() -> None:
        sim = HttpSimulator(make_ctx(url, options, metrics, seed))
        await sim.setup()
        user = User(0)
        try:
            for _ in range(iterations):
                await sim.iteration(user)
        finally:
            await sim.teardown()

    asyncio.run(main())
    merged: dict[str, dict[str, Any]] = {}
    for w in metrics.drain(everything=True)["windows"]:
        entry = merged.setdefault(
            w["name"],
            {"count": 0, "failures": 0, "errors": {}, "bytes_received": 0, "bytes_sent": 0, "hists": []},
        )
        for key in ("count", "failures", "bytes_received", "bytes_sent"):
            entry[key] += w[key]
        for message, n in w["errors"].items():
            entry["errors"][message] = entry["errors"].get(message, 0) + n
        entry["hists"].append(w["hist"])
    return merged


def test_weighted_choice_follows_weights(echo: str, client: str) -> None:
    stats = run_sim(
        echo,
        {
            "client": client,
            "requests": [{"name": "a", "url": "/", "weight": 3}, {"name": "b", "url": "/json"}],
        },
        400,
    )
    assert stats["a"]["count"] + stats["b"]["count"] == 400
    assert 0.65 < stats["a"]["count"] / 400 < 0.85
    assert stats["a"]["failures"] == stats["b"]["failures"] == 0


def test_sequence_sends_every_request_in_order_with_bodies(echo: str, client: str) -> None:
    options = {
        "client": client,
        "order": "sequence",
        "requests": [
            {
                "name": "post",
                "method": "post",
                "url": "/echo",
                "json": {"q": "shoes"},
                "checks": {"contains": "shoes"},
            },
            {"name": "bytes", "url": "/bytes/1000", "checks": {"status": 200}},
        ],
    }
    stats = run_sim(echo, options, 20)
    assert stats["post"]["count"] == stats["bytes"]["count"] == 20
    assert stats["post"]["failures"] == 0
    assert stats["post"]["bytes_sent"] == 20 * len(b'{"q": "shoes"}')
    assert stats["bytes"]["bytes_received"] == 20 * 1000
    hist = decode_histogram(stats["bytes"]["hists"][0])
    assert hist.get_total_count() > 0 and hist.get_max_value() > 0


def test_checks_fail_with_clear_messages(echo: str, client: str) -> None:
    options = {
        "client": client,
        "order": "sequence",
        "requests": [
            {"name": "status", "url": "/status/503"},
            {"name": "expected", "url": "/status/201", "checks": {"status": [200, 204]}},
            {"name": "contains", "url": "/", "checks": {"contains": "nope"}},
            {"name": "slow", "url": "/delay/60", "checks": {"max_latency": "20ms"}},
            {"name": "fine", "url": "/status/404", "checks": {"status": 404}},
        ],
    }
    stats = run_sim(echo, options, 3)
    assert stats["status"]["errors"] == {"HTTP 503": 3}
    assert stats["expected"]["errors"] == {"HTTP 201 (expected [200, 204])": 3}
    assert stats["contains"]["errors"] == {"body does not contain 'nope'": 3}
    assert stats["slow"]["errors"] == {"slower than 20 ms": 3}
    assert stats["fine"]["failures"] == 0


def test_timeouts_and_refused_connections_are_recorded(echo: str, client: str) -> None:
    options = {"client": client, "timeout": "100ms", "requests": [{"name": "t", "url": "/delay/2000"}]}
    stats = run_sim(echo, options, 2)
    assert stats["t"]["errors"] == {"timeout after 0.1s": 2}
    latency_ms = decode_histogram(stats["t"]["hists"][0]).get_max_value() / 1000
    assert 90 <= latency_ms < 1000
    options = {"client": client, "base_url": "http://127.0.0.1:9", "requests": [{"name": "r", "url": "/"}]}
    stats = run_sim(echo, options, 2)
    (message,) = stats["r"]["errors"]
    if client == "fast":
        assert message == "ConnectError: cannot connect to 127.0.0.1:9: Connection refused"
    else:
        assert message.startswith("ClientConnectorError") and "127.0.0.1:9" in message
    assert stats["r"]["failures"] == 2


def test_latency_includes_waiting_for_a_pooled_connection(echo: str) -> None:
    metrics = Metrics()

    async def main() -> None:
        options = {"connections": 1, "requests": [{"name": "slow", "url": "/delay/50"}]}
        sim = HttpSimulator(make_ctx(echo, options, metrics))
        await sim.setup()
        try:
            await asyncio.gather(*(sim.iteration(User(i)) for i in range(4)))
        finally:
            await sim.teardown()

    asyncio.run(main())
    # the four requests may straddle a second boundary: merge their windows
    windows = [w for w in metrics.drain(everything=True)["windows"] if w["name"] == "slow"]
    assert sum(w["count"] for w in windows) == 4 and sum(w["failures"] for w in windows) == 0
    slowest = max(decode_histogram(w["hist"]).get_max_value() for w in windows)
    assert slowest / 1000 >= 190  # the fourth waited for three


def test_https_urls_use_aiohttp_and_bad_requests_fail_setup(echo: str) -> None:
    async def main() -> None:
        options = {
            "requests": [{"name": "a", "url": "/"}, {"name": "b", "url": "https://127.0.0.1:1/"}],
        }
        sim = HttpSimulator(make_ctx(echo, options, Metrics()))
        await sim.setup()
        try:
            assert sim.fast is not None and sim.session is not None
            assert [r.fast is not None for r in sim.requests] == [True, False]
        finally:
            await sim.teardown()
        sim = HttpSimulator(make_ctx(echo, {"client": "aiohttp", "requests": [{"url": "/"}]}, Metrics()))
        await sim.setup()
        try:
            assert sim.fast is None and sim.session is not None
        finally:
            await sim.teardown()
        bad = {"requests": [{"name": "bad", "url": "/", "headers": {"X-A": "1\r\nX-B: 2"}}]}
        sim = HttpSimulator(make_ctx(echo, bad, Metrics()))
        with pytest.raises(UsageError, match="request 'bad': invalid header value"):
            await sim.setup()
        await sim.teardown()

    asyncio.run(main())
