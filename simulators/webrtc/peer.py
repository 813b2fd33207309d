"""One aiortc peer: signalling through the lighthouse, WebRTC connections with two data channels each,
sending, relaying and pinging by the rules of `protocol`, and its data point.

What a browser peer (`client/peer.js`) must interoperate with:

- Signalling goes through the lighthouse WebSocket `/signal?id=<peerId>`; the peer id is also the
  user id for `PUT /layers/{layer}` and `PUT /layers/{layer}/rooms/{room}`.
- The offerer creates both data channels before its offer: `reliable` (ordered) then `unreliable`
  (ordered=false, maxRetransmits=0), and the answerer takes them from `datachannel` events by label.
- Non-trickle: the OFFER/ANSWER payload `{"sdp", "type", "sessionId"}` carries the SDP after ICE
  gathering, with `a=candidate` lines kept only for 127.0.0.1 (both when sending and receiving);
  CANDIDATE messages are ignored. The answer echoes the offer's `sessionId`.
- A peer that already has `max_connections` connections (open or opening) answers an OFFER with REJECT
  `{"reason": "TOO_MANY_CONNECTIONS", "sessionId"}`. Cross offers: the peer with the smaller id keeps
  its own offer and ignores the other's; the larger one drops its own offer and answers.
- An OFFER from a peer one is already connected to replaces that connection.
- A connection is open when both channels are; the offerer gives up after `connect_timeout` (then sends
  LEAVE). LEAVE from the other side, its leaving the layer, or the pc failing closes the connection;
  a peer below `min_connections` offers to more room members (about once a second; a peer that
  rejected, expired or failed is not asked again for a few seconds).
- Closing: LEAVE to every connected peer, `DELETE` room and layer user, close the socket, `pc.close()`.

`Ticker` runs every peer's routine, pings, purges and top-ups of a worker from one task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import aioice.ice
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from harness.metrics import Metrics
from simulators.webrtc.common import RoomOptions
from simulators.webrtc.protocol import MessageType, PeerProtocol, Write, now_ms
from simulators.webrtc.routines import Routine
from simulators.webrtc.signalling import LIGHTHOUSE_SRC, LighthouseClient, Signal, describe

log = logging.getLogger(__name__)

KIND = "webrtc"
"""The metric kind of `join room`, `connect` and `deliver {sub}`."""
LOOPBACK = "127.0.0.1"
DEFAULT_MIN_CONNECTIONS = 4
DEFAULT_MAX_CONNECTIONS = 8
TOP_UP_EVERY_MS = 1000.0
COOLDOWN_REJECTED = 3.0
"""Seconds a peer that rejected (or was not connected) is left alone."""
MAX_BUFFERED = 4 * 1024 * 1024
"""A channel with more than this many bytes queued skips writes (an overloaded process)."""
MAX_DELIVER_NAMES = 16
"""At most this many `deliver {sub}` names per worker; other subtypes go under `deliver (other)`."""
CLOSE_TIMEOUT = 5.0


def _loopback_addresses(use_ipv4: bool = True, use_ipv6: bool = True) -> list[str]:
    return [LOOPBACK]


_loopback_addresses.harness_loopback = True  # type: ignore[attr-defined]


def pin_loopback() -> None:
    """Make aioice gather host candidates on 127.0.0.1 only (it skips loopback by default and would use
    the machine's other addresses). Idempotent; applied when this module is imported."""
    if not getattr(aioice.ice.get_host_addresses, "harness_loopback", False):
        aioice.ice.get_host_addresses = _loopback_addresses


pin_loopback()


def _is_aiortc_close_noise(context: dict[str, Any]) -> bool:
    """aiortc's own send tasks that fail because their connection closed under them."""
    task, exc = context.get("future"), context.get("exception")
    if not isinstance(exc, ConnectionError) or not isinstance(task, asyncio.Task):
        return False
    coro = task.get_coro()
    name = getattr(coro, "__qualname__", "")
    return isinstance(name, str) and name.startswith(("RTCSctpTransport.", "RTCDtlsTransport."))


def quiet_close_noise(loop: asyncio.AbstractEventLoop) -> None:
    """Drop the "Task exception was never retrieved: ConnectionError" reports of aiortc's internal send
    tasks (they fail when a pc closes with data queued; nothing is lost that matters), passing every
    other report to the loop's previous handler. Idempotent."""
    previous = loop.get_exception_handler()
    if getattr(previous, "harness_webrtc", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if _is_aiortc_close_noise(context):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.harness_webrtc = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


def filter_sdp(sdp: str) -> str:
    """The SDP with only the `a=candidate` lines whose address is 127.0.0.1."""
    lines = sdp.splitlines()
    kept = []
    for line in lines:
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) < 5 or parts[4] != LOOPBACK:
                continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


class ConnectFailed(Exception):
    """A connection attempt that did not open; the message is one line."""


class Rejected(ConnectFailed):
    """The other peer (or the lighthouse) rejected the offer."""


class Superseded(Exception):
    """Our offer lost a cross offer; the other side's connection replaces it."""


class Connection:
    """One RTCPeerConnection to another peer and its two data channels."""

    __slots__ = (
        "answer",
        "channels",
        "connected",
        "initiator",
        "opened",
        "pc",
        "remote",
        "session_id",
        "task",
    )

    def __init__(self, remote: str, pc: RTCPeerConnection, session_id: str, initiator: bool) -> None:
        self.remote = remote
        self.pc = pc
        self.session_id = session_id
        self.initiator = initiator
        self.channels: dict[str, RTCDataChannel] = {}
        self.opened = asyncio.Event()
        self.connected = False
        self.answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.answer.add_done_callback(_consume)
        self.task: asyncio.Task[None] | None = None


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Ticker:
    """One task that ticks every registered peer at `hz` (routine, pings, purge, top-up)."""

    def __init__(self, hz: float, clock: Callable[[], float] = now_ms) -> None:
        self.period = 1.0 / hz
        self.clock = clock
        self.peers: dict[Peer, None] = {}
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0
        self.late = 0

    def add(self, peer: Peer) -> None:
        """Start ticking a peer (and the ticker, on the first one)."""
        self.peers[peer] = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def discard(self, peer: Peer) -> None:
        """Stop ticking a peer."""
        self.peers.pop(peer, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            now = self.clock()
            for peer in list(self.peers):
                try:
                    peer.tick(now)
                except Exception as exc:  # one peer's bug must not stop the others
                    peer.tick_failed(exc)
            self.ticks += 1
            next_at += self.period
            delay = next_at - loop.time()
            if delay < 0:
                self.late += 1
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """Stop the ticker task."""
        self.peers.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Peer:
    """One aiortc peer in a room."""

    def __init__(
        self,
        peer_id: str,
        options: RoomOptions,
        client: LighthouseClient,
        metrics: Metrics,
        rng: random.Random,
        routine_name: str = "silent",
        routine: Routine | None = None,
        ticker: Ticker | None = None,
        clock: Callable[[], float] = now_ms,
        kind: str = "aiortc",
    ) -> None:
        self.id = peer_id
        self.options = options
        self.client = client
        self.metrics = metrics
        self.rng = rng
        self.routine_name = routine_name
        self.routine = routine
        self.ticker = ticker
        self.clock = clock
        self.kind = kind
        self.layer = options.layer
        self.room = options.room
        self.state: dict[str, Any] = {}
        """Per-peer state for custom routines."""
        self.proto = PeerProtocol(peer_id, clock=clock, rng=rng)
        self.proto.rooms.add(self.room)
        self.proto.position[0] = rng.uniform(-options.area, options.area)
        self.proto.position[2] = rng.uniform(-options.area, options.area)
        self.signal: Signal | None = None
        self.connections: dict[str, Connection] = {}
        self.room_members: dict[str, None] = {}
        self.cooldown: dict[str, float] = {}
        self.min_connections = options.min_connections or DEFAULT_MIN_CONNECTIONS
        self.max_connections = options.max_connections or DEFAULT_MAX_CONNECTIONS
        self.running = False
        self.closing = False
        self.rejected = 0
        """Offers of ours that were rejected (by the peer or the lighthouse)."""
        self.rejections = 0
        """Offers we rejected (at our cap)."""
        self.failed_connects = 0
        self.skipped_writes = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing_pcs: set[asyncio.Task[None]] = set()
        self._user_peer: dict[str, str] = {}
        """userId -> peerId of layer members (notifications of leaving name the user only)."""
        self._first_tick_at = 0.0
        self._last_tick: float | None = None
        self._elapsed = 0.0
        self._next_ping = 0.0
        self._next_top_up = 0.0
        self._next_purge = 0.0
        self._tick_errors = 0
        self._deliver_names: dict[str, str] = {}
        self.next_stats = time.monotonic() + options.stats_interval
        """When the next data point is due (monotonic seconds)."""

    # --- what routines use ----------------------------------------------------------------------------

    @property
    def position(self) -> list[float]:
        """[x, y, z]; routines may change it in place."""
        return self.proto.position

    def send_message(self, room: str, data: dict[str, Any], mtype: MessageType) -> None:
        """Send `data` to a room through every connected peer."""
        self._write(self.proto.message(room, data, mtype))

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self, wait: bool = True) -> None:
        """Open the signal socket, join the layer and the room (`join room`), then offer connections to
        up to `min_connections` room members; with `wait`, until those first attempts are settled.
        Raises ConnectFailed (one line) if the lighthouse cannot be joined."""
        began = time.perf_counter()
        try:
            self.signal = await self.client.open_signal(
                self.id, self._on_signal, timeout=self.options.connect_timeout
            )
            opened = self.signal.opened
            if self.options.min_connections is None and isinstance(opened.get("minConnections"), int):
                self.min_connections = opened["minConnections"]
            if self.options.max_connections is None and isinstance(opened.get("maxConnections"), int):
                self.max_connections = opened["maxConnections"]
            self.min_connections = max(1, min(self.min_connections, self.max_connections))
            layer_users = await self.client.join_layer(self.layer, self.id)
            for user in layer_users:
                self._add_user(user)
            room_users = await self.client.join_room(self.layer, self.room, self.id)
            for user in room_users:
                self._add_user(user)
                if user["peerId"] != self.id:
                    self.room_members[user["peerId"]] = None
                    self.proto.add_known(user["peerId"])
        except asyncio.CancelledError:
            await self._close_signal()
            raise
        except Exception as exc:
            reason = describe(exc)
            self.metrics.request("join room", time.perf_counter() - began, kind=KIND, ok=False, error=reason)
            await self._close_signal()
            raise ConnectFailed(reason) from None
        self.metrics.request("join room", time.perf_counter() - began, kind=KIND)
        self.running = True
        now = self.clock()
        self._first_tick_at = now + self.rng.uniform(0, self.options.start_jitter * 1000.0)
        self._next_ping = now + self.options.ping_interval * 1000.0
        self._next_top_up = now + TOP_UP_EVERY_MS
        attempts = self.top_up()
        if self.ticker is not None:
            self.ticker.add(self)
        if wait and attempts:
            await asyncio.wait(attempts, timeout=self.options.connect_timeout + 1.0)

    async def close(self, leave: bool = True) -> None:
        """LEAVE every connection, leave the room and the layer, close the socket and every pc."""
        if self.closing:
            return
        self.closing = True
        self.running = False
        if self.ticker is not None:
            self.ticker.discard(self)
        for task in list(self._tasks):
            task.cancel()
        connections = list(self.connections.values())
        self.connections.clear()
        signal = self.signal
        if signal is not None and not signal.ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.gather(*(signal.send_wait("LEAVE", c.remote) for c in connections)), 2.0
                )
            if leave:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.client.leave_room(self.layer, self.room, self.id), 2.0)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.client.leave_layer(self.layer, self.id), 2.0)
        await self._close_signal()
        for conn in connections:
            self.proto.set_connected(conn.remote, False)
        if connections:
            await asyncio.wait(
                [asyncio.ensure_future(_close_pc(c.pc)) for c in connections], timeout=CLOSE_TIMEOUT
            )
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_TIMEOUT)
        if self._closing_pcs:
            await asyncio.wait(list(self._closing_pcs), timeout=CLOSE_TIMEOUT)

    async def _close_signal(self) -> None:
        if self.signal is not None:
            await self.signal.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- ticks ----------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """One tick (called by the `Ticker`): the routine after the first-tick delay, pings, purge, top-up."""
        if not self.running:
            return
        if now >= self._first_tick_at and self.routine is not None:
            if self._last_tick is None:
                delta = 0.0
            else:
                delta = max(0.0, now - self._last_tick)
                self._elapsed += delta
            self._last_tick = now
            self.routine(self._elapsed, delta, self)
        if now >= self._next_ping:
            self._next_ping = now + self.options.ping_interval * 1000.0
            self._write(self.proto.pings())
        if now >= self._next_purge:
            self._next_purge = now + 1000.0
            self.proto.purge(now)
        if now >= self._next_top_up:
            self._next_top_up = now + TOP_UP_EVERY_MS
            self.top_up()

    def tick_failed(self, exc: BaseException) -> None:
        """A tick raised (a routine's bug): logged once per peer, counted."""
        self._tick_errors += 1
        self.metrics.counter("webrtc_routine_errors")
        if self._tick_errors == 1:
            log.warning("peer %s: routine %s failed: %s", self.id, self.routine_name, describe(exc))

    # --- data point -----------------------------------------------------------------------------------

    def datapoint(self) -> dict[str, Any]:
        """The data point values: the 49 family fields, `connectedPeers`, `knownPeersCount`, `position`,
        `averageLatency` (when known), `kind`, `routine` and `receivedFrom`."""
        values = self.proto.snapshot()
        values["kind"] = self.kind
        values["routine"] = self.routine_name
        return values

    # --- writing and receiving ------------------------------------------------------------------------

    def _write(self, writes: list[Write]) -> None:
        for target, label, text in writes:
            conn = self.connections.get(target)
            channel = conn.channels.get(label) if conn is not None else None
            if channel is None or channel.readyState != "open":
                continue
            if channel.bufferedAmount > MAX_BUFFERED:
                self.skipped_writes += 1
                continue
            try:
                channel.send(text)
            except Exception as exc:
                log.debug("peer %s: write to %s failed: %s", self.id, target, describe(exc))

    def _on_packet(self, remote: str, label: str, data: str | bytes) -> None:
        receipt = self.proto.receive(data, remote, label)
        if receipt.delivered and receipt.latency_ms is not None and receipt.packet is not None:
            sub = receipt.packet["sub"]
            name = self._deliver_names.get(sub)
            if name is None:
                name = f"deliver {sub}" if len(self._deliver_names) < MAX_DELIVER_NAMES else "deliver (other)"
                self._deliver_names[sub] = name
            self.metrics.request(name, receipt.latency_ms / 1000.0, kind=KIND)
        if receipt.writes:
            self._write(receipt.writes)

    # --- connections ----------------------------------------------------------------------------------

    def top_up(self) -> list[asyncio.Task[Any]]:
        """Offer connections to random room members until `min_connections` (open or opening)."""
        want = self.min_connections - len(self.connections)
        if want <= 0 or not self.running or self.signal is None:
            return []
        now = time.monotonic()
        candidates = [
            p
            for p in self.room_members
            if p not in self.connections and p != self.id and self.cooldown.get(p, 0.0) <= now
        ]
        if not candidates:
            return []
        picked = self.rng.sample(candidates, min(want, len(candidates)))
        return [self._offer(remote) for remote in picked]

    def _new_pc(self) -> RTCPeerConnection:
        return RTCPeerConnection(RTCConfiguration(iceServers=[]))

    def _watch(self, conn: Connection) -> None:
        """Follow a connection's channels and state."""

        @conn.pc.on("connectionstatechange")
        def _state() -> None:
            if conn.pc.connectionState in ("failed", "closed"):
                self._drop(conn, leave=False)

        @conn.pc.on("datachannel")
        def _datachannel(channel: RTCDataChannel) -> None:
            self._add_channel(conn, channel)

    def _add_channel(self, conn: Connection, channel: RTCDataChannel) -> None:
        label = channel.label
        if label not in ("reliable", "unreliable"):
            return
        conn.channels[label] = channel
        remote = conn.remote

        @channel.on("message")
        def _message(data: str | bytes) -> None:
            if self.connections.get(remote) is conn:
                self._on_packet(remote, label, data)

        @channel.on("open")
        def _open() -> None:
            self._check_open(conn)

        @channel.on("close")
        def _close() -> None:
            if conn.connected:
                self._drop(conn, leave=False)

        self._check_open(conn)

    def _check_open(self, conn: Connection) -> None:
        if conn.opened.is_set():
            return
        channels = conn.channels
        if all(channels.get(label) is not None for label in ("reliable", "unreliable")) and all(
            c.readyState == "open" for c in channels.values()
        ):
            conn.opened.set()
            if self.connections.get(conn.remote) is conn and not self.closing:
                conn.connected = True
                self.proto.set_connected(conn.remote, True)

    def _drop(self, conn: Connection, leave: bool, refill: bool = True) -> None:
        """Forget a connection (LEAVE it if asked), close its pc in the background and (with `refill`)
        offer to other room members if below `min_connections`."""
        if self.connections.get(conn.remote) is conn:
            del self.connections[conn.remote]
            self.proto.set_connected(conn.remote, False)
            if leave and self.signal is not None:
                self.signal.send("LEAVE", conn.remote)
        conn.connected = False
        if not conn.answer.done():
            conn.answer.set_exception(ConnectFailed("connection closed"))
        if conn.task is not None and conn.task is not asyncio.current_task() and not conn.task.done():
            conn.task.cancel()
        if conn.pc.connectionState != "closed":
            task = asyncio.get_running_loop().create_task(_close_pc(conn.pc))
            self._closing_pcs.add(task)
            task.add_done_callback(self._closing_pcs.discard)
        if refill and not self.closing and self.running:
            self.top_up()

    def _offer(self, remote: str) -> asyncio.Task[Any]:
        pc = self._new_pc()
        conn = Connection(remote, pc, uuid.UUID(int=self.rng.getrandbits(128), version=4).hex, True)
        self.connections[remote] = conn
        self._watch(conn)
        self._add_channel(conn, pc.createDataChannel("reliable"))
        self._add_channel(conn, pc.createDataChannel("unreliable", ordered=False, maxRetransmits=0))
        conn.task = self._spawn(self._run_offer(conn))
        return conn.task

    async def _run_offer(self, conn: Connection) -> None:
        remote, pc = conn.remote, conn.pc
        timeout = self.options.connect_timeout
        began = time.perf_counter()
        stage = "the answer"
        try:
            async with asyncio.timeout(timeout):
                await pc.setLocalDescription(await pc.createOffer())
                assert self.signal is not None
                payload = {
                    "sdp": filter_sdp(pc.localDescription.sdp),
                    "type": "offer",
                    "sessionId": conn.session_id,
                }
                self.signal.send("OFFER", remote, payload)
                answer = await conn.answer
                stage = "the data channels"
                sdp = answer.get("sdp")
                if not isinstance(sdp, str):
                    raise ConnectFailed("the answer has no SDP")
                await pc.setRemoteDescription(RTCSessionDescription(filter_sdp(sdp), "answer"))
                await conn.opened.wait()
        except Superseded:
            return
        except Rejected as exc:
            self.rejected += 1
            self.metrics.counter("webrtc_offers_rejected")
            self.cooldown[remote] = time.monotonic() + COOLDOWN_REJECTED
            log.debug("peer %s: offer to %s rejected: %s", self.id, remote, exc)
            self._drop(conn, leave=False)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                reason = f"peer connection not open within {timeout:g}s (waiting for {stage})"
            else:
                reason = describe(exc)
            self.failed_connects += 1
            self.cooldown[remote] = time.monotonic() + max(COOLDOWN_REJECTED, timeout)
            if not self.closing:
                self.metrics.request(
                    "connect", time.perf_counter() - began, kind=KIND, ok=False, error=reason
                )
            self._drop(conn, leave=True)
            return
        if self.connections.get(remote) is conn:
            self.metrics.request("connect", time.perf_counter() - began, kind=KIND)

    @staticmethod
    def _description(pc: RTCPeerConnection, conn: Connection) -> dict[str, Any]:
        """An OFFER/ANSWER payload: the local SDP (loopback candidates only), its type, the session id."""
        local = pc.localDescription
        return {"sdp": filter_sdp(local.sdp), "type": local.type, "sessionId": conn.session_id}

    def _answer(self, remote: str, payload: dict[str, Any]) -> None:
        existing = self.connections.get(remote)
        session_id = str(payload.get("sessionId", ""))
        if existing is not None:
            if existing.initiator and not existing.connected:
                if self.id < remote:
                    return  # cross offer: ours stands, the other side answers it
                existing.answer.set_exception(Superseded())
            self._drop(existing, leave=False, refill=False)
        if len(self.connections) >= self.max_connections or self.closing or not self.running:
            self.rejections += 1
            if self.signal is not None:
                self.signal.send(
                    "REJECT", remote, {"reason": "TOO_MANY_CONNECTIONS", "sessionId": session_id}
                )
            return
        sdp = payload.get("sdp")
        if not isinstance(sdp, str):
            return
        pc = self._new_pc()
        conn = Connection(remote, pc, session_id, False)
        self.connections[remote] = conn
        self._watch(conn)
        conn.task = self._spawn(self._run_answer(conn, sdp))

    async def _run_answer(self, conn: Connection, sdp: str) -> None:
        pc, timeout = conn.pc, self.options.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                await pc.setRemoteDescription(RTCSessionDescription(filter_sdp(sdp), "offer"))
                await pc.setLocalDescription(await pc.createAnswer())
                assert self.signal is not None
                payload = {
                    "sdp": filter_sdp(pc.localDescription.sdp),
                    "type": "answer",
                    "sessionId": conn.session_id,
                }
                self.signal.send("ANSWER", conn.remote, payload)
                await conn.opened.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = f"not open within {timeout:g}s" if isinstance(exc, TimeoutError) else describe(exc)
            log.debug("peer %s: answering %s failed: %s", self.id, conn.remote, reason)
            self.metrics.counter("webrtc_answers_failed")
            self.cooldown[conn.remote] = time.monotonic() + COOLDOWN_REJECTED
            self._drop(conn, leave=True)

    # --- signalling -----------------------------------------------------------------------------------

    def _on_signal(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        src = message.get("src")
        raw = message.get("payload")
        payload: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if not isinstance(src, str):
            return
        if src == LIGHTHOUSE_SRC:
            self._on_notification(str(kind), payload)
            return
        if self.closing:
            return
        conn = self.connections.get(src)
        if kind == "OFFER":
            self._answer(src, payload)
            return
        if kind == "EXPIRE":
            self.cooldown[src] = time.monotonic() + COOLDOWN_REJECTED
            self.room_members.pop(src, None)
        if conn is None:
            return
        pending = conn.initiator and not conn.answer.done()
        ours = payload.get("sessionId") in (None, conn.session_id)
        if kind == "ANSWER" and pending and ours:
            conn.answer.set_result(payload)
        elif kind == "REJECT" and pending and ours:
            conn.answer.set_exception(Rejected(str(payload.get("reason") or "rejected")))
        elif kind == "EXPIRE" and pending:
            conn.answer.set_exception(Rejected("peer not connected to the lighthouse"))
        elif kind == "LEAVE":
            if pending:
                conn.answer.set_exception(Rejected("the peer left"))
            else:
                self._drop(conn, leave=False)

    def _add_user(self, user: dict[str, Any]) -> None:
        peer, user_id = user.get("peerId"), user.get("userId")
        if isinstance(peer, str) and peer != self.id:
            self.proto.add_known(peer)
            if isinstance(user_id, str):
                self._user_peer[user_id] = peer

    def _on_notification(self, kind: str, payload: dict[str, Any]) -> None:
        if kind in ("PEER_JOINED_LAYER", "PEER_JOINED_ROOM"):
            self._add_user(payload)
            peer = payload.get("peerId")
            if kind == "PEER_JOINED_ROOM" and isinstance(peer, str) and peer != self.id:
                self.room_members[peer] = None
            return
        user_id = payload.get("userId")
        if not isinstance(user_id, str):
            return
        peer = self._user_peer.get(user_id, user_id)
        if peer == self.id:
            return
        if kind == "PEER_LEFT_ROOM":
            self.room_members.pop(peer, None)
        elif kind == "PEER_LEFT_LAYER":
            self._user_peer.pop(user_id, None)
            self.room_members.pop(peer, None)
            self.proto.remove_known(peer)
            conn = self.connections.get(peer)
            if conn is not None:
                self._drop(conn, leave=False)


async def _close_pc(pc: RTCPeerConnection) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(pc.close(), CLOSE_TIMEOUT)
