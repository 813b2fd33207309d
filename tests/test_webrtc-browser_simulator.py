"""The `webrtc-browser` simulator with real headless Chromium, a real lighthouse and real aiortc peers,
everything on 127.0.0.1 and in the test's own event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.errors import UsageError
from harness.metrics import Metrics
from harness.simulator import Simulator, SimulatorContext, StopUser, User
from harness.targets.lighthouse import LighthouseConfig, build_app
from harness.targets.runner import served
from simulators.webrtc.browser import BrowserOptions, BrowserSimulator, profile_processes
from simulators.webrtc.protocol import FAMILIES

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FIELDS = [
    f"{f}{s}"
    for f in FAMILIES
    for s in ("", "Total", "PerSecond", "Bytes", "TotalBytes", "BytesPerSecond", "AveragePacketSize")
]
FAST: dict[str, Any] = {
    "stats_interval": 1.0,
    "start_jitter": 0.2,
    "ping_interval": 1.0,
    "profile_every": 0.5,
    "chat_every": 1.0,
}


@pytest.fixture(autouse=True)
def _browsers_installed() -> None:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("chromium and chromedriver are needed: scripts/install-system installs them")


@asynccontextmanager
async def lighthouse(**config: Any) -> AsyncIterator[str]:
    """A real lighthouse on 127.0.0.1 and a free port, in this loop."""
    async with served(build_app(LighthouseConfig.model_validate({"seed": 1, **config}))) as url:
        yield url


def make_ctx(
    options: Any, url: str, metrics: Metrics, run_dir: Path, seed: int, executor: Any = None
) -> SimulatorContext:
    return SimulatorContext(
        run_id=f"run-{seed}",
        group="g",
        worker_index=0,
        workers=1,
        options=options,
        targets={"lighthouse": url},
        metrics=metrics,
        log=logging.getLogger("test"),
        rng=random.Random(seed),
        run_dir=run_dir,
        executor=executor,
    )


async def drive(sim: Simulator, users: list[User], seconds: float) -> None:
    """Run the users' iterations concurrently for `seconds`, then mark them stopping."""

    async def one(user: User) -> None:
        while not user.stopping:
            try:
                await sim.iteration(user)
            except StopUser:
                return

    tasks = [asyncio.create_task(one(u)) for u in users]
    await asyncio.sleep(seconds)
    for user in users:
        user._stopping = True
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=15)


def windows(drained: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for w in drained["windows"]:
        m = out.setdefault(w["name"], {"count": 0, "failures": 0, "errors": {}, "kind": w["kind"]})
        m["count"] += w["count"]
        m["failures"] += w["failures"]
        for k, v in w["errors"].items():
            m["errors"][k] = m["errors"].get(k, 0) + v
    return out


def points(drained: dict[str, Any], entity: str) -> list[dict[str, Any]]:
    return [d["values"] for d in drained["datapoints"] if d["entity"] == entity]


def gauges(drained: dict[str, Any], name: str) -> list[float]:
    return [m["value"] for m in drained["metrics"] if m["type"] == "gauge" and m["name"] == name]


def chromium_children(sim: BrowserSimulator) -> list[int]:
    return [p.pid for b in sim.browsers.values() for p in b.procs.values()]


def test_two_browsers_exchange_messages_and_report_every_family(tmp_path: Path) -> None:
    metrics = Metrics()
    options = BrowserOptions(memory_interval=1.0, status_interval=0.5, **FAST)
    seen: dict[str, Any] = {}

    async def flow() -> None:
        async with lighthouse() as url:
            with ThreadPoolExecutor(BrowserSimulator.threads) as pool:
                sim = BrowserSimulator(make_ctx(options, url, metrics, tmp_path, 1, pool))
                await sim.setup()
                users = [User(0), User(1)]
                try:
                    for user in users:
                        await sim.start_user(user)
                    seen["peers"] = [u.data["peers"][0] for u in users if u.data]
                    await drive(sim, users, 7.0)
                    seen["pairs"] = [await sim.ctx.run_blocking(b.pairs) for b in sim.browsers.values()]
                    seen["pids"] = chromium_children(sim)
                    seen["root"] = sim.root
                    for user in users:
                        await sim.stop_user(user)
                    seen["dirs_after_stop"] = sorted(p.name for p in sim.root.iterdir())
                finally:
                    await sim.teardown()

    asyncio.run(flow())
    drained = metrics.drain(everything=True)
    rows = windows(drained)
    a, b = seen["peers"]
    for name in (
        "browser start",
        "join room",
        "connect",
        "deliver position",
        "deliver profile",
        "deliver chat",
    ):
        assert rows.get(name, {}).get("count", 0) > 0, (name, sorted(rows))
        assert rows[name]["kind"] == "webrtc"
    assert rows["browser start"]["count"] == 2 and rows["join room"]["count"] == 2
    failures = {n: r["errors"] for n, r in rows.items() if r["failures"]}
    assert not failures, failures
    assert rows["deliver position"]["count"] >= 2 * 20  # two peers, 10 a second each, for seconds

    for me, other in ((a, b), (b, a)):
        mine = points(drained, me)
        assert len(mine) >= 4, (me, len(mine))
        last = mine[-1]
        missing = [f for f in FIELDS if f not in last]
        assert not missing, missing
        assert last["kind"] == "browser" and last["routine"] == "catalyst"
        assert "deliveries" not in last
        assert last["receivedFrom"].get(other, 0) > 20, last["receivedFrom"]
        assert last["sentTotal"] > 20 and last["receivedTotal"] > 20
        assert any(other in p["connectedPeers"] for p in mine)
        assert any("averageLatency" in p for p in mine)
        assert all(len(p["position"]) == 3 for p in mine)
        assert set(last["webrtc"]) == {
            "rttMs",
            "bytesSent",
            "bytesReceived",
            "packetsSent",
            "packetsReceived",
        }
        assert any(p["webrtc"]["bytesSent"] > 0 for p in mine)
        assert any(p.get("memoryMB", 0) > 20 for p in mine), [p.get("memoryMB") for p in mine]

    assert max(gauges(drained, "browser_memory_mb")) > 40
    # loopback only: every ICE pair that carried anything is 127.0.0.1 on both ends
    used = [
        p
        for pairs in seen["pairs"]
        for p in pairs
        if p["requestsSent"] or p["bytesSent"] or p["requestsReceived"]
    ]
    assert used
    for pair in used:
        assert pair["local"].startswith("127.0.0.1:") and pair["remote"].startswith("127.0.0.1:"), pair
    # nothing left behind
    assert seen["dirs_after_stop"] == []
    assert not seen["root"].exists()
    assert not [
        pid
        for pid in seen["pids"]
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert not profile_processes(seen["root"])


def test_browser_and_aiortc_peers_exchange_messages_both_ways(tmp_path: Path) -> None:
    from simulators.webrtc.peers import PeerOptions, PeerSimulator

    browser_metrics, peer_metrics = Metrics(), Metrics()
    seen: dict[str, Any] = {}

    async def flow() -> None:
        async with lighthouse() as url:
            with ThreadPoolExecutor(BrowserSimulator.threads) as pool:
                peers = PeerSimulator(make_ctx(PeerOptions(**FAST), url, peer_metrics, tmp_path, 2))
                browsers = BrowserSimulator(
                    make_ctx(
                        BrowserOptions(memory_interval=2.0, **FAST), url, browser_metrics, tmp_path, 3, pool
                    )
                )
                await peers.setup()
                await browsers.setup()
                first, browser_user, second = User(0), User(0), User(1)
                try:
                    await peers.start_user(first)  # the browser offers to this one
                    await browsers.start_user(browser_user)
                    await peers.start_user(second)  # this one offers to the browser
                    seen["aiortc"] = [first.data["peer"].id, second.data["peer"].id]  # type: ignore[index]
                    seen["browser"] = browser_user.data["peers"][0]  # type: ignore[index]
                    await asyncio.gather(
                        drive(peers, [first, second], 7.0), drive(browsers, [browser_user], 7.0)
                    )
                    for user in (first, second):
                        await peers.stop_user(user)
                    await browsers.stop_user(browser_user)
                finally:
                    await browsers.teardown()
                    await peers.teardown()

    asyncio.run(flow())
    b_drained = browser_metrics.drain(everything=True)
    p_drained = peer_metrics.drain(everything=True)
    browser_id = seen["browser"]
    browser_points = points(b_drained, browser_id)
    assert browser_points
    got = browser_points[-1]["receivedFrom"]
    for aiortc_id in seen["aiortc"]:
        assert got.get(aiortc_id, 0) > 10, (aiortc_id, got)
        theirs = points(p_drained, aiortc_id)
        assert theirs, aiortc_id
        assert theirs[-1]["receivedFrom"].get(browser_id, 0) > 10, theirs[-1]["receivedFrom"]
        assert any(browser_id in p["connectedPeers"] for p in theirs)
    assert all(seen_id in browser_points[-2]["connectedPeers"] for seen_id in seen["aiortc"]), browser_points[
        -2
    ]
    b_rows = windows(b_drained)
    assert b_rows["deliver position"]["count"] > 20
    failures = {n: r["errors"] for n, r in b_rows.items() if r["failures"]}
    assert not failures, failures


def test_missing_chromium_is_a_one_line_usage_error(tmp_path: Path) -> None:
    options = BrowserOptions(lighthouse_url="http://127.0.0.1:9", chromium=str(tmp_path / "no-chromium"))
    sim = BrowserSimulator(make_ctx(options, "http://127.0.0.1:9", Metrics(), tmp_path, 4))
    with pytest.raises(UsageError) as err:
        asyncio.run(sim.setup())
    message = str(err.value)
    assert "scripts/install-system" in message and "no-chromium" in message and "\n" not in message
    with pytest.raises(ValueError, match="catalyst, silent or walk"):
        BrowserOptions(routines={"mypkg.mod:fn": 1.0})


def test_unreachable_lighthouse_fails_join_and_teardown_leaves_no_process(tmp_path: Path) -> None:
    metrics = Metrics()
    seen: dict[str, Any] = {}

    async def flow() -> None:
        with ThreadPoolExecutor(BrowserSimulator.threads) as pool:
            # a port nothing listens on: the page cannot open its signal socket
            dead = BrowserOptions(lighthouse_url="http://127.0.0.1:9", page_timeout=15.0)
            sim = BrowserSimulator(make_ctx(dead, "", metrics, tmp_path, 5, pool))
            await sim.setup()
            try:
                with pytest.raises(StopUser):
                    await sim.start_user(User(0))
                seen["left_after_failure"] = profile_processes(sim.root)
            finally:
                await sim.teardown()
            async with lighthouse() as url:
                live = BrowserOptions(**FAST)
                sim2 = BrowserSimulator(make_ctx(live, url, metrics, tmp_path, 6, pool))
                await sim2.setup()
                await sim2.start_user(User(0))
                seen["root"] = sim2.root
                seen["pids"] = chromium_children(sim2)
                seen["driver"] = next(iter(sim2.browsers.values())).driver_pid
                # no stop_user: the worker's teardown after an error must still close everything
                await sim2.teardown()

    asyncio.run(flow())
    rows = windows(metrics.drain(everything=True))
    assert rows["join room"]["failures"] == 1, rows
    (message,) = rows["join room"]["errors"]
    assert "lighthouse" in message and "\n" not in message, message
    assert seen["left_after_failure"] == []
    assert seen["pids"] and seen["driver"]
    alive = [
        pid
        for pid in [*seen["pids"], seen["driver"]]
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert not alive
    assert not seen["root"].exists()
    assert not profile_processes(seen["root"])
