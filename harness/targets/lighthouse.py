"""The `lighthouse` target: where WebRTC peers meet (layers and rooms) and signal (offers and answers).

A stand-in for the Catalyst lighthouse that the peer performance test ran against (seed-systems.md §3):
REST for layers and rooms, a WebSocket for signalling, a cap on the links each peer may have. This
docstring is the reference for the wire protocol; `simulators/webrtc/signalling.py` and
`client/peer.js` speak it.

Every response carries `Access-Control-Allow-Origin: *` and every `OPTIONS` request is answered 204
as a CORS preflight (browser peers load their page from another port). The REST routes go through
the service model (`concurrency`, `service_time`, ...); `/signal`, `/status`, `/health` and `/_stats`
do not (a long-lived socket must not hold a worker).

REST (JSON bodies; a *user* is `{"userId": str, "peerId": str}`; a peer, by its `peerId`, is in at most
one layer at a time and in any number of that layer's rooms; lists keep join order):

- `GET /status` → `{"ok": true, "name": "harness-lighthouse", "peers": <open sockets>, "layers": n,
  "maxConnections": M, "minConnections": m}`
- `GET /layers` → `[{"name", "usersCount"}]`
- `PUT /layers/{layer}` body `{"userId", "peerId", "protocolVersion"?}` → the layer's users, joiner
  included. A peer in another layer leaves it first (its rooms, then the layer, with notifications,
  and its links are dropped); joining the layer it is in changes nothing. The other members get
  `PEER_JOINED_LAYER` `{"layerId", "userId", "peerId"}`. A layer exists while it has users.
- `GET /layers/{layer}/users` → users.
- `GET /layers/{layer}/rooms` → `["room", ...]`.
- `PUT /layers/{layer}/rooms/{room}` body `{"userId", "peerId"}` → the room's users, joiner included;
  400 `{"status": "user-not-in-layer"}` unless the peer is in that layer. The other room members get
  `PEER_JOINED_ROOM` `{"roomId", "userId", "peerId"}`. A room exists while it has users.
- `GET /layers/{layer}/rooms/{room}` → the room's users; 404 `{"status": "room-not-found"}`.
- `DELETE /layers/{layer}/rooms/{room}/users/{userId}` → the room's remaining users; the other members
  get `PEER_LEFT_ROOM` `{"roomId", "userId"}`. Leaving a room one is not in is a no-op.
- `DELETE /layers/{layer}/users/{userId}` → the layer's remaining users; the peer leaves its rooms
  first (`PEER_LEFT_ROOM`), then the layer (`PEER_LEFT_LAYER` `{"layerId", "userId"}`), and its links
  are dropped. A no-op for a user not in the layer.
- `GET /peers/{peerId}` → `{"peerId", "connected": bool, "layer": str|null, "rooms": [..],
  "connections": [peerIds]}`; 404 `{"status": "peer-not-found"}` for a peer with no socket, no layer
  and no links.
- `GET /health` → `{"status": "ok"}`; `GET /_stats` → the service model's counters and, under
  `lighthouse`, the signalling counters.

In the DELETE routes `{userId}` names the members whose `userId` it is, or else the member whose
`peerId` it is. Every layer route answers 404 `{"status": "layer-not-found"}` for a layer with no
users. A body that is not a JSON object with non-empty string `userId` and `peerId` is 400
`{"status": "bad-request", "message": ...}`.

WebSocket `GET /signal?id={peerId}` (JSON text frames; a missing or bad id is 400 before the upgrade):

- On open the server sends `{"type": "OPEN", "payload": {"maxConnections": M, "minConnections": m}}`.
  A socket for an id that already has one gets `{"type": "ID-TAKEN"}` and is closed (1008).
- A peer sends `{"type", "dst", "payload"}`; for OFFER, ANSWER, CANDIDATE, REJECT and LEAVE the server
  forwards `{"type", "src": <sender>, "dst", "payload"}` to `dst`. `HEARTBEAT` is ignored; anything
  else (an unknown type, a missing `dst`, not JSON, a binary frame) gets
  `{"type": "ERROR", "payload": {"message"}}`.
- If `dst` has no socket the sender gets
  `{"type": "EXPIRE", "src": dst, "dst": sender, "payload": {"reason": "peer-not-connected"}}`.
- OFFER/ANSWER payloads are `{"sdp", "type": "offer"|"answer", "sessionId"}` (not inspected, except
  `sessionId`).
- Notifications come as `{"type", "src": "__lighthouse__", "dst": <recipient>, "payload"}`.
- Links and the cap: a link A–B is recorded when B's ANSWER to A is relayed, and removed when either
  sends LEAVE to the other (relayed too), when either socket closes and when either leaves its layer.
  An OFFER from A to B while A or B has `max_connections` links or more (not counting an A–B link) is
  not relayed: A gets `{"type": "REJECT", "src": B, "dst": A, "payload": {"reason":
  "TOO_MANY_CONNECTIONS", "sessionId": <the offer's sessionId>}}`. Two offers accepted before either
  is answered can still take a peer past the cap; its peers enforce their own cap as well.
- When a socket closes its peer leaves its layer and rooms, with notifications, and its links go.

State changes are synchronous (no await between a check and its change), so concurrent requests and
sockets see a consistent state; messages are sent afterwards, in the order the changes happened. On
shutdown every socket is closed (1001).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import Field, model_validator

from harness.targets.service import (
    SERVICE_MODEL,
    Handler,
    ServiceModel,
    ServiceModelConfig,
    service_middleware,
)

NAME = "harness-lighthouse"
"""What `GET /status` calls this server."""

LIGHTHOUSE_ID = "__lighthouse__"
"""The `src` of the server's own notifications; no peer may take this id."""

RELAYED_TYPES = frozenset({"OFFER", "ANSWER", "CANDIDATE", "REJECT", "LEAVE"})
"""Signalling messages the server forwards from one peer to another."""

EXEMPT_PATHS = ("/signal", "/status", "/health", "/_stats")
"""Routes that bypass the service model."""

MAX_ID_LENGTH = 256
MAX_MESSAGE_BYTES = 1024 * 1024
HEARTBEAT_SECONDS = 30.0
"""The server pings each socket this often and drops one that does not answer within half of it."""
CLOSE_TIMEOUT_SECONDS = 2.0

CORS_HEADERS = {"Access-Control-Allow-Origin": "*"}
_PREFLIGHT_HEADERS = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "GET, PUT, POST, DELETE, OPTIONS",
    "Access-Control-Max-Age": "600",
}

Outbox = list[tuple[str, dict[str, Any]]]
"""Messages to send once a state change is done: (recipient peer id, message)."""


class LighthouseConfig(ServiceModelConfig):
    """The configuration of the `lighthouse` target."""

    queue_limit: int = Field(default=1024, ge=0)
    """How many REST requests may wait for a worker (a crowd of peers joins at once at the start)."""

    max_connections: int = Field(default=8, ge=1)
    """The most links a peer may have: an OFFER to or from a peer at the cap is rejected."""

    min_connections: int = Field(default=4, ge=1)
    """How many connections peers are advised (in `OPEN`) to open on their own."""

    seed: int | None = None
    """Seeds the service-time and error sampling, for a reproducible run; none means random."""

    @model_validator(mode="after")
    def _connections(self) -> LighthouseConfig:
        if self.min_connections > self.max_connections:
            raise ValueError(
                f"min_connections ({self.min_connections}) must not exceed "
                f"max_connections ({self.max_connections})"
            )
        return self


# --- state ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class Layer:
    """A layer: its members (peer id → user id) and its rooms (room → members), in join order."""

    name: str
    users: dict[str, str] = field(default_factory=dict)
    rooms: dict[str, dict[str, str]] = field(default_factory=dict)


class Connection:
    """One peer's signalling socket."""

    def __init__(self, peer_id: str, ws: web.WebSocketResponse) -> None:
        self.peer_id = peer_id
        self.ws = ws
        self._lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> bool:
        """Send `message` as a JSON text frame; False if the socket is closing or gone."""
        return await _send(self.ws, message, self._lock)


async def _send(ws: web.WebSocketResponse, message: dict[str, Any], lock: asyncio.Lock | None = None) -> bool:
    if ws.closed:
        return False
    text = json.dumps(message, separators=(",", ":"))
    try:
        if lock is None:
            await ws.send_str(text)
        else:
            async with lock:
                await ws.send_str(text)
    except (ConnectionError, RuntimeError):
        return False
    return True


def _users(members: dict[str, str]) -> list[dict[str, str]]:
    return [{"userId": user_id, "peerId": peer_id} for peer_id, user_id in members.items()]


def _notification(kind: str, dst: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "src": LIGHTHOUSE_ID, "dst": dst, "payload": payload}


def _error(message: str) -> dict[str, Any]:
    return {"type": "ERROR", "payload": {"message": message}}


class LighthouseState:
    """Layers, rooms, sockets and links of one lighthouse, and its counters.

    Methods that change the state are synchronous and return the messages to send (an `Outbox`);
    `deliver` sends them."""

    def __init__(self, config: LighthouseConfig) -> None:
        self.config = config
        self.layers: dict[str, Layer] = {}
        self.peer_layer: dict[str, str] = {}
        """Peer id → the name of the layer it is in."""
        self.connections: dict[str, Connection] = {}
        """Peer id → its (one) registered socket."""
        self.sockets: set[web.WebSocketResponse] = set()
        """Every open socket, registered or not (closed on shutdown)."""
        self.links: dict[str, set[str]] = {}
        """Peer id → the peers it has a link with (symmetric)."""
        self.relayed: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.peak_links = 0

    # --- queries

    def layer_users(self, layer: str) -> list[dict[str, str]] | None:
        """The users of `layer`, or None if it has none."""
        found = self.layers.get(layer)
        return _users(found.users) if found else None

    def peer_info(self, peer_id: str) -> dict[str, Any] | None:
        """What `GET /peers/{peerId}` shows; None for a peer the lighthouse does not know."""
        layer_name = self.peer_layer.get(peer_id)
        connected = peer_id in self.connections
        links = self.links.get(peer_id, set())
        if layer_name is None and not connected and not links:
            return None
        layer = self.layers.get(layer_name) if layer_name else None
        rooms = [room for room, members in layer.rooms.items() if peer_id in members] if layer else []
        return {
            "peerId": peer_id,
            "connected": connected,
            "layer": layer_name,
            "rooms": rooms,
            "connections": sorted(links),
        }

    def link_count(self) -> int:
        """How many links there are now."""
        return sum(len(peers) for peers in self.links.values()) // 2

    def status(self) -> dict[str, Any]:
        """What `GET /status` returns."""
        return {
            "ok": True,
            "name": NAME,
            "peers": len(self.connections),
            "layers": len(self.layers),
            "maxConnections": self.config.max_connections,
            "minConnections": self.config.min_connections,
        }

    def stats(self) -> dict[str, Any]:
        """The signalling counters (under `lighthouse` in `GET /_stats`)."""
        return {
            "peers": len(self.connections),
            "layers": len(self.layers),
            "users": len(self.peer_layer),
            "links": self.link_count(),
            "peak_links": self.peak_links,
            "relayed": dict(self.relayed),
            **{
                key: self.counters[key]
                for key in (
                    "sockets_opened",
                    "sockets_closed",
                    "id_taken",
                    "expired",
                    "rejected_offers",
                    "errors",
                    "notifications",
                )
            },
        }

    # --- layers and rooms

    def _notify(self, members: Iterable[str], skip: str, kind: str, payload: dict[str, Any]) -> Outbox:
        outbox = [(peer, _notification(kind, peer, payload)) for peer in members if peer != skip]
        self.counters["notifications"] += len(outbox)
        return outbox

    def join_layer(self, layer_name: str, user_id: str, peer_id: str) -> tuple[list[dict[str, str]], Outbox]:
        """Put the peer in `layer_name` (leaving any other layer first): the layer's users and the outbox."""
        outbox: Outbox = []
        current = self.peer_layer.get(peer_id)
        if current == layer_name:
            self.layers[layer_name].users[peer_id] = user_id
            return _users(self.layers[layer_name].users), outbox
        if current is not None:
            outbox += self.leave_layer(peer_id)
        layer = self.layers.setdefault(layer_name, Layer(layer_name))
        layer.users[peer_id] = user_id
        self.peer_layer[peer_id] = layer_name
        payload = {"layerId": layer_name, "userId": user_id, "peerId": peer_id}
        outbox += self._notify(layer.users, peer_id, "PEER_JOINED_LAYER", payload)
        return _users(layer.users), outbox

    def leave_layer(self, peer_id: str) -> Outbox:
        """Take the peer out of its rooms and its layer, and drop its links."""
        outbox: Outbox = []
        layer_name = self.peer_layer.pop(peer_id, None)
        layer = self.layers.get(layer_name) if layer_name is not None else None
        if layer is not None:
            for room in [room for room, members in layer.rooms.items() if peer_id in members]:
                outbox += self._leave_room(layer, room, peer_id)
            user_id = layer.users.pop(peer_id)
            outbox += self._notify(
                layer.users, peer_id, "PEER_LEFT_LAYER", {"layerId": layer.name, "userId": user_id}
            )
            if not layer.users:
                del self.layers[layer.name]
        self.drop_links(peer_id)
        return outbox

    def join_room(
        self, layer_name: str, room: str, user_id: str, peer_id: str
    ) -> tuple[list[dict[str, str]], Outbox]:
        """Put the peer, who must be in `layer_name`, in `room`: the room's users and the outbox."""
        layer = self.layers[layer_name]
        layer.users[peer_id] = user_id
        members = layer.rooms.setdefault(room, {})
        is_new = peer_id not in members
        members[peer_id] = user_id
        outbox: Outbox = []
        if is_new:
            payload = {"roomId": room, "userId": user_id, "peerId": peer_id}
            outbox = self._notify(members, peer_id, "PEER_JOINED_ROOM", payload)
        return _users(members), outbox

    def _leave_room(self, layer: Layer, room: str, peer_id: str) -> Outbox:
        members = layer.rooms[room]
        user_id = members.pop(peer_id)
        if not members:
            del layer.rooms[room]
        return self._notify(members, peer_id, "PEER_LEFT_ROOM", {"roomId": room, "userId": user_id})

    @staticmethod
    def matching(members: dict[str, str], user_id: str) -> list[str]:
        """The peer ids in `members` that `{userId}` of a DELETE route names."""
        by_user = [peer for peer, user in members.items() if user == user_id]
        return by_user or ([user_id] if user_id in members else [])

    def remove_from_room(self, layer: Layer, room: str, user_id: str) -> Outbox:
        """Take the members named `user_id` out of `room`."""
        outbox: Outbox = []
        for peer_id in self.matching(layer.rooms.get(room, {}), user_id):
            outbox += self._leave_room(layer, room, peer_id)
        return outbox

    def remove_from_layer(self, layer: Layer, user_id: str) -> Outbox:
        """Take the members named `user_id` out of `layer` (and its rooms)."""
        outbox: Outbox = []
        for peer_id in self.matching(layer.users, user_id):
            outbox += self.leave_layer(peer_id)
        return outbox

    # --- links

    def _links_besides(self, peer_id: str, other: str) -> int:
        links = self.links.get(peer_id, set())
        return len(links) - (other in links)

    def add_link(self, a: str, b: str) -> None:
        """Record a link between `a` and `b`."""
        self.links.setdefault(a, set()).add(b)
        self.links.setdefault(b, set()).add(a)
        self.peak_links = max(self.peak_links, self.link_count())

    def remove_link(self, a: str, b: str) -> None:
        """Forget the link between `a` and `b`, if any."""
        for one, other in ((a, b), (b, a)):
            peers = self.links.get(one)
            if peers is not None:
                peers.discard(other)
                if not peers:
                    del self.links[one]

    def drop_links(self, peer_id: str) -> None:
        """Forget every link of `peer_id`."""
        for other in list(self.links.get(peer_id, ())):
            self.remove_link(peer_id, other)

    # --- sockets

    def connect(self, peer_id: str, ws: web.WebSocketResponse) -> Connection | None:
        """Register `ws` as the peer's socket; None if the id already has one."""
        if peer_id in self.connections:
            self.counters["id_taken"] += 1
            return None
        connection = Connection(peer_id, ws)
        self.connections[peer_id] = connection
        self.counters["sockets_opened"] += 1
        return connection

    def disconnect(self, connection: Connection) -> Outbox:
        """The peer's socket closed: it leaves its layer and rooms, and its links go."""
        if self.connections.get(connection.peer_id) is not connection:
            return []
        del self.connections[connection.peer_id]
        self.counters["sockets_closed"] += 1
        outbox = self.leave_layer(connection.peer_id)
        self.drop_links(connection.peer_id)
        return outbox

    def handle(self, sender: str, text: str) -> Outbox:
        """A text frame from `sender`: what to send, and to whom, in answer."""
        try:
            message = json.loads(text)
        except ValueError:
            return self.error(sender, "not JSON")
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return self.error(sender, "a message must be a JSON object with a string 'type'")
        kind = message["type"]
        if kind == "HEARTBEAT":
            return []
        if kind not in RELAYED_TYPES:
            return self.error(sender, f"unknown message type {kind!r}")
        dst = message.get("dst")
        if not isinstance(dst, str) or not dst:
            return self.error(sender, f"{kind} needs a string 'dst'")
        if dst == sender:
            return self.error(sender, f"{kind} to oneself")
        payload = message.get("payload")
        if dst not in self.connections:
            self.counters["expired"] += 1
            if kind == "LEAVE":
                self.remove_link(sender, dst)
            reason = {"reason": "peer-not-connected"}
            return [(sender, {"type": "EXPIRE", "src": dst, "dst": sender, "payload": reason})]
        if kind == "OFFER":
            cap = self.config.max_connections
            if self._links_besides(sender, dst) >= cap or self._links_besides(dst, sender) >= cap:
                self.counters["rejected_offers"] += 1
                session = payload.get("sessionId") if isinstance(payload, dict) else None
                reject = {
                    "type": "REJECT",
                    "src": dst,
                    "dst": sender,
                    "payload": {"reason": "TOO_MANY_CONNECTIONS", "sessionId": session},
                }
                return [(sender, reject)]
        elif kind == "ANSWER":
            self.add_link(sender, dst)
        elif kind == "LEAVE":
            self.remove_link(sender, dst)
        self.relayed[kind] += 1
        return [(dst, {"type": kind, "src": sender, "dst": dst, "payload": payload})]

    def error(self, sender: str, message: str) -> Outbox:
        """An ERROR for `sender` (a message the lighthouse does not understand)."""
        self.counters["errors"] += 1
        return [(sender, _error(message))]

    async def deliver(self, outbox: Outbox) -> None:
        """Send each message to its recipient's socket, in order; recipients without one are skipped."""
        for peer_id, message in outbox:
            connection = self.connections.get(peer_id)
            if connection is not None:
                await connection.send(message)

    async def close_all(self) -> None:
        """Close every socket (on shutdown)."""
        sockets = list(self.sockets)
        await asyncio.gather(
            *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in sockets),
            return_exceptions=True,
        )


STATE = web.AppKey("lighthouse_state", LighthouseState)


# --- routes ---------------------------------------------------------------------------------------


def _status(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status)


def _bad_request(message: str) -> web.Response:
    return _status(400, {"status": "bad-request", "message": message})


_LAYER_NOT_FOUND = {"status": "layer-not-found"}
_ROOM_NOT_FOUND = {"status": "room-not-found"}


async def _user_body(request: web.Request) -> tuple[str, str] | web.Response:
    """`(userId, peerId)` from the JSON body, or a 400 response."""
    try:
        body = await request.json()
    except ValueError:
        return _bad_request("the body must be a JSON object with 'userId' and 'peerId'")
    if not isinstance(body, dict):
        return _bad_request("the body must be a JSON object with 'userId' and 'peerId'")
    ids = []
    for key in ("userId", "peerId"):
        value = body.get(key)
        if not isinstance(value, str) or not value:
            return _bad_request(f"'{key}' is missing or not a non-empty string")
        if len(value) > MAX_ID_LENGTH or value == LIGHTHOUSE_ID:
            return _bad_request(f"'{key}' is not a usable id")
        ids.append(value)
    return ids[0], ids[1]


async def _get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].status())


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response({**request.app[SERVICE_MODEL].stats(), "lighthouse": request.app[STATE].stats()})


async def _list_layers(request: web.Request) -> web.Response:
    layers = request.app[STATE].layers.values()
    return web.json_response([{"name": layer.name, "usersCount": len(layer.users)} for layer in layers])


async def _join_layer(request: web.Request) -> web.Response:
    ids = await _user_body(request)
    if isinstance(ids, web.Response):
        return ids
    state = request.app[STATE]
    users, outbox = state.join_layer(request.match_info["layer"], *ids)
    await state.deliver(outbox)
    return web.json_response(users)


async def _layer_users(request: web.Request) -> web.Response:
    users = request.app[STATE].layer_users(request.match_info["layer"])
    return _status(404, _LAYER_NOT_FOUND) if users is None else web.json_response(users)


async def _leave_layer(request: web.Request) -> web.Response:
    state = request.app[STATE]
    layer = state.layers.get(request.match_info["layer"])
    if layer is None:
        return _status(404, _LAYER_NOT_FOUND)
    outbox = state.remove_from_layer(layer, request.match_info["user_id"])
    await state.deliver(outbox)
    return web.json_response(_users(layer.users))


async def _list_rooms(request: web.Request) -> web.Response:
    layer = request.app[STATE].layers.get(request.match_info["layer"])
    return _status(404, _LAYER_NOT_FOUND) if layer is None else web.json_response(list(layer.rooms))


async def _join_room(request: web.Request) -> web.Response:
    ids = await _user_body(request)
    if isinstance(ids, web.Response):
        return ids
    user_id, peer_id = ids
    state = request.app[STATE]
    layer_name = request.match_info["layer"]
    if layer_name not in state.layers:
        return _status(404, _LAYER_NOT_FOUND)
    if state.peer_layer.get(peer_id) != layer_name:
        return _status(400, {"status": "user-not-in-layer"})
    users, outbox = state.join_room(layer_name, request.match_info["room"], user_id, peer_id)
    await state.deliver(outbox)
    return web.json_response(users)


async def _room_users(request: web.Request) -> web.Response:
    layer = request.app[STATE].layers.get(request.match_info["layer"])
    if layer is None:
        return _status(404, _LAYER_NOT_FOUND)
    members = layer.rooms.get(request.match_info["room"])
    return _status(404, _ROOM_NOT_FOUND) if members is None else web.json_response(_users(members))


async def _leave_room(request: web.Request) -> web.Response:
    state = request.app[STATE]
    layer = state.layers.get(request.match_info["layer"])
    if layer is None:
        return _status(404, _LAYER_NOT_FOUND)
    room = request.match_info["room"]
    if room not in layer.rooms:
        return _status(404, _ROOM_NOT_FOUND)
    outbox = state.remove_from_room(layer, room, request.match_info["user_id"])
    await state.deliver(outbox)
    return web.json_response(_users(layer.rooms.get(room, {})))


async def _peer(request: web.Request) -> web.Response:
    info = request.app[STATE].peer_info(request.match_info["peer_id"])
    return _status(404, {"status": "peer-not-found"}) if info is None else web.json_response(info)


async def _signal(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    peer_id = request.query.get("id", "")
    if not peer_id or len(peer_id) > MAX_ID_LENGTH or peer_id == LIGHTHOUSE_ID:
        return _bad_request("connect as /signal?id=<peerId> with a usable peer id")
    ws = web.WebSocketResponse(
        heartbeat=HEARTBEAT_SECONDS, timeout=CLOSE_TIMEOUT_SECONDS, max_msg_size=MAX_MESSAGE_BYTES
    )
    await ws.prepare(request)
    state.sockets.add(ws)
    connection: Connection | None = None
    try:
        connection = state.connect(peer_id, ws)
        if connection is None:
            await _send(ws, {"type": "ID-TAKEN"})
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"ID-TAKEN")
            return ws
        config = state.config
        opened = {"maxConnections": config.max_connections, "minConnections": config.min_connections}
        await connection.send({"type": "OPEN", "payload": opened})
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await state.deliver(state.handle(peer_id, msg.data))
            elif msg.type == WSMsgType.BINARY:
                await state.deliver(state.error(peer_id, "binary frames are not understood"))
        return ws
    finally:
        state.sockets.discard(ws)
        if connection is not None:
            # The state change happens at once, whatever becomes of the notifications.
            await state.deliver(state.disconnect(connection))


# --- the app --------------------------------------------------------------------------------------


@web.middleware
async def _cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every OPTIONS as a CORS preflight; add `Access-Control-Allow-Origin: *` to every answer."""
    if request.method == "OPTIONS":
        headers = dict(_PREFLIGHT_HEADERS)
        headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "Content-Type"
        )
        return web.Response(status=204, headers=headers)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(CORS_HEADERS)
        raise
    if not response.prepared:
        response.headers.update(CORS_HEADERS)
    return response


async def _close_sockets(app: web.Application) -> None:
    await app[STATE].close_all()


def build_app(config: LighthouseConfig) -> web.Application:
    """The lighthouse app: CORS on everything, the service model in front of the REST routes."""
    app = web.Application()
    model = ServiceModel(config, seed=config.seed)
    app[SERVICE_MODEL] = model
    app[STATE] = LighthouseState(config)
    app.middlewares.append(_cors)
    app.middlewares.append(service_middleware(model, EXEMPT_PATHS))
    app.on_shutdown.append(_close_sockets)
    router = app.router
    router.add_get("/health", _health)
    router.add_get("/_stats", _stats)
    router.add_get("/status", _get_status)
    router.add_get("/signal", _signal)
    router.add_get("/layers", _list_layers)
    router.add_put("/layers/{layer}", _join_layer)
    router.add_get("/layers/{layer}/users", _layer_users)
    router.add_delete("/layers/{layer}/users/{user_id}", _leave_layer)
    router.add_get("/layers/{layer}/rooms", _list_rooms)
    router.add_put("/layers/{layer}/rooms/{room}", _join_room)
    router.add_get("/layers/{layer}/rooms/{room}", _room_users)
    router.add_delete("/layers/{layer}/rooms/{room}/users/{user_id}", _leave_room)
    router.add_get("/peers/{peer_id}", _peer)
    return app
