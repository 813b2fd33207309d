"""The peer wire protocol: packets, message types, per-peer statistics and receive classification.

Pure logic (no aiortc): `PeerProtocol` is driven with packet texts and an injectable clock and answers
with the writes to perform, so the rules can be tested with crafted packets. `client/peer.js`
implements the same rules in the browser; both sides must agree on everything below.

Wire format
-----------
Every connection between two peers has two data channels, created by the offerer before its offer:
`reliable` (ordered, reliable) and `unreliable` (ordered=false, maxRetransmits=0). A packet is one
JSON text message, compact (`json.dumps(p, separators=(",", ":"))` / `JSON.stringify`), keys in
exactly this order::

    {"seq": int, "inst": int, "ts": int, "src": str, "sub": str, "dot": int, "exp": int, "hops": int,
     "ttl": int, "rb": [str], "opt": bool, <body>}

    <body> is exactly one of
      "msg":  {"room": str, "dst": [], "data": <object>}      a room message
      "ping": {"id": int}                                      latency probe (sub "ping")
      "pong": {"id": int}                                      its answer (sub "pong")

- `seq`  per-peer counter from 1 (every packet a peer originates, pings and pongs included)
- `inst` a random uint32 per peer instance (a restarted peer with the same id is a new sender)
- `ts`   the sender's epoch milliseconds when it built the packet
- `src`  the originating peer's id (unchanged by relays)
- `sub`  the message type's name (`position`, `profile`, `chat`, `ping`, `pong`, ...)
- `dot`  discardOlderThan in ms, -1 when unset
- `exp`  expireTime in ms, -1 when unset (then 10000 ms for bookkeeping)
- `hops` relays so far (0 as sent by `src`); `ttl` the hop limit
- `rb`   receivedBy: peers known to have (or about to get) the packet
- `opt`  optimistic: the sender adds its targets to `rb` before writing

The packet size is the UTF-8 length of the JSON text as written on the channel. A relay re-encodes
the packet (new `hops` and `rb`) and writes it on the channel it arrived on.

Message types (the original's messageTypes.ts):

    reliable(name)    ttl 10, exp 20000, dot -1, opt false  -> channel `reliable`
    unreliable(name)  ttl 10, exp 2000,  dot 0,  opt true   -> channel `unreliable`
    ping / pong       ttl 1,  exp -1,    dot -1, opt false  -> channel `reliable`

Sending (`send_packet`): add self to `rb`; targets = connected peers not in `rb` (or the one ping or
pong target); if `opt`, `rb += targets` before writing; each write counts in `sent` (hops == 0) or
`relayed` (hops > 0), and in `all`, with its size.

Receiving (`receive`), per packet:

1. count in `received` and `all`;
2. key = `{src}_{inst}_{seq}`; `duplicate` if the key was seen (then counted in `duplicate`); the key is
   marked seen at the current time (keys older than their packet's expire time are purged once a second);
3. `expired` if (dot >= 0 and the sender's latest ts for `sub` - ts > dot and the sender's latest seq for
   `sub` >= seq) or (the sender's latest ts - ts > expire time), the sender's latest values being
   kept only for known peers (layer members);
4. `relevant` if there is no `msg` or its room is one this peer joined;
5. if neither duplicate nor expired: update the sender's latest ts (overall and for `sub`) and seq for
   `sub` (known senders only); answer a ping with a pong on the same connection, take a pong's RTT;
   deliver a relevant `msg` (delivery latency = now - ts, the sender's position from `positionData`,
   `receivedFrom` += 1); then hops += 1 and, if hops < ttl, relay it (`send_packet`).

Statistics: per family F in `FAMILIES`, a snapshot (every stats interval) gives `F` (packets in the
period), `FTotal`, `FPerSecond` (= F·1000/ms since the last snapshot), `FBytes`, `FTotalBytes`,
`FBytesPerSecond` and `FAveragePacketSize` (= FTotalBytes/FTotal, 0 when none).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

FAMILIES = ("sent", "received", "relayed", "all", "relevant", "duplicate", "expired")
"""The seven packet families every data point reports."""
FIELD_SUFFIXES = ("", "Total", "PerSecond", "Bytes", "TotalBytes", "BytesPerSecond", "AveragePacketSize")
"""The seven fields per family: `sent`, `sentTotal`, `sentPerSecond`, ... `sentAveragePacketSize`."""
CHANNELS = ("reliable", "unreliable")
"""Data channel labels, in creation order."""
BODY_KEYS = ("msg", "ping", "pong")
"""A packet has exactly one of these."""
DEFAULT_EXPIRE_MS = 10_000
"""Expire time of a packet with `exp` unset (-1)."""
PURGE_EVERY_MS = 1_000
"""How often seen packet keys are purged."""
MAX_SENDERS = 64
"""`receivedFrom` keeps at most this many senders."""
_INT_KEYS = ("seq", "inst", "ts", "dot", "exp", "hops", "ttl")
PACKET_KEYS = ("seq", "inst", "ts", "src", "sub", "dot", "exp", "hops", "ttl", "rb", "opt")
"""The header keys, in wire order (the body key follows)."""


def now_ms() -> float:
    """Epoch milliseconds (the default clock)."""
    return time.time() * 1000.0


class PacketError(ValueError):
    """A text that is not a valid packet."""


@dataclass(frozen=True)
class MessageType:
    """How a message is sent: its subtype name, hop limit, expiry, discard rule, optimism, channel."""

    name: str
    ttl: int
    expire_ms: int
    discard_older_than: int
    optimistic: bool
    channel: str


def reliable(name: str) -> MessageType:
    """A reliable message type: ttl 10, exp 20000, dot -1, opt false, channel `reliable`."""
    return MessageType(name, 10, 20_000, -1, False, "reliable")


def unreliable(name: str) -> MessageType:
    """An unreliable message type: ttl 10, exp 2000, dot 0, opt true, channel `unreliable`."""
    return MessageType(name, 10, 2_000, 0, True, "unreliable")


PING = MessageType("ping", 1, -1, -1, False, "reliable")
"""A latency probe to one connected peer."""
PONG = MessageType("pong", 1, -1, -1, False, "reliable")
"""The answer to a ping, on the connection it came from."""


def make_packet(
    seq: int, inst: int, ts: int, src: str, mtype: MessageType, body_key: str, body: dict[str, Any]
) -> dict[str, Any]:
    """A fresh packet (hops 0, empty rb), keys in wire order."""
    if body_key not in BODY_KEYS:
        raise ValueError(f"body key must be one of {BODY_KEYS}, not {body_key!r}")
    return {
        "seq": seq,
        "inst": inst,
        "ts": ts,
        "src": src,
        "sub": mtype.name,
        "dot": mtype.discard_older_than,
        "exp": mtype.expire_ms,
        "hops": 0,
        "ttl": mtype.ttl,
        "rb": [],
        "opt": mtype.optimistic,
        body_key: body,
    }


def encode(packet: dict[str, Any]) -> str:
    """The packet's wire text (compact JSON, keys in the packet's order)."""
    return json.dumps(packet, separators=(",", ":"), ensure_ascii=False)


def size_of(text: str) -> int:
    """A packet's size in bytes: the UTF-8 length of its text."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def decode(text: str | bytes) -> dict[str, Any]:
    """A packet from its wire text; PacketError if it is not one."""
    try:
        packet = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PacketError(f"not JSON: {exc}") from None
    if type(packet) is not dict:
        raise PacketError("not a JSON object")
    try:
        for key in _INT_KEYS:
            if type(packet[key]) is not int:
                raise PacketError(f"{key!r} must be an integer")
        if type(packet["src"]) is not str or type(packet["sub"]) is not str:
            raise PacketError("'src' and 'sub' must be strings")
        rb = packet["rb"]
        if type(rb) is not list or not all(type(x) is str for x in rb):
            raise PacketError("'rb' must be a list of strings")
        if type(packet["opt"]) is not bool:
            raise PacketError("'opt' must be a boolean")
    except KeyError as exc:
        raise PacketError(f"{exc.args[0]!r} is missing") from None
    bodies = [k for k in BODY_KEYS if k in packet]
    if len(bodies) != 1:
        raise PacketError("a packet has exactly one of 'msg', 'ping', 'pong'")
    body = packet[bodies[0]]
    if type(body) is not dict:
        raise PacketError(f"{bodies[0]!r} must be an object")
    if bodies[0] == "msg":
        if type(body.get("room")) is not str:
            raise PacketError("'msg.room' must be a string")
    elif type(body.get("id")) is not int:
        raise PacketError(f"'{bodies[0]}.id' must be an integer")
    return packet


def packet_key(packet: dict[str, Any]) -> str:
    """The key duplicates are detected by: `{src}_{inst}_{seq}`."""
    return f"{packet['src']}_{packet['inst']}_{packet['seq']}"


def expire_of(packet: dict[str, Any]) -> int:
    """The packet's expire time in ms (`exp` if > 0, else 10000)."""
    exp = packet["exp"]
    return exp if exp > 0 else DEFAULT_EXPIRE_MS


class PeerStats:
    """Packet and byte counts per family, with the period/total snapshot of the original's stats."""

    __slots__ = ("_last_ms", "_period", "_total")

    def __init__(self, now: float) -> None:
        self._period: dict[str, list[int]] = {f: [0, 0] for f in FAMILIES}
        self._total: dict[str, list[int]] = {f: [0, 0] for f in FAMILIES}
        self._last_ms = now

    def add(self, family: str, nbytes: int) -> None:
        """Count one packet of `nbytes` in `family`."""
        period, total = self._period[family], self._total[family]
        period[0] += 1
        period[1] += nbytes
        total[0] += 1
        total[1] += nbytes

    def total(self, family: str) -> tuple[int, int]:
        """Cumulative (packets, bytes) of a family."""
        packets, nbytes = self._total[family]
        return packets, nbytes

    def snapshot(self, now: float) -> dict[str, float]:
        """The 49 fields for the period since the last snapshot, then start a new period."""
        elapsed = now - self._last_ms
        self._last_ms = now
        out: dict[str, float] = {}
        for family in FAMILIES:
            period, total = self._period[family], self._total[family]
            out[family] = period[0]
            out[f"{family}Total"] = total[0]
            out[f"{family}PerSecond"] = period[0] * 1000.0 / elapsed if elapsed > 0 else 0.0
            out[f"{family}Bytes"] = period[1]
            out[f"{family}TotalBytes"] = total[1]
            out[f"{family}BytesPerSecond"] = period[1] * 1000.0 / elapsed if elapsed > 0 else 0.0
            out[f"{family}AveragePacketSize"] = total[1] / total[0] if total[0] else 0.0
            period[0] = period[1] = 0
        return out


@dataclass
class KnownPeer:
    """What a peer keeps about another layer member."""

    id: str
    timestamp: int | None = None
    """The latest `ts` of any packet accepted from it."""
    ts_by_type: dict[str, int] = field(default_factory=dict)
    seq_by_type: dict[str, int] = field(default_factory=dict)
    latency: float | None = None
    """Its latest ping round trip in ms."""
    position: list[float] | None = None


class Write(NamedTuple):
    """One packet text to write to one connected peer on one channel."""

    target: str
    channel: str
    text: str


@dataclass
class Receipt:
    """How one received packet was classified and what it caused."""

    packet: dict[str, Any] | None
    """The decoded packet (None: not a packet; it is still counted as received)."""
    size: int
    duplicate: bool = False
    expired: bool = False
    relevant: bool = False
    delivered: bool = False
    """A relevant `msg` accepted for the first time."""
    latency_ms: float | None = None
    """Delivery latency (now - ts) of a delivered message."""
    rtt_ms: float | None = None
    """The round trip a pong completed."""
    writes: list[Write] = field(default_factory=list)
    """Relays and a pong to perform."""


class PeerProtocol:
    """One peer's protocol state: sequence numbers, known peers, seen packets, pings and statistics.

    The peer keeps `connected` (open connections, in order), `known` (layer members) and `rooms` up to
    date; `message`, `pings` and `receive` return the `Write`s to perform and keep the counts.
    """

    def __init__(
        self,
        peer_id: str,
        inst: int | None = None,
        clock: Callable[[], float] = now_ms,
        rng: random.Random | None = None,
    ) -> None:
        self.id = peer_id
        self.inst = inst if inst is not None else (rng or random).getrandbits(32)
        self.clock = clock
        self.seq = 0
        self.stats = PeerStats(clock())
        self.known: dict[str, KnownPeer] = {}
        self.rooms: set[str] = set()
        self.connected: dict[str, None] = {}
        """Open connections by peer id (an ordered set)."""
        self.position: list[float] = [0.0, 0.0, 0.0]
        self.received_from: dict[str, int] = {}
        self.seen: dict[int, dict[str, float]] = {}
        """Seen packet keys by expire time (ms), each in the order last seen, with when."""
        self._last_purge = clock()
        self._ping_id = 0
        self.pings_sent: dict[int, tuple[str, float]] = {}
        """Pings awaiting a pong: id -> (target, sent at ms)."""

    # --- membership -------------------------------------------------------------------------------------

    def add_known(self, peer_id: str) -> None:
        """A layer member (not self)."""
        if peer_id != self.id and peer_id not in self.known:
            self.known[peer_id] = KnownPeer(peer_id)

    def remove_known(self, peer_id: str) -> None:
        """A peer left the layer."""
        self.known.pop(peer_id, None)

    def set_connected(self, peer_id: str, connected: bool) -> None:
        """A connection opened (both channels) or closed."""
        if connected:
            self.connected[peer_id] = None
        else:
            self.connected.pop(peer_id, None)

    # --- sending ----------------------------------------------------------------------------------------

    def new_packet(self, mtype: MessageType, body_key: str, body: dict[str, Any]) -> dict[str, Any]:
        """A packet from this peer with the next sequence number and the current time."""
        self.seq += 1
        return make_packet(self.seq, self.inst, int(self.clock()), self.id, mtype, body_key, body)

    def message(
        self, room: str, data: dict[str, Any], mtype: MessageType, dst: Iterable[str] = ()
    ) -> list[Write]:
        """Send `data` to a room: the writes to perform (already counted)."""
        packet = self.new_packet(mtype, "msg", {"room": room, "dst": list(dst), "data": data})
        return self.send_packet(packet, mtype.channel)

    def pings(self) -> list[Write]:
        """A ping to every connected peer."""
        writes: list[Write] = []
        now = self.clock()
        for target in list(self.connected):
            self._ping_id += 1
            self.pings_sent[self._ping_id] = (target, now)
            packet = self.new_packet(PING, "ping", {"id": self._ping_id})
            writes.extend(self.send_packet(packet, PING.channel, only=target))
        return writes

    def send_packet(self, packet: dict[str, Any], channel: str, only: str | None = None) -> list[Write]:
        """Route a packet: self into `rb`, targets = connected peers not in `rb` (or just `only`), `rb +=
        targets` when optimistic; count each write in sent (hops 0) or relayed, and in all."""
        rb: list[str] = packet["rb"]
        if self.id not in rb:
            rb.append(self.id)
        if only is not None:
            targets = [only] if only in self.connected and only not in rb else []
        else:
            seen = set(rb)
            targets = [p for p in self.connected if p not in seen]
        if not targets:
            return []
        if packet["opt"]:
            rb.extend(targets)
        text = encode(packet)
        size = size_of(text)
        family = "sent" if packet["hops"] == 0 else "relayed"
        add = self.stats.add
        for _ in targets:
            add(family, size)
            add("all", size)
        return [Write(t, channel, text) for t in targets]

    # --- receiving --------------------------------------------------------------------------------------

    def receive(self, text: str | bytes, sender: str, channel: str) -> Receipt:
        """Classify a packet that arrived from `sender` on `channel`; returns what to do about it."""
        if isinstance(text, bytes):
            size = len(text)
            text = text.decode("utf-8", "replace")
        else:
            size = size_of(text)
        stats = self.stats
        stats.add("received", size)
        stats.add("all", size)
        now = self.clock()
        if now - self._last_purge >= PURGE_EVERY_MS:
            self.purge(now)
        try:
            packet = decode(text)
        except PacketError:
            return Receipt(None, size)
        receipt = Receipt(packet, size)
        key = packet_key(packet)
        expire = expire_of(packet)
        src: str = packet["src"]
        seq: int = packet["seq"]
        ts: int = packet["ts"]
        sub: str = packet["sub"]
        bucket = self.seen.get(expire)
        if bucket is None:
            bucket = self.seen[expire] = {}
        if bucket.pop(key, None) is not None:
            receipt.duplicate = True
            stats.add("duplicate", size)
        bucket[key] = now

        known = self.known.get(src)
        if known is not None:
            dot = packet["dot"]
            last_ts = known.ts_by_type.get(sub)
            by_seq = (
                dot >= 0
                and last_ts is not None
                and last_ts - ts > dot
                and known.seq_by_type.get(sub, -1) >= seq
            )
            by_age = known.timestamp is not None and known.timestamp - ts > expire
            if by_seq or by_age:
                receipt.expired = True
                stats.add("expired", size)

        msg = packet.get("msg")
        receipt.relevant = msg is None or msg.get("room") in self.rooms
        if receipt.relevant:
            stats.add("relevant", size)
        if receipt.duplicate or receipt.expired or src == self.id:
            return receipt

        if known is not None:
            if known.timestamp is None or ts > known.timestamp:
                known.timestamp = ts
            if ts > known.ts_by_type.get(sub, ts - 1):
                known.ts_by_type[sub] = ts
            if seq > known.seq_by_type.get(sub, seq - 1):
                known.seq_by_type[sub] = seq
        if "ping" in packet:
            pong = self.new_packet(PONG, "pong", {"id": packet["ping"]["id"]})
            receipt.writes.extend(self.send_packet(pong, channel, only=sender))
        elif "pong" in packet:
            sent = self.pings_sent.pop(packet["pong"]["id"], None)
            if sent is not None and sent[0] == src:
                receipt.rtt_ms = max(0.0, now - sent[1])
                if known is not None:
                    known.latency = receipt.rtt_ms
        elif msg is not None and receipt.relevant:
            receipt.delivered = True
            receipt.latency_ms = max(0.0, now - ts)
            if src in self.received_from or len(self.received_from) < MAX_SENDERS:
                self.received_from[src] = self.received_from.get(src, 0) + 1
            data = msg.get("data")
            position = data.get("positionData") if isinstance(data, dict) else None
            if known is not None and isinstance(position, dict):
                try:
                    known.position = [
                        float(position["positionX"]),
                        float(position["positionY"]),
                        float(position["positionZ"]),
                    ]
                except (KeyError, TypeError, ValueError):
                    pass
        packet["hops"] += 1
        if packet["hops"] < packet["ttl"]:
            receipt.writes.extend(self.send_packet(packet, channel))
        return receipt

    def purge(self, now: float | None = None) -> None:
        """Forget seen keys older than their packet's expire time; drop pings never answered."""
        now = self.clock() if now is None else now
        self._last_purge = now
        for expire, bucket in self.seen.items():
            old = []
            for key, when in bucket.items():
                if now - when <= expire:
                    break
                old.append(key)
            for key in old:
                del bucket[key]
        if self.pings_sent:
            self.pings_sent = {
                k: v for k, v in self.pings_sent.items() if now - v[1] <= DEFAULT_EXPIRE_MS * 6
            }

    def seen_count(self) -> int:
        """How many packet keys are remembered."""
        return sum(len(b) for b in self.seen.values())

    # --- reporting --------------------------------------------------------------------------------------

    def average_latency(self) -> float | None:
        """Mean latest RTT (ms) over known peers that have one."""
        values = [k.latency for k in self.known.values() if k.latency is not None]
        return sum(values) / len(values) if values else None

    def snapshot(self) -> dict[str, Any]:
        """The data point values the protocol knows: the 49 family fields, `connectedPeers`,
        `knownPeersCount`, `position`, `averageLatency` (when any RTT is known) and `receivedFrom`."""
        values: dict[str, Any] = dict(self.stats.snapshot(self.clock()))
        values["connectedPeers"] = list(self.connected)
        values["knownPeersCount"] = len(self.known)
        values["position"] = list(self.position)
        latency = self.average_latency()
        if latency is not None:
            values["averageLatency"] = latency
        values["receivedFrom"] = dict(self.received_from)
        return values
