"""`webrtc-peer`: many aiortc peers per worker in one lighthouse room, the Catalyst peer test's load.

Each virtual user is one peer (`peer.Peer`):

    groups:
      peers:
        simulator: webrtc-peer
        users: 20
        think_time: 0s            # each iteration waits for the peer's next stats time itself
        options:
          target: lighthouse       # a `lighthouse` target (or lighthouse_url)
          routines: {catalyst: 1}
          stats_interval: 2s

`start_user` draws a peer id (`0x` + 40 hex, from the worker's seeded rng) and a routine, opens the
peer's signal socket, joins the layer and the room (`join room`, kind `webrtc`) and offers connections
to up to `min_connections` room members (`connect` per connection, kind `webrtc`; a rejected offer is
the counter `webrtc_offers_rejected`, not a failure). Each iteration is one stats interval: it waits
until the peer's next stats time and publishes the peer's data point (entity = peer id; the 49 family
fields, `connectedPeers`, `knownPeersCount`, `position`, `averageLatency`, `kind: "aiortc"`,
`routine`, `receivedFrom`) through `publish`. Every first receipt of a room message is a
`deliver {sub}` request (kind `webrtc`) with its latency (now - the sender's ts). `stop_user` leaves
(LEAVE to each connection, leave room and layer, close). The routines of all of a worker's peers run
from one shared ~60 Hz ticker.

A lighthouse that cannot be reached or joined is a `join room` failure with a one-line reason; that
user then backs off for a second or two and ends (the worker starts another).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import aiohttp

from harness.simulator import Simulator, StopUser, User
from simulators.webrtc.common import PeerReporter, RoomOptions, family_table, new_peer_id
from simulators.webrtc.peer import ConnectFailed, Peer, Ticker, quiet_close_noise
from simulators.webrtc.routines import check_routines, make_routine
from simulators.webrtc.signalling import LighthouseClient

RETRY_BACKOFF = (1.0, 2.0)
"""A user whose peer could not join waits U[1, 2) s before ending."""
QUIET_LOGGERS = ("aioice", "aiortc")
"""Libraries whose loggers are set to WARNING unless configured otherwise."""
SLEEP_SLICE = 0.25
"""Iterations wait in slices this long so a stopping user ends promptly."""


class PeerOptions(RoomOptions):
    """Options of the `webrtc-peer` simulator (those of every WebRTC peer group)."""


class PeerSimulator(Simulator):
    """Many aiortc peers per worker in a lighthouse room: positions, profiles, chat, relays, pings."""

    name = "webrtc-peer"
    description = "WebRTC peers (aiortc) in a lighthouse room: the Catalyst peer test's routines and stats"
    Options = PeerOptions
    extra = "webrtc"

    @classmethod
    def check_profile(cls, options: Any, profile: Any) -> None:
        RoomOptions.check_room(options, profile)
        check_routines(options)

    @classmethod
    def summary_tables(
        cls, group: str, endpoints: list[dict[str, Any]], counters: dict[str, float]
    ) -> list[dict[str, Any]]:
        return family_table(counters)

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.peers: dict[int, Peer] = {}
        self.session: aiohttp.ClientSession | None = None
        self.client: LighthouseClient | None = None
        self.ticker: Ticker | None = None
        self.reporter: PeerReporter | None = None
        self._logged: set[str] = set()

    async def setup(self) -> None:
        opts: RoomOptions = self.options
        for name in QUIET_LOGGERS:  # their INFO lines (every ICE check) would flood the run log
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.WARNING)
        quiet_close_noise(asyncio.get_running_loop())
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.client = LighthouseClient(opts.lighthouse(self.ctx), self.session, timeout=opts.connect_timeout)
        self.ticker = Ticker(opts.tick_hz)
        self.reporter = PeerReporter(self.metrics, self.ctx.run_id, opts.influx_url, self.log)

    def new_peer(self) -> Peer:
        """A peer with a fresh id, its own rng and a routine drawn by weight (not started)."""
        assert self.client is not None
        opts: RoomOptions = self.options
        rng = self.ctx.rng
        peer_id = new_peer_id(rng)
        routine_name = opts.pick_routine(rng)
        peer = Peer(
            peer_id,
            opts,
            self.client,
            self.metrics,
            random.Random(rng.getrandbits(64)),
            routine_name=routine_name,
            ticker=self.ticker,
        )
        peer.routine = make_routine(routine_name, opts, peer)
        return peer

    async def start_user(self, user: User) -> None:
        peer = self.new_peer()
        self.peers[user.id] = peer
        user.data = {"peer": peer}
        try:
            await peer.start()
        except ConnectFailed as exc:
            message = str(exc)
            if message not in self._logged and len(self._logged) < 20:
                self._logged.add(message)
                self.log.warning("webrtc peer %s could not join: %s", peer.id, message)
            await asyncio.sleep(self.ctx.rng.uniform(*RETRY_BACKOFF))
            raise StopUser from None

    async def iteration(self, user: User) -> None:
        peer: Peer | None = (user.data or {}).get("peer")
        if peer is None or not peer.running:
            raise StopUser
        interval = self.options.stats_interval
        while not user.stopping and peer.running:
            left = peer.next_stats - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(left, SLEEP_SLICE))
        if user.stopping or not peer.running:
            return
        now = time.monotonic()
        peer.next_stats += interval
        if peer.next_stats <= now:  # fell behind (an overloaded worker): the next one an interval from now
            peer.next_stats = now + interval
        self.publish(peer.id, peer.datapoint())

    def publish(self, peer_id: str, values: dict[str, Any]) -> None:
        """Publish one peer's data point: into the run, the family counters and InfluxDB (`influx_url`)."""
        assert self.reporter is not None
        self.reporter.publish(peer_id, values)

    async def stop_user(self, user: User) -> None:
        peer = self.peers.pop(user.id, None)
        if peer is not None:
            await peer.close()

    async def teardown(self) -> None:
        peers = list(self.peers.values())
        self.peers.clear()
        if peers:
            await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
        if self.ticker is not None:
            await self.ticker.close()
        if self.reporter is not None:
            await self.reporter.close()
        if self.session is not None:
            await self.session.close()
