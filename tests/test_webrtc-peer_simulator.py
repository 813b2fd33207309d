"""The `webrtc-peer` simulator with real aiortc peers and a real lighthouse, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness.metrics import Metrics
from harness.simulator import SimulatorContext, StopUser, User, load_simulator
from harness.targets.lighthouse import LighthouseConfig, build_app
from harness.targets.runner import served
from simulators.webrtc import peers as peers_module
from simulators.webrtc.peer import Peer, filter_sdp, pin_loopback
from simulators.webrtc.peers import PeerOptions, PeerSimulator
from simulators.webrtc.protocol import FAMILIES, FIELD_SUFFIXES
from simulators.webrtc.signalling import LighthouseClient
from tests.llmtools import counters, merged
from tests.test_run import rows, start

FAST = {
    "start_jitter": 0.2,
    "stats_interval": 1.0,
    "ping_interval": 0.5,
    "position_every": 0.1,
    "profile_every": 0.3,
    "chat_every": 0.5,
    "connect_timeout": 5.0,
}


@asynccontextmanager
async def lighthouse(**config: Any) -> AsyncIterator[str]:
    """A real lighthouse on 127.0.0.1 in this loop; yields its base URL."""
    async with served(build_app(LighthouseConfig.model_validate({"seed": 1, **config}))) as url:
        yield url


def make_sim(url: str, metrics: Metrics, seed: int = 1, **options: Any) -> PeerSimulator:
    opts = PeerOptions.model_validate({**FAST, **options})
    ctx = SimulatorContext(
        run_id="t1",
        group="peers",
        worker_index=0,
        workers=1,
        options=opts,
        targets={"lighthouse": url},
        metrics=metrics,
        log=logging.getLogger("test.webrtc"),
        rng=random.Random(seed),
        run_dir=Path("."),
    )
    return PeerSimulator(ctx)


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return await resp.json()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll `check` until true; fail with `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.1)


class Run:
    """A simulator with users started, iterating in the background; data points collected."""

    def __init__(self, sim: PeerSimulator, metrics: Metrics, n: int) -> None:
        self.sim, self.metrics = sim, metrics
        self.users = [User(i) for i in range(n)]
        self.tasks: list[asyncio.Task[None]] = []
        self.drained: list[dict[str, Any]] = []
        self.latest: dict[str, dict[str, Any]] = {}

    async def __aenter__(self) -> Run:
        await self.sim.setup()
        for user in self.users:
            await self.sim.start_user(user)
        self.tasks = [asyncio.ensure_future(self._loop(u)) for u in self.users]
        return self

    async def _loop(self, user: User) -> None:
        while not user.stopping:
            await self.sim.iteration(user)

    def drain(self) -> None:
        d = self.metrics.drain(everything=True)
        self.drained.append(d)
        for point in d["datapoints"]:
            self.latest[point["entity"]] = point["values"]

    def peer(self, i: int) -> Peer:
        return self.sim.peers[self.users[i].id]

    async def stop(self, i: int) -> None:
        self.users[i]._stopping = True
        await self.sim.stop_user(self.users[i])

    async def __aexit__(self, *exc: Any) -> None:
        for user in self.users:
            user._stopping = True
        await asyncio.wait(self.tasks, timeout=2)
        for task in self.tasks:
            task.cancel()
        for user in self.users:
            await self.sim.stop_user(user)
        await self.sim.teardown()
        self.drain()


def test_filter_sdp_keeps_only_loopback_candidates() -> None:
    sdp = "\r\n".join(
        [
            "v=0",
            "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
            "c=IN IP4 127.0.0.1",
            "a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host",
            "a=candidate:2 1 udp 2130706431 192.0.2.2 50001 typ host",
            "a=candidate:3 1 udp 2130706431 fd00::2 50002 typ host",
            "a=candidate:4 1 udp 2130706431 abc.local 50003 typ host",
            "a=candidate:5 1 tcp 1518280447 127.0.0.1 9 typ host tcptype active",
            "a=end-of-candidates",
        ]
    )
    out = filter_sdp(sdp)
    candidates = [line for line in out.splitlines() if line.startswith("a=candidate")]
    assert [c.split()[0] for c in candidates] == ["a=candidate:1", "a=candidate:5"]
    assert "a=end-of-candidates" in out and out.endswith("\r\n")


def test_four_peers_exchange_position_profile_and_chat() -> None:
    """A full mesh of 4: every family in every data point, everyone hears everyone, pings give RTTs."""

    async def main() -> None:
        async with lighthouse() as url:
            metrics = Metrics()
            async with Run(make_sim(url, metrics), metrics, 4) as run:
                ids = [run.peer(i).id for i in range(4)]

                async def meshed() -> bool:
                    return all(len(run.peer(i).proto.connected) == 3 for i in range(4))

                await eventually(meshed, 10, "a full mesh of 4")
                # pin_loopback: the nominated ICE pair is 127.0.0.1 on both ends
                pc = next(iter(run.peer(0).connections.values())).pc
                pair = pc.sctp.transport.transport._connection._nominated[1]
                assert pair.local_candidate.host == "127.0.0.1" == pair.remote_candidate.host

                async def heard() -> bool:
                    run.drain()
                    return len(run.latest) == 4 and all(
                        set(v["receivedFrom"]) == set(ids) - {pid}
                        and v["sentTotal"] > 0
                        and v["relayedTotal"] > 0
                        and "averageLatency" in v
                        for pid, v in run.latest.items()
                    )

                await eventually(heard, 10, "every peer hears every other one and has a latency")
                info = await get_json(f"{url}/peers/{ids[0]}")
                assert sorted(info["connections"]) == sorted(ids[1:])
                assert info["layer"] == "blue" and info["rooms"] == ["room"]

            for values in run.latest.values():
                for family in FAMILIES:
                    for suffix in FIELD_SUFFIXES:
                        assert isinstance(values[f"{family}{suffix}"], (int, float)), (family, suffix)
                assert values["receivedTotal"] > 0 and values["allTotal"] > values["sentTotal"]
                assert values["relevantTotal"] == values["receivedTotal"]  # everyone is in the room
                assert values["duplicateTotal"] > 0  # chat is not optimistic: relays reach peers twice
                assert values["kind"] == "aiortc" and values["routine"] == "catalyst"
                assert values["knownPeersCount"] == 3 and len(values["position"]) == 3
                assert 0 < values["averageLatency"] < 1000
                assert values["sentAveragePacketSize"] > 50
            stats = merged(run.drained)
            for name in ("join room", "connect", "deliver position", "deliver profile", "deliver chat"):
                assert stats[name]["count"] > 0 and stats[name]["failures"] == 0, (name, stats.get(name))
            assert stats["join room"]["count"] == 4 and stats["connect"]["count"] == 6  # one per pair
            assert all(w["kind"] == "webrtc" for d in run.drained for w in d["windows"])

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_partial_mesh_relays_to_peers_not_connected() -> None:
    """Six peers with 2–3 connections each: not a full mesh, yet everyone hears everyone by relays."""

    async def main() -> None:
        async with lighthouse() as url:
            metrics = Metrics()
            sim = make_sim(url, metrics, min_connections=2, max_connections=3)
            async with Run(sim, metrics, 6) as run:
                ids = {run.peer(i).id for i in range(6)}

                async def heard() -> bool:
                    run.drain()
                    return len(run.latest) == 6 and all(
                        set(v["receivedFrom"]) == ids - {pid} for pid, v in run.latest.items()
                    )

                await eventually(heard, 20, "every peer hears all five others")
                counts = [len(run.peer(i).proto.connected) for i in range(6)]
                assert all(1 <= c <= 3 for c in counts) and sum(counts) < 6 * 5, counts
                for pid in ids:
                    assert len((await get_json(f"{url}/peers/{pid}"))["connections"]) <= 3
            relayed = {pid: v["relayedTotal"] for pid, v in run.latest.items()}
            assert sum(1 for r in relayed.values() if r > 0) >= 2, relayed
            assert max(v["duplicateTotal"] for v in run.latest.values()) > 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_connection_cap_is_kept_by_the_lighthouse_and_by_the_peers() -> None:
    async def main() -> None:
        # the lighthouse's cap (2), which the peers adopt: offers to full peers are rejected there
        async with lighthouse(max_connections=2, min_connections=2) as url:
            metrics = Metrics()
            async with Run(make_sim(url, metrics), metrics, 5) as run:
                await asyncio.sleep(2.0)
                for i in range(5):
                    peer = run.peer(i)
                    assert len(peer.connections) <= 2 and peer.max_connections == 2
                    info = await get_json(f"{url}/peers/{peer.id}")
                    assert len(info["connections"]) <= 2
                assert sum(run.peer(i).rejected for i in range(5)) > 0
                assert (await get_json(f"{url}/_stats"))["lighthouse"]["rejected_offers"] > 0
            assert merged(run.drained)["connect"]["failures"] == 0
        # the peers' own cap (1) below the lighthouse's (8): the peer answers REJECT
        async with lighthouse() as url:
            metrics = Metrics()
            async with Run(make_sim(url, metrics, min_connections=1, max_connections=1), metrics, 3) as run:
                await asyncio.sleep(1.0)
                peers = [run.peer(i) for i in range(3)]
                assert [len(p.connections) for p in peers] == [1, 1, 0]
                assert peers[2].rejected >= 1 and peers[0].rejections + peers[1].rejections >= 1
                run.drain()
            assert counters(run.drained)["webrtc_offers_rejected"] >= 1

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_leaving_peer_is_dropped_and_the_others_top_up() -> None:
    async def main() -> None:
        async with lighthouse() as url:
            metrics = Metrics()
            async with Run(make_sim(url, metrics, min_connections=2, max_connections=2), metrics, 3) as run:
                first, second, third = (run.peer(i) for i in range(3))

                async def meshed() -> bool:
                    return all(len(p.proto.connected) == 2 for p in (first, second, third))

                await eventually(meshed, 10, "a triangle")
                await run.stop(2)
                assert third.closing and not third.connections

                async def dropped() -> bool:
                    return all(
                        list(p.proto.connected) == [q.id] for p, q in ((first, second), (second, first))
                    )

                await eventually(dropped, 5, "the two left connected to each other only")
                users = await get_json(f"{url}/layers/blue/users")
                assert sorted(u["peerId"] for u in users) == sorted([first.id, second.id])
                assert third.id not in first.proto.known and third.id not in first.room_members
                assert (await get_json(f"{url}/status"))["peers"] == 2

    asyncio.run(asyncio.wait_for(main(), 60))


def test_connect_timeout_and_lighthouse_down_are_one_line_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers_module, "RETRY_BACKOFF", (0.0, 0.01))

    async def main() -> None:
        # nothing listens on this port: join room fails, the user ends
        async with lighthouse() as url:
            pass
        metrics = Metrics()
        sim = make_sim(url, metrics)
        await sim.setup()
        with pytest.raises(StopUser):
            await sim.start_user(User(0))
        await sim.stop_user(User(0))
        await sim.teardown()
        failures = merged([metrics.drain(everything=True)])["join room"]
        assert failures["failures"] == 1
        [message] = failures["errors"]
        assert "unreachable" in message and "\n" not in message and url in message

        # a room member that never answers offers: connect fails after connect_timeout
        async with lighthouse() as url, aiohttp.ClientSession() as session:
            client = LighthouseClient(url, session)
            mute = await client.open_signal("0xmute", lambda m: None)
            await client.join_layer("blue", "0xmute")
            await client.join_room("blue", "room", "0xmute")
            metrics = Metrics()
            sim = make_sim(url, metrics, connect_timeout=1.0)
            await sim.setup()
            user = User(0)
            await sim.start_user(user)  # waits for its first attempts to settle
            peer = sim.peers[user.id]
            assert not peer.connections and peer.failed_connects == 1
            await sim.stop_user(user)
            await sim.teardown()
            await mute.close()
        stats = merged([metrics.drain(everything=True)])
        assert stats["join room"]["failures"] == 0 and stats["connect"]["failures"] == 1
        assert list(stats["connect"]["errors"]) == [
            "peer connection not open within 1s (waiting for the answer)"
        ]

    asyncio.run(asyncio.wait_for(main(), 30))


def test_check_profile_and_registration() -> None:
    assert load_simulator("webrtc-peer") is PeerSimulator
    assert PeerSimulator.extra == "webrtc" and PeerSimulator.description
    with pytest.raises(ValueError, match="cannot import"):
        PeerSimulator.check_profile(
            PeerOptions(lighthouse_url="http://127.0.0.1:1", routines={"nope_mod_xyz:f": 1}), None
        )
    pin_loopback()  # idempotent
    pin_loopback()


@pytest.mark.slow
def test_headless_run_with_an_embedded_lighthouse(tmp_path: Path) -> None:
    """A real run through the CLI: embedded lighthouse, 4 aiortc peers in one worker, data points stored."""
    profile = {
        "name": "webrtc-mini",
        "duration": "8s",
        "stop_grace": "3s",
        "seed": 3,
        "targets": {"lighthouse": {"embedded": True}},
        "groups": {
            "peers": {
                "simulator": "webrtc-peer",
                "users": 4,
                "think_time": "0s",
                "options": {"start_jitter": "0.5s", "stats_interval": "1s", "ping_interval": "2s"},
            }
        },
    }
    proc, summary, db = start(tmp_path, profile, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    by_name = {e["name"]: e for e in summary["endpoints"] if e["group"] == "peers"}
    for name in ("join room", "connect", "deliver position", "deliver profile"):
        assert by_name[name]["requests"] > 0 and by_name[name]["failures"] == 0, by_name.get(name)
    points = [json.loads(v) for (v,) in rows(db, "SELECT values_json FROM datapoint")]
    peer_points = [p for p in points if p.get("kind") == "aiortc"]
    assert len({tuple(sorted(p["receivedFrom"])) for p in peer_points}) >= 1
    last: dict[str, dict[str, Any]] = {}
    for entity, values in rows(db, "SELECT entity, values_json FROM datapoint ORDER BY t"):
        last[entity] = json.loads(values)
    peers = {e: v for e, v in last.items() if v.get("kind") == "aiortc"}
    assert len(peers) == 4
    for entity, values in peers.items():
        assert values["sentTotal"] > 0 and values["receivedTotal"] > 0
        assert set(values["receivedFrom"]) == set(peers) - {entity}
