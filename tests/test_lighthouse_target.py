"""The `lighthouse` embedded target over real HTTP and WebSockets on 127.0.0.1: layers and rooms, the
notifications, signalling relay, ID-TAKEN, EXPIRE, the connection cap, socket close, CORS, the service
model in front of the REST routes only, and shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from harness.errors import UsageError
from harness.targets import TARGETS, TargetKind
from harness.targets.lighthouse import LIGHTHOUSE_ID, STATE, LighthouseConfig, LighthouseState, build_app
from harness.targets.runner import EmbeddedTarget

# A guard against a hung test, never a timing assertion: every awaited message is expected to come.
WAIT = 5.0


class Socket:
    """A peer's signalling socket, as a test drives it."""

    def __init__(self, peer_id: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.peer_id = peer_id
        self.ws = ws

    async def send(self, kind: str, dst: str | None = None, payload: Any = None) -> None:
        message: dict[str, Any] = {"type": kind, "payload": payload}
        if dst is not None:
            message["dst"] = dst
        await self.ws.send_str(json.dumps(message))

    async def recv(self) -> dict[str, Any]:
        """The next JSON message; fails on anything else (a close, a binary frame)."""
        msg = await asyncio.wait_for(self.ws.receive(), WAIT)
        assert msg.type == aiohttp.WSMsgType.TEXT, (self.peer_id, msg)
        message: dict[str, Any] = json.loads(msg.data)
        return message

    async def expect(self, kind: str) -> dict[str, Any]:
        message = await self.recv()
        assert message["type"] == kind, (self.peer_id, message)
        return message

    async def close(self) -> None:
        await self.ws.close()


@dataclass
class Lighthouse:
    """A served lighthouse, a client session and the sockets opened through it."""

    url: str
    app: web.Application
    session: aiohttp.ClientSession
    sockets: list[Socket] = field(default_factory=list)

    @property
    def state(self) -> LighthouseState:
        return self.app[STATE]

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, json=body) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = await self.call(method, path, body)
        assert status == 200, (method, path, status, answer)
        return answer

    async def join(self, layer: str, peer: str, room: str | None = None) -> Any:
        """Put `peer` (userId `user-{peer}`) in `layer` and maybe `room`; the last answer."""
        user = {"userId": f"user-{peer}", "peerId": peer}
        answer = await self.ok("PUT", f"/layers/{layer}", {**user, "protocolVersion": 5})
        if room is not None:
            answer = await self.ok("PUT", f"/layers/{layer}/rooms/{room}", user)
        return answer

    async def connect(self, peer_id: str, expect_open: bool = True) -> Socket:
        ws = await self.session.ws_connect(f"{self.url}/signal", params={"id": peer_id})
        socket = Socket(peer_id, ws)
        self.sockets.append(socket)
        if expect_open:
            opened = await socket.expect("OPEN")
            config = self.state.config
            assert opened["payload"] == {
                "maxConnections": config.max_connections,
                "minConnections": config.min_connections,
            }
        return socket

    async def peer(self, peer_id: str) -> Any:
        return await self.ok("GET", f"/peers/{peer_id}")


@asynccontextmanager
async def serving(**overrides: Any) -> AsyncIterator[Lighthouse]:
    """A lighthouse (no service time unless asked) on 127.0.0.1 in this loop, with a client session."""
    app = build_app(LighthouseConfig.model_validate({"service_time": 0, **overrides}))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        async with aiohttp.ClientSession() as session:
            served = Lighthouse(f"http://127.0.0.1:{runner.addresses[0][1]}", app, session)
            try:
                yield served
            finally:
                for socket in served.sockets:
                    await socket.close()
    finally:
        await runner.cleanup()


def users(*peers: str) -> list[dict[str, str]]:
    return [{"userId": f"user-{peer}", "peerId": peer} for peer in peers]


async def nothing_before_sentinel(lighthouse: Lighthouse, socket: Socket) -> None:
    """Assert `socket` has nothing pending: a CANDIDATE relayed to it now must be its next message."""
    sender = await lighthouse.connect(f"sentinel-for-{socket.peer_id}")
    await sender.send("CANDIDATE", socket.peer_id, {"sentinel": True})
    message = await socket.recv()
    assert message["type"] == "CANDIDATE" and message["payload"] == {"sentinel": True}, message
    await sender.close()


# --- config and registration ----------------------------------------------------------------------

REGISTRATION = TargetKind(
    name="lighthouse",
    config_model=LighthouseConfig,
    build_app=build_app,
    description="a WebRTC lighthouse: layers and rooms over REST, WebSocket signalling with a cap "
    "on each peer's connections",
    health_path="/status",
)


def test_config_defaults_and_validation() -> None:
    config = LighthouseConfig()
    assert (config.max_connections, config.min_connections, config.seed) == (8, 4, None)
    assert config.queue_limit == 1024 and config.concurrency == 8
    kind = TARGETS.get("lighthouse", REGISTRATION)
    assert kind.config_model is LighthouseConfig and kind.health_path in ("/status", "/health")
    parsed = kind.parse_config({"max_connections": 2, "min_connections": 1, "seed": 3})
    assert isinstance(parsed, LighthouseConfig) and parsed.max_connections == 2
    with pytest.raises(UsageError, match="nope"):
        kind.parse_config({"nope": 1})
    with pytest.raises(UsageError, match="max_connections"):
        kind.parse_config({"max_connections": 0})
    with pytest.raises(UsageError, match=r"min_connections \(5\) must not exceed max_connections \(4\)"):
        kind.parse_config({"min_connections": 5, "max_connections": 4})


# --- layers and rooms -----------------------------------------------------------------------------


def test_layers_join_switch_leave_and_lists() -> None:
    async def scenario() -> None:
        async with serving() as lh:
            assert await lh.ok("GET", "/layers") == []
            assert await lh.join("blue", "a") == users("a")
            assert await lh.join("blue", "b") == users("a", "b")
            assert await lh.join("blue", "b") == users("a", "b")  # joining again changes nothing
            assert await lh.join("red", "c") == users("c")
            assert await lh.ok("GET", "/layers") == [
                {"name": "blue", "usersCount": 2},
                {"name": "red", "usersCount": 1},
            ]
            assert await lh.ok("GET", "/layers/blue/users") == users("a", "b")

            # Switching layers leaves the old one and its rooms.
            await lh.join("blue", "b", room="r1")
            assert await lh.join("red", "b") == users("c", "b")
            assert await lh.ok("GET", "/layers/blue/users") == users("a")
            assert await lh.call("GET", "/layers/blue/rooms/r1") == (404, {"status": "room-not-found"})
            info = await lh.peer("b")
            assert info == {"peerId": "b", "connected": False, "layer": "red", "rooms": [], "connections": []}

            # Leaving by userId (or by peerId); the last user takes the layer with it.
            assert await lh.ok("DELETE", "/layers/red/users/user-c") == users("b")
            assert await lh.ok("DELETE", "/layers/red/users/b") == []
            assert await lh.ok("DELETE", "/layers/blue/users/nobody") == users("a")
            assert await lh.call("GET", "/layers/red/users") == (404, {"status": "layer-not-found"})
            assert await lh.call("DELETE", "/layers/red/users/b") == (404, {"status": "layer-not-found"})
            assert await lh.call("GET", "/peers/b") == (404, {"status": "peer-not-found"})
            status = await lh.ok("GET", "/status")
            assert status == {
                "ok": True,
                "name": "harness-lighthouse",
                "peers": 0,
                "layers": 1,
                "maxConnections": 8,
                "minConnections": 4,
            }

    asyncio.run(scenario())


def test_rooms_join_leave_and_status_codes() -> None:
    async def scenario() -> None:
        async with serving() as lh:
            user_a = {"userId": "user-a", "peerId": "a"}
            assert await lh.call("PUT", "/layers/blue/rooms/r", user_a) == (
                404,
                {"status": "layer-not-found"},
            )
            await lh.join("blue", "a")
            await lh.join("red", "x")
            # x is in a layer, but not this one.
            user_x = {"userId": "user-x", "peerId": "x"}
            assert await lh.call("PUT", "/layers/blue/rooms/r", user_x) == (
                400,
                {"status": "user-not-in-layer"},
            )
            assert await lh.ok("GET", "/layers/blue/rooms") == []
            assert await lh.ok("PUT", "/layers/blue/rooms/r", user_a) == users("a")
            await lh.join("blue", "b", room="r")
            assert await lh.join("blue", "b", room="s") == users("b")
            assert await lh.ok("GET", "/layers/blue/rooms") == ["r", "s"]
            assert await lh.ok("GET", "/layers/blue/rooms/r") == users("a", "b")
            assert (await lh.peer("b"))["rooms"] == ["r", "s"]
            assert await lh.call("GET", "/layers/blue/rooms/t") == (404, {"status": "room-not-found"})
            assert await lh.call("GET", "/layers/green/rooms") == (404, {"status": "layer-not-found"})
            assert await lh.call("GET", "/layers/green/rooms/r") == (404, {"status": "layer-not-found"})

            assert await lh.ok("DELETE", "/layers/blue/rooms/r/users/user-a") == users("b")
            assert await lh.ok("DELETE", "/layers/blue/rooms/r/users/user-a") == users("b")  # a no-op
            assert await lh.ok("DELETE", "/layers/blue/rooms/s/users/user-b") == []
            assert await lh.ok("GET", "/layers/blue/rooms") == ["r"]  # the empty room vanished
            assert await lh.call("DELETE", "/layers/blue/rooms/s/users/b") == (
                404,
                {"status": "room-not-found"},
            )
            # Leaving the layer leaves its rooms.
            assert await lh.ok("DELETE", "/layers/blue/users/user-b") == users("a")
            assert await lh.ok("GET", "/layers/blue/rooms") == []

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "text",
        {"peerId": "a"},
        {"userId": "u"},
        {"userId": "", "peerId": "a"},
        {"userId": 1, "peerId": "a"},
    ],
)
def test_user_bodies_without_ids_are_400(body: Any) -> None:
    async def scenario() -> None:
        async with serving() as lh:
            for path in ("/layers/blue", "/layers/blue/rooms/r"):
                status, answer = await lh.call("PUT", path, body)
                assert status == 400 and answer["status"] == "bad-request" and answer["message"], answer
            async with lh.session.put(lh.url + "/layers/blue", data=b"{not json") as response:
                assert response.status == 400 and (await response.json())["status"] == "bad-request"
            assert await lh.ok("GET", "/layers") == []

    asyncio.run(scenario())


# --- notifications --------------------------------------------------------------------------------


def test_notifications_reach_the_right_members_only() -> None:
    async def scenario() -> None:
        async with serving() as lh:
            a, b, c = await lh.connect("a"), await lh.connect("b"), await lh.connect("c")
            await lh.join("blue", "a", room="r")
            await lh.join("blue", "b")  # in the layer, not the room
            joined = await a.expect("PEER_JOINED_LAYER")
            assert joined == {
                "type": "PEER_JOINED_LAYER",
                "src": LIGHTHOUSE_ID,
                "dst": "a",
                "payload": {"layerId": "blue", "userId": "user-b", "peerId": "b"},
            }
            await lh.join("red", "c")

            # d joins blue: a and b hear it, c (in red) does not, d itself does not.
            d = await lh.connect("d")
            await lh.join("blue", "d")
            for member in (a, b):
                message = await member.expect("PEER_JOINED_LAYER")
                assert message["payload"]["peerId"] == "d" and message["dst"] == member.peer_id
            # d joins room r: only a hears it.
            await lh.join("blue", "d", room="r")
            message = await a.expect("PEER_JOINED_ROOM")
            assert message["src"] == LIGHTHOUSE_ID
            assert message["payload"] == {"roomId": "r", "userId": "user-d", "peerId": "d"}
            for bystander in (b, c, d):
                await nothing_before_sentinel(lh, bystander)

            # d leaves the room, then the layer.
            assert await lh.ok("DELETE", "/layers/blue/rooms/r/users/user-d") == users("a")
            assert (await a.expect("PEER_LEFT_ROOM"))["payload"] == {"roomId": "r", "userId": "user-d"}
            await nothing_before_sentinel(lh, b)
            assert await lh.ok("DELETE", "/layers/blue/users/user-d") == users("a", "b")
            for member in (a, b):
                message = await member.expect("PEER_LEFT_LAYER")
                assert message["payload"] == {"layerId": "blue", "userId": "user-d"}
            for bystander in (c, d):
                await nothing_before_sentinel(lh, bystander)

            # Switching layers: the old room and layer hear the leave, the new layer the join.
            await lh.join("red", "a")
            assert (await b.expect("PEER_LEFT_LAYER"))["payload"] == {"layerId": "blue", "userId": "user-a"}
            assert (await c.expect("PEER_JOINED_LAYER"))["payload"]["peerId"] == "a"
            assert lh.state.stats()["notifications"] == 9

    asyncio.run(scenario())


def test_socket_close_leaves_layer_and_rooms_with_notifications() -> None:
    async def scenario() -> None:
        async with serving() as lh:
            a, b = await lh.connect("a"), await lh.connect("b")
            await lh.join("blue", "a", room="r")
            await lh.join("blue", "b", room="r")
            await a.expect("PEER_JOINED_LAYER")
            await a.expect("PEER_JOINED_ROOM")
            await a.send("OFFER", "b", {"sdp": "v=0", "type": "offer", "sessionId": "s1"})
            await b.expect("OFFER")
            await b.send("ANSWER", "a", {"sdp": "v=0", "type": "answer", "sessionId": "s1"})
            await a.expect("ANSWER")
            assert (await lh.peer("a"))["connections"] == ["b"]
            assert (await lh.ok("GET", "/status"))["peers"] == 2

            await b.close()
            left_room = await a.expect("PEER_LEFT_ROOM")
            assert left_room["payload"] == {"roomId": "r", "userId": "user-b"}
            left_layer = await a.expect("PEER_LEFT_LAYER")
            assert left_layer["payload"] == {"layerId": "blue", "userId": "user-b"}
            assert await lh.ok("GET", "/layers/blue/rooms/r") == users("a")
            assert await lh.ok("GET", "/layers/blue/users") == users("a")
            assert (await lh.peer("a"))["connections"] == []
            assert await lh.call("GET", "/peers/b") == (404, {"status": "peer-not-found"})
            assert (await lh.ok("GET", "/status"))["peers"] == 1
            # b may come back under the same id.
            b = await lh.connect("b")
            await a.send("CANDIDATE", "b", {"candidate": "c"})
            assert (await b.expect("CANDIDATE"))["src"] == "a"

    asyncio.run(scenario())


# --- signalling -----------------------------------------------------------------------------------


def test_relay_sets_src_and_records_links() -> None:
    async def scenario() -> None:
        async with serving() as lh:
            a, b = await lh.connect("a"), await lh.connect("b")
            offer = {"sdp": "v=0\r\n", "type": "offer", "sessionId": "s1"}
            await a.send("OFFER", "b", offer)
            assert await b.recv() == {"type": "OFFER", "src": "a", "dst": "b", "payload": offer}
            assert (await lh.peer("a"))["connections"] == []  # an offer is not a link
            answer = {"sdp": "v=0\r\n", "type": "answer", "sessionId": "s1"}
            await b.send("ANSWER", "a", answer)
            assert await a.recv() == {"type": "ANSWER", "src": "b", "dst": "a", "payload": answer}
            assert (await lh.peer("a"))["connections"] == ["b"]
            assert (await lh.peer("b")) == {
                "peerId": "b",
                "connected": True,
                "layer": None,
                "rooms": [],
                "connections": ["a"],
            }
            for kind in ("CANDIDATE", "REJECT"):
                await b.send(kind, "a", {"n": kind})
                assert await a.recv() == {"type": kind, "src": "b", "dst": "a", "payload": {"n": kind}}
            await a.send("LEAVE", "b", {"sessionId": "s1"})
            assert await b.recv() == {"type": "LEAVE", "src": "a", "dst": "b", "payload": {"sessionId": "s1"}}
            assert (await lh.peer("a"))["connections"] == []
            stats = await lh.ok("GET", "/_stats")
            assert stats["lighthouse"]["relayed"] == {
                "OFFER": 1,
                "ANSWER": 1,
                "CANDIDATE": 1,
                "REJECT": 1,
                "LEAVE": 1,
            }
            assert stats["lighthouse"]["peak_links"] == 1 and stats["lighthouse"]["links"] == 0

    asyncio.run(scenario())


def test_expire_errors_and_heartbeat() -> None:
    async def scenario() -> None:
        async with serving() as lh:
            a = await lh.connect("a")
            await a.send("OFFER", "ghost", {"sessionId": "s"})
            assert await a.recv() == {
                "type": "EXPIRE",
                "src": "ghost",
                "dst": "a",
                "payload": {"reason": "peer-not-connected"},
            }
            await a.send("HEARTBEAT")  # ignored: the next answer is the one to the bad message below
            for bad in (
                "not json",
                "[1]",
                json.dumps({"dst": "b"}),
                json.dumps({"type": "NOPE", "dst": "b"}),
            ):
                await a.ws.send_str(bad)
                error = await a.expect("ERROR")
                assert error["payload"]["message"], error
            await a.send("OFFER", payload={"sessionId": "s"})  # no dst
            assert "dst" in (await a.expect("ERROR"))["payload"]["message"]
            await a.send("OFFER", "a", {"sessionId": "s"})
            assert "oneself" in (await a.expect("ERROR"))["payload"]["message"]
            await a.ws.send_bytes(b"\x00")
            await a.expect("ERROR")
            assert lh.state.stats()["errors"] == 7 and lh.state.stats()["expired"] == 1

    asyncio.run(scenario())


def test_id_taken_closes_the_second_socket_only() -> None:
    async def scenario() -> None:
        async with serving() as lh:
            first = await lh.connect("a")
            second = await lh.connect("a", expect_open=False)
            assert await second.recv() == {"type": "ID-TAKEN"}
            closing = await asyncio.wait_for(second.ws.receive(), WAIT)
            assert (
                closing.type == aiohttp.WSMsgType.CLOSE
                and closing.data == aiohttp.WSCloseCode.POLICY_VIOLATION
            )
            assert lh.state.stats()["id_taken"] == 1
            # The first socket still is peer a.
            b = await lh.connect("b")
            await b.send("CANDIDATE", "a", {"x": 1})
            assert (await first.expect("CANDIDATE"))["src"] == "b"
            assert (await lh.ok("GET", "/status"))["peers"] == 2

    asyncio.run(scenario())


def test_bad_signal_ids_are_400() -> None:
    async def scenario() -> None:
        async with serving() as lh:
            for params in ({}, {"id": ""}, {"id": LIGHTHOUSE_ID}, {"id": "x" * 300}):
                async with lh.session.get(lh.url + "/signal", params=params) as response:
                    assert response.status == 400, params
                    assert (await response.json())["status"] == "bad-request"

    asyncio.run(scenario())


def test_connection_cap_rejects_offers_until_a_leave() -> None:
    async def scenario() -> None:
        async with serving(max_connections=1, min_connections=1) as lh:
            a, b, c = await lh.connect("a"), await lh.connect("b"), await lh.connect("c")
            await a.send("OFFER", "b", {"sdp": "x", "type": "offer", "sessionId": "ab"})
            await b.expect("OFFER")
            await b.send("ANSWER", "a", {"sdp": "y", "type": "answer", "sessionId": "ab"})
            await a.expect("ANSWER")

            # a is at the cap: c's offer to a is rejected in a's name and never reaches a.
            await c.send("OFFER", "a", {"sdp": "z", "type": "offer", "sessionId": "ca"})
            assert await c.recv() == {
                "type": "REJECT",
                "src": "a",
                "dst": "c",
                "payload": {"reason": "TOO_MANY_CONNECTIONS", "sessionId": "ca"},
            }
            await nothing_before_sentinel(lh, a)
            # Nor may a, at the cap, offer to c.
            await a.send("OFFER", "c", {"sdp": "z", "type": "offer", "sessionId": "ac"})
            assert (await a.expect("REJECT"))["payload"] == {
                "reason": "TOO_MANY_CONNECTIONS",
                "sessionId": "ac",
            }
            await nothing_before_sentinel(lh, c)
            # A new offer between a and b (renegotiation) does not count their own link.
            await b.send("OFFER", "a", {"sdp": "x", "type": "offer", "sessionId": "ba"})
            assert (await a.expect("OFFER"))["src"] == "b"
            assert lh.state.stats()["rejected_offers"] == 2

            # After a LEAVE (relayed), the link is gone and c's offer goes through.
            await b.send("LEAVE", "a", {"sessionId": "ab"})
            assert (await a.expect("LEAVE"))["src"] == "b"
            await c.send("OFFER", "a", {"sdp": "z", "type": "offer", "sessionId": "ca2"})
            relayed = await a.expect("OFFER")
            assert relayed["src"] == "c" and relayed["payload"]["sessionId"] == "ca2"

    asyncio.run(scenario())


def test_leaving_the_layer_drops_links() -> None:
    async def scenario() -> None:
        async with serving(max_connections=1, min_connections=1) as lh:
            a, b, c = await lh.connect("a"), await lh.connect("b"), await lh.connect("c")
            await lh.join("blue", "a")
            await lh.join("blue", "b")
            await a.expect("PEER_JOINED_LAYER")
            await a.send("OFFER", "b", {"sessionId": "ab"})
            await b.expect("OFFER")
            await b.send("ANSWER", "a", {"sessionId": "ab"})
            await a.expect("ANSWER")
            await c.send("OFFER", "b", {"sessionId": "cb"})
            assert (await c.expect("REJECT"))["src"] == "b"
            await lh.ok("DELETE", "/layers/blue/users/user-a")
            await b.expect("PEER_LEFT_LAYER")
            assert (await lh.peer("b"))["connections"] == []
            await c.send("OFFER", "b", {"sessionId": "cb2"})
            assert (await b.expect("OFFER"))["src"] == "c"

    asyncio.run(scenario())


# --- CORS, the service model, shutdown ------------------------------------------------------------


def test_cors_preflight_and_headers() -> None:
    async def scenario() -> None:
        async with serving() as lh:
            headers = {
                "Origin": "http://127.0.0.1:7654",
                "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "content-type",
            }
            # A preflight is answered at once, not through the service model.
            async with lh.session.options(lh.url + "/layers/blue", headers=headers) as response:
                assert response.status == 204
                assert response.headers["Access-Control-Allow-Origin"] == "*"
                assert "PUT" in response.headers["Access-Control-Allow-Methods"]
                assert response.headers["Access-Control-Allow-Headers"] == "content-type"
            origin = {"Origin": "http://127.0.0.1:7654"}
            for method, path, status in (
                ("GET", "/status", 200),
                ("GET", "/layers", 200),
                ("GET", "/layers/none/users", 404),
                ("PUT", "/layers/blue", 400),
                ("GET", "/no/such/route", 404),
                ("POST", "/layers", 405),
            ):
                async with lh.session.request(method, lh.url + path, headers=origin) as response:
                    assert response.status == status, (method, path)
                    assert response.headers.get("Access-Control-Allow-Origin") == "*", (method, path)
            # Only the preflight and the exempt /status bypassed the service model.
            assert (await lh.ok("GET", "/_stats"))["served"] == 5

    asyncio.run(scenario())


def test_service_model_fronts_rest_but_not_signalling() -> None:
    async def scenario() -> None:
        async with serving(error_rate=1.0, seed=1) as lh:
            status, _ = await lh.call("PUT", "/layers/blue", {"userId": "u", "peerId": "a"})
            assert status == 500
            assert (await lh.call("GET", "/layers"))[0] == 500
            assert (await lh.ok("GET", "/status"))["ok"] is True
            a, b = await lh.connect("a"), await lh.connect("b")
            await a.send("OFFER", "b", {"sessionId": "s"})
            assert (await b.expect("OFFER"))["src"] == "a"
            stats = await lh.ok("GET", "/_stats")
            assert stats["errors"] == 2 and stats["lighthouse"]["sockets_opened"] == 2

    asyncio.run(scenario())


def test_shutdown_closes_open_sockets() -> None:
    async def scenario() -> None:
        app = build_app(LighthouseConfig.model_validate({"service_time": 0}))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with aiohttp.ClientSession() as session, session.ws_connect(url + "/signal?id=a") as ws:
                assert (await asyncio.wait_for(ws.receive_json(), WAIT))["type"] == "OPEN"
                closing = asyncio.ensure_future(ws.receive())
                await asyncio.wait_for(runner.cleanup(), WAIT)
                msg = await asyncio.wait_for(closing, WAIT)
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY
            assert app[STATE].sockets == set() and app[STATE].connections == {}
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_embedded_target_serves_status_and_signalling() -> None:
    with EmbeddedTarget("lh", "lighthouse", {"max_connections": 3, "min_connections": 2}) as target:
        assert target.url is not None

        async def scenario() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{target.url}/status") as response:
                    status = await response.json()
                assert status["maxConnections"] == 3 and status["minConnections"] == 2
                async with session.ws_connect(f"{target.url}/signal?id=a") as ws:
                    opened = await asyncio.wait_for(ws.receive_json(), WAIT)
                    assert opened == {"type": "OPEN", "payload": {"maxConnections": 3, "minConnections": 2}}

        asyncio.run(scenario())
