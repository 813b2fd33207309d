"""The webrtc peer wire protocol and routines as pure logic: crafted packets, an injected clock."""

from __future__ import annotations

import json
import random
import sys
import types
from typing import Any

import pytest

from simulators.webrtc.common import RoomOptions
from simulators.webrtc.protocol import (
    FAMILIES,
    PING,
    PacketError,
    PeerProtocol,
    PeerStats,
    decode,
    encode,
    make_packet,
    reliable,
    unreliable,
)
from simulators.webrtc.routines import PeriodicAction, check_routines, make_routine, pick_routine

POSITION = unreliable("position")
CHAT = reliable("chat")


class Clock:
    """A settable epoch-ms clock."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def proto(
    peer_id: str = "me", *, known: tuple[str, ...] = ("a", "b"), connected: tuple[str, ...] = ()
) -> Any:
    clock = Clock()
    p = PeerProtocol(peer_id, inst=7, clock=clock)
    p.rooms.add("room")
    for k in known:
        p.add_known(k)
    for c in connected:
        p.set_connected(c, True)
    return p, clock


def pkt(
    src: str = "a",
    seq: int = 1,
    ts: int = 1_000_000,
    mtype: Any = POSITION,
    room: str = "room",
    hops: int = 0,
    rb: list[str] | None = None,
    inst: int = 42,
    data: dict[str, Any] | None = None,
) -> str:
    p = make_packet(seq, inst, ts, src, mtype, "msg", {"room": room, "dst": [], "data": data or {"x": 1}})
    p["hops"] = hops
    p["rb"] = list(rb if rb is not None else [src])
    return encode(p)


def test_encoding_is_compact_with_the_wire_key_order() -> None:
    p = make_packet(3, 9, 1234, "a", CHAT, "msg", {"room": "room", "dst": [], "data": {"t": "é"}})
    text = encode(p)
    assert text.startswith('{"seq":3,"inst":9,"ts":1234,"src":"a","sub":"chat","dot":-1,"exp":20000,')
    assert '"hops":0,"ttl":10,"rb":[],"opt":false,"msg":{"room":"room","dst":[],"data":{"t":"é"}}}' in text
    assert " " not in text
    assert decode(text) == p
    u = make_packet(1, 1, 1, "a", POSITION, "msg", {"room": "r", "dst": [], "data": {}})
    assert (u["ttl"], u["exp"], u["dot"], u["opt"]) == (10, 2000, 0, True)
    assert POSITION.channel == "unreliable" and CHAT.channel == "reliable"


@pytest.mark.parametrize(
    "text",
    [
        "nope",
        "[]",
        '{"seq":1}',
        encode({**make_packet(1, 1, 1, "a", CHAT, "ping", {"id": 1}), "pong": {"id": 1}}),
        encode({**make_packet(1, 1, 1, "a", CHAT, "msg", {"room": "r", "dst": [], "data": {}}), "opt": 1}),
        encode(make_packet(1, 1, 1, "a", CHAT, "msg", {"dst": []})),
    ],
)
def test_decode_rejects_what_is_not_a_packet(text: str) -> None:
    with pytest.raises(PacketError):
        decode(text)


def test_a_bad_packet_is_counted_received_and_nothing_else() -> None:
    p, _ = proto(connected=("a",))
    r = p.receive("garbage", "a", "reliable")
    assert r.packet is None and not r.writes
    assert p.stats.total("received") == (1, 7) and p.stats.total("all") == (1, 7)
    assert p.stats.total("relevant") == (0, 0)


def test_duplicate_is_counted_and_not_relayed_again() -> None:
    p, _ = proto(connected=("a", "b"))
    text = pkt()
    first = p.receive(text, "a", "unreliable")
    assert not first.duplicate and first.delivered and [w.target for w in first.writes] == ["b"]
    again = p.receive(text, "b", "unreliable")
    assert again.duplicate and not again.delivered and not again.writes
    assert p.stats.total("duplicate") == (1, len(text))
    assert p.stats.total("received")[0] == 2 and p.stats.total("relevant")[0] == 2
    assert p.received_from == {"a": 1}
    # another instance of the same peer (restarted) with the same seq is not a duplicate
    assert not p.receive(pkt(inst=43, ts=1_000_001), "a", "unreliable").duplicate


def test_seen_keys_are_purged_after_the_expire_time() -> None:
    p, clock = proto()
    text = pkt()  # exp 2000
    p.receive(text, "a", "unreliable")
    clock.t += 1500
    p.receive(pkt(mtype=CHAT, seq=2, ts=1_001_500), "a", "reliable")  # exp 20000
    assert p.seen_count() == 2
    clock.t += 1000  # 2500 ms after the first
    p.purge()
    assert p.seen_count() == 1
    assert not p.receive(text, "a", "unreliable").duplicate  # forgotten: no longer a duplicate


def test_expired_by_age() -> None:
    p, clock = proto()
    clock.t = 1_010_000
    assert not p.receive(pkt(seq=5, ts=1_010_000, mtype=CHAT), "a", "reliable").expired
    # 20000 ms expiry for chat: 15 s older is fine, 21 s older is expired
    ok = p.receive(pkt(seq=1, ts=1_010_000 - 15_000, mtype=CHAT), "a", "reliable")
    assert not ok.expired and ok.delivered
    late = p.receive(pkt(seq=2, ts=1_010_000 - 21_000, mtype=CHAT), "a", "reliable")
    assert late.expired and not late.delivered and not late.writes
    assert p.stats.total("expired")[0] == 1
    # an unknown sender has no history: never expired
    assert not p.receive(pkt(src="z", seq=2, ts=1, mtype=CHAT), "a", "reliable").expired


def test_expired_by_sequence_with_discard_older_than_zero() -> None:
    p, _ = proto()
    p.receive(pkt(seq=10, ts=1_000_000), "a", "unreliable")
    # older ts and an older seq: discarded (unreliable: dot 0)
    old = p.receive(pkt(seq=9, ts=999_990), "a", "unreliable")
    assert old.expired
    # older ts but a newer seq (reordered sender clock): kept
    assert not p.receive(pkt(seq=11, ts=999_995), "a", "unreliable").expired
    # same ts as the latest: not older, kept
    assert not p.receive(pkt(seq=8, ts=1_000_000), "a", "unreliable").expired
    # reliable (dot -1): an older seq with an older ts is kept
    p.receive(pkt(seq=20, ts=1_000_000, mtype=CHAT), "a", "reliable")
    assert not p.receive(pkt(seq=19, ts=999_000, mtype=CHAT), "a", "reliable").expired
    assert p.stats.total("expired")[0] == 1


def test_a_duplicate_that_is_also_expired_counts_in_both() -> None:
    p, clock = proto()
    old = pkt(seq=1, ts=1_000_000)
    p.receive(old, "a", "unreliable")
    clock.t += 100
    p.receive(pkt(seq=2, ts=1_000_100), "a", "unreliable")
    r = p.receive(old, "b", "unreliable")
    assert r.duplicate and r.expired
    assert p.stats.total("duplicate")[0] == 1 and p.stats.total("expired")[0] == 1


def test_sent_vs_relayed_counting_and_ttl() -> None:
    p, _ = proto(connected=("a", "b", "c"))
    writes = p.message("room", {"hi": 1}, CHAT)
    assert [w.target for w in writes] == ["a", "b", "c"] and {w.channel for w in writes} == {"reliable"}
    sent = json.loads(writes[0].text)
    assert sent["src"] == "me" and sent["hops"] == 0 and sent["rb"] == ["me"] and sent["seq"] == 1
    assert p.stats.total("sent") == (3, 3 * len(writes[0].text)) and p.stats.total("relayed") == (0, 0)
    # a packet from a at hops 2: accepted, hops 3, relayed to b and c (not back to a, in rb)
    r = p.receive(pkt(hops=2, rb=["a"], mtype=CHAT), "a", "reliable")
    assert sorted(w.target for w in r.writes) == ["b", "c"]
    relayed = json.loads(r.writes[0].text)
    assert relayed["hops"] == 3 and relayed["rb"] == ["a", "me"]
    assert p.stats.total("relayed") == (2, 2 * len(r.writes[0].text))
    assert p.stats.total("sent")[0] == 3
    assert p.stats.total("all")[0] == 3 + 1 + 2
    # ttl: hops 9 -> 10 is not < 10: delivered but not relayed
    last = p.receive(pkt(seq=2, hops=9, mtype=CHAT), "a", "reliable")
    assert last.delivered and not last.writes
    # relays go out on the channel the packet came in on
    assert {w.channel for w in p.receive(pkt(seq=3, mtype=POSITION), "a", "unreliable").writes} == {
        "unreliable"
    }


def test_received_by_and_optimistic_target_selection() -> None:
    p, _ = proto(connected=("a", "b", "c", "d"))
    # optimistic: the targets go into rb before writing, so the receivers do not relay to each other
    w = p.message("room", {}, POSITION)
    assert [x.target for x in w] == ["a", "b", "c", "d"]
    assert json.loads(w[0].text)["rb"] == ["me", "a", "b", "c", "d"]
    # not optimistic: rb is the path only
    w = p.message("room", {}, CHAT)
    assert json.loads(w[0].text)["rb"] == ["me"]
    # a received optimistic packet that already reached b and c goes only to d
    r = p.receive(pkt(rb=["a", "b", "c"], mtype=POSITION), "a", "unreliable")
    assert [x.target for x in r.writes] == ["d"]
    assert json.loads(r.writes[0].text)["rb"] == ["a", "b", "c", "me", "d"]
    # everyone has it: nothing to write, nothing counted
    before = p.stats.total("relayed")
    r = p.receive(pkt(seq=2, rb=["a", "b", "c", "d"], mtype=POSITION), "a", "unreliable")
    assert r.delivered and not r.writes and p.stats.total("relayed") == before


def test_relevance_and_delivery() -> None:
    p, clock = proto(connected=("a", "b"))
    clock.t = 1_000_050
    data = {"positionData": {"positionX": 1.5, "positionY": 0, "positionZ": -3}}
    r = p.receive(pkt(data=data), "a", "unreliable")
    assert r.relevant and r.delivered and r.latency_ms == 50
    assert p.known["a"].position == [1.5, 0.0, -3.0]
    other = p.receive(pkt(seq=2, room="elsewhere"), "a", "unreliable")
    assert not other.relevant and not other.delivered
    assert [w.target for w in other.writes] == ["b"]  # not relevant here, still relayed
    assert p.stats.total("relevant")[0] == 1 and p.received_from == {"a": 1}
    # a message from an unknown sender (not a layer member) is delivered, its history not kept
    assert p.receive(pkt(src="x"), "a", "unreliable").delivered and "x" not in p.known


def test_ping_pong_round_trip_and_average_latency() -> None:
    me, clock = proto("me", connected=("a", "b"))
    a = PeerProtocol("a", inst=1, clock=clock)
    a.add_known("me")
    a.set_connected("me", True)
    a.rooms.add("room")
    pings = me.pings()
    assert [w.target for w in pings] == ["a", "b"] and {w.channel for w in pings} == {"reliable"}
    ping = json.loads(pings[0].text)
    assert ping["sub"] == "ping" and ping["ttl"] == 1 and ping["exp"] == -1 and ping["opt"] is False
    assert me.stats.total("sent")[0] == 2
    clock.t += 12
    got = a.receive(pings[0].text, "me", "reliable")
    assert not got.delivered and len(got.writes) == 1 and got.writes[0].target == "me"
    pong = json.loads(got.writes[0].text)
    assert pong["sub"] == "pong" and pong["pong"] == {"id": ping["ping"]["id"]} and pong["ttl"] == 1
    assert a.stats.total("sent")[0] == 1 and a.stats.total("relayed")[0] == 0  # never relayed
    clock.t += 8
    assert me.average_latency() is None
    back = me.receive(got.writes[0].text, "a", "reliable")
    assert back.rtt_ms == 20 and not back.writes
    assert me.average_latency() == 20
    me.known["b"].latency = 40
    assert me.average_latency() == 30
    assert me.snapshot()["averageLatency"] == 30


def test_stats_snapshot_math() -> None:
    stats = PeerStats(0.0)
    for _ in range(4):
        stats.add("sent", 100)
    stats.add("received", 50)
    first = stats.snapshot(2000.0)
    assert first["sent"] == 4 and first["sentTotal"] == 4 and first["sentBytes"] == 400
    assert first["sentPerSecond"] == 2.0 and first["sentBytesPerSecond"] == 200.0
    assert first["sentAveragePacketSize"] == 100.0
    assert first["relayed"] == 0 and first["relayedAveragePacketSize"] == 0.0
    stats.add("sent", 300)
    second = stats.snapshot(2500.0)
    assert second["sent"] == 1 and second["sentTotal"] == 5 and second["sentBytes"] == 300
    assert second["sentTotalBytes"] == 700 and second["sentPerSecond"] == 2.0
    assert second["sentBytesPerSecond"] == 600.0 and second["sentAveragePacketSize"] == 140.0
    assert second["received"] == 0 and second["receivedTotal"] == 1 and second["receivedPerSecond"] == 0
    assert len(second) == 49 and all(f"{f}AveragePacketSize" in second for f in FAMILIES)


def test_snapshot_values() -> None:
    p, clock = proto(connected=("a",))
    p.position = [1.0, 0.0, 2.0]
    p.receive(pkt(), "a", "unreliable")
    clock.t += 1000
    v = p.snapshot()
    assert v["connectedPeers"] == ["a"] and v["knownPeersCount"] == 2 and v["position"] == [1.0, 0.0, 2.0]
    assert v["receivedFrom"] == {"a": 1} and "averageLatency" not in v
    assert v["received"] == 1 and v["receivedPerSecond"] == 1.0


def test_known_peer_history_updates_only_for_accepted_packets() -> None:
    p, _ = proto()
    p.receive(pkt(seq=5, ts=1_000_000), "a", "unreliable")
    k = p.known["a"]
    assert (k.timestamp, k.ts_by_type["position"], k.seq_by_type["position"]) == (1_000_000, 1_000_000, 5)
    p.receive(pkt(seq=4, ts=999_000), "a", "unreliable")  # expired: no update
    assert k.seq_by_type["position"] == 5 and k.timestamp == 1_000_000
    p.receive(pkt(seq=6, ts=999_500), "a", "unreliable")  # accepted; max() keeps the latest ts
    assert k.seq_by_type["position"] == 6 and k.timestamp == 1_000_000


class FakePeer:
    def __init__(self) -> None:
        self.id = "me"
        self.room = "room"
        self.position = [0.0, 0.0, 0.0]
        self.rng = random.Random(3)
        self.state: dict[str, Any] = {}
        self.sent: list[tuple[str, dict[str, Any], Any]] = []

    def send_message(self, room: str, data: dict[str, Any], mtype: Any) -> None:
        self.sent.append((room, data, mtype))


def run(routine: Any, peer: FakePeer, ms: float, tick: float = 1000 / 60) -> None:
    elapsed = 0.0
    routine(0.0, 0.0, peer)
    while elapsed < ms:
        elapsed += tick
        routine(elapsed, tick, peer)


def test_periodic_action_fires_when_the_accumulator_exceeds_the_period() -> None:
    fired: list[float] = []
    action = PeriodicAction(100, lambda e, d, p: fired.append(e))
    for t in (50, 100, 150, 200, 250):
        action(t, 50, None)
    assert fired == [150]  # 50, 100 (not > 100), 150 > 100 -> fire, reset; 50, 100 again
    action(300, 50, None)
    assert fired == [150, 300]


def test_catalyst_sends_position_profile_and_chat_at_their_periods() -> None:
    peer = FakePeer()
    run(make_routine("catalyst", RoomOptions()), peer, 10_050)
    subs = [m.name for _, _, m in peer.sent]
    assert 85 <= subs.count("position") <= 101 and subs.count("profile") in (9, 10)
    assert subs.count("chat") == 1
    room, data, mtype = next(s for s in peer.sent if s[2].name == "chat")
    assert room == "room" and mtype.channel == "reliable" and len(data["chatData"]["text"]) == 40
    assert data["chatData"]["text"].isalnum() and len(data["chatData"]["messageId"]) == 36
    pos = next(s for s in peer.sent if s[2].name == "position")[1]
    assert set(pos["positionData"]) == {
        "positionX", "positionY", "positionZ", "rotationX", "rotationY", "rotationZ", "rotationW"
    }  # fmt: skip
    prof = next(s for s in peer.sent if s[2].name == "profile")[1]
    assert prof["profileData"] == {"userId": "me", "profileVersion": "1"} and "time" in prof
    assert peer.position == [0.0, 0.0, 0.0]


def test_silent_sends_nothing_and_walk_moves_within_the_area() -> None:
    peer = FakePeer()
    run(make_routine("silent", RoomOptions()), peer, 5000)
    assert peer.sent == []
    peer.position = [1.9, 0.0, -1.9]
    run(make_routine("walk", RoomOptions(area=2.0)), peer, 20_000)
    xs = [d["positionData"]["positionX"] for _, d, m in peer.sent if m.name == "position"]
    assert len(set(xs)) > 10 and all(-2.0 <= x <= 2.0 for x in xs)


def test_custom_routines_load_by_module_and_function() -> None:
    module = types.ModuleType("webrtc_test_routines")

    def hello(elapsed: float, delta: float, peer: Any) -> None:
        peer.send_message("room", {"n": 1}, CHAT)

    def counting(options: RoomOptions, peer: Any) -> Any:
        return PeriodicAction(1000, hello)

    counting.factory = True  # type: ignore[attr-defined]
    module.hello = hello  # type: ignore[attr-defined]
    module.counting = counting  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        opts = RoomOptions(routines={"webrtc_test_routines:hello": 1, "webrtc_test_routines:counting": 1})
        check_routines(opts)
        peer = FakePeer()
        run(make_routine("webrtc_test_routines:counting", opts, peer), peer, 3100)
        assert len(peer.sent) == 3
        names = {pick_routine(opts, random.Random(i))[0] for i in range(20)}
        assert names == {"webrtc_test_routines:hello", "webrtc_test_routines:counting"}
        with pytest.raises(ValueError, match="cannot import"):
            check_routines(RoomOptions(routines={"no_such_module_xyz:f": 1}))
        with pytest.raises(ValueError, match="is not a function"):
            make_routine("webrtc_test_routines:missing", opts)
    finally:
        del sys.modules[module.__name__]


def test_ping_type() -> None:
    assert (PING.ttl, PING.expire_ms, PING.discard_older_than, PING.optimistic) == (1, -1, -1, False)
