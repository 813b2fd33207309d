"""Embedded reference targets: the service model saturates, echo routes answer, targets are supervised."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from harness.distributions import Constant, LogNormal
from harness.errors import TargetError, UsageError
from harness.targets import TARGETS, get_target
from harness.targets.echo import EchoConfig, build_app
from harness.targets.runner import EmbeddedTarget, check_url
from harness.targets.service import Refused, ServiceModel, ServiceModelConfig
from tests.clitools import free_port


@asynccontextmanager
async def serving(**config: Any) -> AsyncIterator[str]:
    """An echo target with `config` served in this event loop on 127.0.0.1; yields its base URL."""
    runner = web.AppRunner(build_app(EchoConfig.model_validate(config)), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def timed_get(session: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    """The status of `GET url` and how long it took."""
    start = time.perf_counter()
    async with session.get(url) as response:
        await response.read()
        return response.status, time.perf_counter() - start


async def burst(url: str, n: int) -> tuple[list[tuple[int, float]], float]:
    """`n` concurrent GETs of `url`: (status, latency) for each, and the elapsed time of the burst."""
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(timed_get(session, url) for _ in range(n)))
        return list(results), time.perf_counter() - start


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.json()


def http_status(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=2) as response:
        return int(response.status)


# --- the service model -------------------------------------------------------------------------


def test_config_defaults_and_distributions() -> None:
    config = EchoConfig()
    assert config.concurrency == 8 and config.queue_limit == 64 and config.error_rate == 0.0
    assert config.service_time == Constant(value=0.005)
    assert config.timeout is None and config.seed is None
    config = EchoConfig.model_validate(
        {"service_time": {"type": "lognormal", "median": "5ms", "p99": "50ms"}, "timeout": "2s"}
    )
    assert isinstance(config.service_time, LogNormal) and config.timeout == 2.0


def test_saturation_caps_throughput_and_latency_rises() -> None:
    async def scenario() -> None:
        async with serving(concurrency=2, service_time="50ms") as url:
            results, elapsed = await burst(url + "/", 20)
            stats = await get_json(url + "/_stats")
        assert [status for status, _ in results] == [200] * 20
        # 2 workers x 50 ms caps throughput at 40/s: 20 requests take ~0.5 s, not ~0.05 s.
        assert 0.45 <= elapsed < 1.0
        assert 20 / elapsed <= 42
        latencies = sorted(latency for _, latency in results)
        assert latencies[0] < 0.2  # the first served wait only for their service time
        assert latencies[-1] >= 0.4  # the last waited behind nine batches
        assert latencies[-1] > 3 * latencies[1]
        assert stats["served"] == 20 and stats["rejected"] == 0 and stats["errors"] == 0
        assert stats["peak_queued"] >= 10 and stats["in_service"] == 0 and stats["queued"] == 0

    asyncio.run(scenario())


def test_full_queue_answers_503_at_once() -> None:
    async def scenario() -> None:
        async with serving(concurrency=2, queue_limit=2, service_time="200ms") as url:
            results, _ = await burst(url + "/", 10)
            stats = await get_json(url + "/_stats")
        served = [latency for status, latency in results if status == 200]
        rejected = [latency for status, latency in results if status == 503]
        assert len(served) == 4 and len(rejected) == 6  # 2 in service + 2 queued; the rest turned away
        assert max(rejected) < 0.15  # turned away at once, not after waiting
        assert stats["rejected"] == 6 and stats["served"] == 4 and stats["timed_out"] == 0

    asyncio.run(scenario())


def test_queue_timeout_answers_503() -> None:
    async def scenario() -> None:
        async with serving(concurrency=1, service_time="300ms", timeout="50ms") as url:
            results, _ = await burst(url + "/", 3)
            stats = await get_json(url + "/_stats")
        statuses = sorted(status for status, _ in results)
        assert statuses == [200, 503, 503]
        assert all(0.04 <= latency < 0.25 for status, latency in results if status == 503)
        assert stats["timed_out"] == 2 and stats["rejected"] == 2

    asyncio.run(scenario())


@pytest.mark.parametrize(("error_rate", "expected"), [(1.0, 500), (0.0, 200)])
def test_error_rate(error_rate: float, expected: int) -> None:
    async def scenario() -> None:
        async with serving(error_rate=error_rate, service_time=0, seed=1) as url:
            results, _ = await burst(url + "/json", 20)
            stats = await get_json(url + "/_stats")
        assert [status for status, _ in results] == [expected] * 20
        assert stats["errors"] == (20 if expected == 500 else 0)

    asyncio.run(scenario())


def test_error_rate_is_a_fraction() -> None:
    async def scenario() -> None:
        async with serving(error_rate=0.3, service_time=0, seed=7) as url:
            results, _ = await burst(url + "/", 200)
        failures = sum(status == 500 for status, _ in results)
        assert 30 <= failures <= 90

    asyncio.run(scenario())


def test_health_and_stats_are_exempt_under_a_full_queue() -> None:
    async def scenario() -> None:
        async with (
            serving(concurrency=1, queue_limit=0, service_time="300ms") as url,
            aiohttp.ClientSession() as session,
        ):
            busy = asyncio.create_task(timed_get(session, url + "/"))
            await asyncio.sleep(0.1)  # let it take the only worker
            health, health_latency = await timed_get(session, url + "/health")
            other, _ = await timed_get(session, url + "/json")
            stats = await get_json(url + "/_stats")
            assert (await busy)[0] == 200
        assert health == 200 and health_latency < 0.1
        assert other == 503
        assert stats["in_service"] == 1 and stats["rejected"] == 1

    asyncio.run(scenario())


def test_echo_routes() -> None:
    async def scenario() -> None:
        async with serving(service_time=0) as url, aiohttp.ClientSession() as session:
            async with session.get(url + "/") as r:
                assert r.status == 200 and await r.text() == "ok\n"
            async with session.get(url + "/health") as r:
                assert await r.json() == {"status": "ok"}
            body = b'{"a": 1}'
            headers = {"Content-Type": "application/vnd.test+json"}
            async with session.put(url + "/echo", data=body, headers=headers) as r:
                assert r.status == 200 and await r.read() == body
                assert r.headers["Content-Type"] == "application/vnd.test+json"
            async with session.delete(url + "/echo?x=1&y=2&y=3", headers={"X-Test": "yes"}) as r:
                echoed = await r.json()
                assert echoed["method"] == "DELETE" and echoed["path"] == "/echo"
                assert echoed["query"] == {"x": "1", "y": ["2", "3"]}
                assert echoed["headers"]["X-Test"] == "yes"
            for code in (201, 204, 404, 418, 503):
                async with session.post(url + f"/status/{code}") as r:
                    assert r.status == code
            async with session.get(url + "/status/99") as r:
                assert r.status == 400
            start = time.perf_counter()
            async with session.get(url + "/delay/100") as r:
                assert r.status == 200
            assert time.perf_counter() - start >= 0.1
            async with session.get(url + "/bytes/1000") as r:
                assert r.status == 200 and len(await r.read()) == 1000
            async with session.get(url + f"/bytes/{10 * 1024 * 1024 + 1}") as r:
                assert r.status == 400
            async with session.get(url + "/json") as r:
                assert r.status == 200 and (await r.json())["name"] == "echo"
            async with session.get(url + "/_stats") as r:
                # Health and stats are not counted; every other request was served.
                assert (await r.json())["served"] == 13

    asyncio.run(scenario())


# --- the registry ------------------------------------------------------------------------------


def test_registry() -> None:
    assert "echo" in TARGETS
    assert get_target("echo").health_path == "/health"
    with pytest.raises(UsageError, match=r"unknown target 'nope'; known targets: .*echo"):
        get_target("nope")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"bogus": 1}, "bogus"),
        ({"service_time": "fast"}, "service_time"),
    ],
)
def test_bad_config_is_a_usage_error(config: dict[str, Any], field: str) -> None:
    with pytest.raises(UsageError, match=rf"target 'web': bad config: {field}"):
        EmbeddedTarget("web", "echo", config)


def test_unknown_kind_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown target 'nope'"):
        EmbeddedTarget("web", "nope", {})


# --- running targets ---------------------------------------------------------------------------


def test_embedded_target_is_supervised() -> None:
    target = EmbeddedTarget("web", "echo", {"service_time": "1ms"})
    assert target.url is None and not target.alive and not target.ensure_running()
    try:
        url = target.start(timeout=10)
        assert url == target.url and url.startswith("http://127.0.0.1:")
        assert target.alive and http_status(url + "/health") == 200
        assert not target.ensure_running()

        first_pid = target.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while target.alive and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not target.alive

        assert target.ensure_running()
        assert target.url == url and target.pid != first_pid  # same port, new process
        assert http_status(url + "/health") == 200 and http_status(url + "/json") == 200
    finally:
        target.stop()
    assert not target.alive and target.pid is None
    assert not target.ensure_running()  # stopped on purpose: the supervisor leaves it alone


def test_embedded_target_that_cannot_bind_is_a_target_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        target = EmbeddedTarget("web", "echo", {}, port=port)
        start = time.monotonic()
        with pytest.raises(TargetError, match=rf"target 'web' did not answer http://127.0.0.1:{port}/health"):
            target.start(timeout=10)
        assert time.monotonic() - start < 5  # the dead process is noticed, not waited out
        assert not target.alive


def test_check_url() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(TargetError, match=rf"target 'api' did not answer http://127.0.0.1:{port}/health"):
        check_url("api", f"http://127.0.0.1:{port}", "/health", timeout=0.5)
    assert time.monotonic() - start < 2

    with EmbeddedTarget("web", "echo", {"service_time": 0}) as target:
        assert target.url is not None
        check_url("web", target.url, "/health", timeout=2)
        check_url("web", target.url + "/status/404", None, timeout=2)  # any answer will do
        with pytest.raises(TargetError, match="HTTP 503"):
            check_url("web", target.url, "/status/503", timeout=0.3)
    with pytest.raises(UsageError):
        check_url("web", "ftp://example.invalid", None, timeout=0.3)


def test_run_foreground_prints_url_and_stops_cleanly() -> None:
    code = (
        "from harness.targets.runner import run_foreground\n"
        "raise SystemExit(run_foreground('echo', {'concurrency': 3}, '127.0.0.1', 0))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("echo target listening on http://127.0.0.1:")
        assert "(concurrency=3, service_time=5ms, queue_limit=64)" in line
        url = line.split()[4]
        assert http_status(url + "/health") == 200
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
        assert process.returncode == 0, err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_cancelled_and_timed_out_waiters_do_not_leak_workers() -> None:
    async def one(model: ServiceModel) -> None:
        async with model.serve():
            pass

    async def scenario() -> None:
        config = ServiceModelConfig.model_validate(
            {"concurrency": 2, "service_time": "50ms", "queue_limit": 10, "timeout": "20ms"}
        )
        model = ServiceModel(config, seed=3)
        tasks = [asyncio.create_task(one(model)) for _ in range(6)]
        await asyncio.sleep(0.01)
        assert model.in_service == 2 and model.queued == 4
        tasks[3].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(r, Refused) and r.status == 503 for r in results) == 3
        assert isinstance(results[3], asyncio.CancelledError)
        assert model.in_service == 0 and model.queued == 0
        # Every worker came back: a full batch is served at once again.
        start = time.perf_counter()
        await asyncio.gather(one(model), one(model))
        assert time.perf_counter() - start < 0.09
        assert model.stats()["served"] == 4 and model.stats()["timed_out"] == 3

    asyncio.run(scenario())


def test_every_target_kind_is_registered_and_validates_its_config() -> None:
    from harness.targets import TARGETS, get_target

    assert {"echo", "llm_engine", "genie", "pluto", "lighthouse", "results"} <= set(TARGETS)
    assert get_target("llm_engine").parse_config({}, label="llm").model_dump()["concurrency"] >= 1
