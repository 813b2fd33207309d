"""What the `webrtc-peer` and `webrtc-browser` simulators share: their options and peer ids."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.durations import Duration
from harness.metrics import Metrics
from harness.simulator import check_target_choice
from harness.targets.results import InfluxWriter, influx_lines
from simulators.webrtc.protocol import FAMILIES

BUILTIN_ROUTINES = ("catalyst", "silent", "walk")
"""Routines every peer knows by name (aiortc and browser alike); see `routines`."""


class RoomOptions(BaseModel):
    """Options of a WebRTC peer group: where peers meet, what they do and how often they report."""

    model_config = ConfigDict(extra="forbid")

    target: str | None = None
    """The profile's `lighthouse` target to join (optional when the profile has one target)."""
    lighthouse_url: str | None = None
    """An external lighthouse's base URL instead of a profile target."""
    layer: str = "blue"
    """The layer every peer joins (the original's `blue`)."""
    room: str = "room"
    """The room every peer joins and sends to (the original's `room`)."""
    routines: dict[str, float] = Field(default_factory=lambda: {"catalyst": 1.0})
    """Routine weights: each peer draws one routine (`catalyst`, `silent`, `walk`, or
    `package.module:function` for aiortc peers) in proportion to its weight."""
    position_every: Duration = Field(default=0.1, gt=0)
    """Position messages (unreliable) every this long (the original: 100 ms)."""
    profile_every: Duration = Field(default=1.0, gt=0)
    """Profile messages (unreliable) every this long (the original: 1 s)."""
    chat_every: Duration = Field(default=10.0, gt=0)
    """Chat messages (reliable) every this long (the original: 10 s)."""
    tick_hz: float = Field(default=60.0, gt=0, le=1000)
    """Routine ticks per second (the original: a 16 ms timer, about 60 Hz)."""
    start_jitter: Duration = Field(default=3.0, ge=0)
    """The first tick is delayed by U[0, start_jitter) to de-synchronise peers (the original: 3 s)."""
    stats_interval: Duration = Field(default=2.0, gt=0)
    """Each peer publishes a data point this often (the original's `statsSubmitInterval`, 2 s)."""
    ping_interval: Duration = Field(default=9.0, gt=0)
    """Each peer pings its connected peers this often, for `averageLatency` (the original: 9 s)."""
    min_connections: int | None = Field(default=None, ge=1)
    """Connections a peer opens on its own; none: what the lighthouse advises (4)."""
    max_connections: int | None = Field(default=None, ge=1)
    """Connections a peer accepts at most; none: the lighthouse's cap (8)."""
    connect_timeout: Duration = Field(default=10.0, gt=0)
    """How long one peer connection may take to open its data channels."""
    area: float = Field(default=32.0, gt=0)
    """Peers start at x, z in U[-area, area], y = 0 (the original: a 4x4-parcel area, 32)."""
    influx_url: str | None = None
    """Also write every data point, in the original's InfluxDB line protocol layout, to this InfluxDB
    `write` URL (e.g. `http://127.0.0.1:8086/write?db=comms&precision=ms`)."""

    @field_validator("routines")
    @classmethod
    def _routines(cls, value: dict[str, float]) -> dict[str, float]:
        for name in value:
            if name not in BUILTIN_ROUTINES and ":" not in name:
                known = ", ".join(BUILTIN_ROUTINES)
                raise ValueError(f"unknown routine {name!r}; use {known} or 'package.module:function'")
        if any(w < 0 for w in value.values()) or not any(w > 0 for w in value.values()):
            raise ValueError("weights must be >= 0 with at least one > 0")
        return value

    @model_validator(mode="after")
    def _connections(self) -> RoomOptions:
        if self.min_connections and self.max_connections and self.min_connections > self.max_connections:
            raise ValueError("min_connections must not exceed max_connections")
        return self

    @classmethod
    def check_room(cls, options: RoomOptions, profile: Any) -> None:
        """For `check_profile`: the lighthouse is a profile target or an explicit URL."""
        check_target_choice(profile, options.target, options.lighthouse_url, "lighthouse_url")

    def lighthouse(self, ctx: Any) -> str:
        """The lighthouse base URL for a simulator context."""
        return (self.lighthouse_url or ctx.target_url(self.target)).rstrip("/")

    def pick_routine(self, rng: random.Random) -> str:
        """One routine name, drawn by weight."""
        names = [n for n, w in self.routines.items() if w > 0]
        return rng.choices(names, weights=[self.routines[n] for n in names])[0]


def new_peer_id(rng: random.Random) -> str:
    """A peer id like the original's: 42 characters, emulating an Ethereum address (`0x` + 40 hex)."""
    return "0x" + "".join(rng.choice("0123456789abcdef") for _ in range(40))


class PeerReporter:
    """Where a peer's data point goes: into the run (`metrics.datapoint`), into per-second counters
    `packets {family}` and `bytes {family}` (the run's timeline and end table), and, with `influx_url`, to
    InfluxDB in the original's line layout (measurement `test-{run_id}`, tag `peer`)."""

    def __init__(self, metrics: Metrics, run_id: str, influx_url: str | None, log: logging.Logger) -> None:
        self.metrics = metrics
        self.run_id = run_id
        self.log = log
        self.influx = InfluxWriter(influx_url) if influx_url else None

    def publish(self, peer_id: str, values: dict[str, Any], t: float | None = None) -> None:
        """Keep one data point of one peer."""
        t = time.time() if t is None else t
        self.metrics.datapoint(peer_id, values, t=t)
        for family in FAMILIES:
            packets = values.get(family)
            if isinstance(packets, (int, float)) and packets:
                self.metrics.counter(f"packets {family}", packets)
            size = values.get(f"{family}Bytes")
            if isinstance(size, (int, float)) and size:
                self.metrics.counter(f"bytes {family}", size)
        if self.influx is not None:
            self.influx.write(influx_lines(self.run_id, peer_id, values, int(t * 1000)))

    async def close(self) -> None:
        """Send what InfluxDB has not got yet."""
        if self.influx is not None:
            influx, self.influx = self.influx, None
            await influx.close()


def family_table(counters: dict[str, float], seconds: float | None = None) -> list[dict[str, Any]]:
    """The end-of-run table of a WebRTC group: packets and bytes per family, summed over its peers."""
    if not any(counters.get(f"packets {family}") for family in FAMILIES):
        return []
    all_packets = counters.get("packets all", 0.0) or 0.0
    rows = []
    for family in FAMILIES:
        packets = counters.get(f"packets {family}", 0.0)
        size = counters.get(f"bytes {family}", 0.0)
        share = f"{packets / all_packets * 100:.1f}%" if all_packets else "–"
        rows.append(
            [family, int(packets), round(size / 1e6, 3), round(size / packets) if packets else 0, share]
        )
    return [
        {
            "title": "Packets by family (all peers)",
            "columns": ["family", "packets", "MB", "avg bytes", "share of all"],
            "rows": rows,
            "note": "sent and relayed count each write to a connection; received counts every arrival, "
            "so duplicate and expired are shares of received (seed-systems.md §3.3)",
        }
    ]
