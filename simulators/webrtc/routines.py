"""What a peer does on each tick: the built-in routines and loading custom ones.

A routine is a callable `(elapsed_ms, delta_ms, peer) -> None`, run on every tick (about 60 Hz) while
the peer runs; `elapsed_ms` counts from the peer's first tick (itself delayed by U[0, start_jitter)),
`delta_ms` is the time since its previous tick (0 on the first). A routine sends through
`peer.send_message(room, data, mtype)` and may move `peer.position`; per-peer state goes in
`peer.state` (a dict). Built-ins, by name (the same in the browser client):

- `catalyst` (default): the original's `runLoops`: position every 100 ms (`unreliable("position")`),
  profile every 1 s (`unreliable("profile")`), chat every 10 s (`reliable("chat")`); the periods come
  from the group's options (`position_every`, `profile_every`, `chat_every`)
- `silent`: sends nothing (the peer still relays, pings and reports)
- `walk`: `catalyst`, but the position moves: ±0.5 on x and z per position message, kept in the area

A custom routine is named `package.module:function`; the function is the routine itself, or, when it
has a truthy attribute `factory`, is called once per peer as `function(options, peer)` and returns it.
"""

from __future__ import annotations

import importlib
import random
import string
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from simulators.webrtc.common import BUILTIN_ROUTINES, RoomOptions
from simulators.webrtc.protocol import MessageType, now_ms, reliable, unreliable

Routine = Callable[[float, float, Any], None]
"""`(elapsed_ms, delta_ms, peer) -> None`."""

POSITION = unreliable("position")
PROFILE = unreliable("profile")
CHAT = reliable("chat")
_ALPHANUMERIC = string.ascii_letters + string.digits


class RoutinePeer(Protocol):
    """What a routine may use of its peer."""

    id: str
    room: str
    position: list[float]
    rng: random.Random
    state: dict[str, Any]

    def send_message(self, room: str, data: dict[str, Any], mtype: MessageType) -> None:
        """Send a message to a room the peer joined."""


class PeriodicAction:
    """Runs `action(elapsed_ms, delta_ms, peer)` when the accumulated delta exceeds `period_ms`, then
    resets the accumulator to 0 (the original's PeriodicAction)."""

    __slots__ = ("accumulated", "action", "period_ms")

    def __init__(self, period_ms: float, action: Routine) -> None:
        self.period_ms = period_ms
        self.action = action
        self.accumulated = 0.0

    def __call__(self, elapsed_ms: float, delta_ms: float, peer: Any) -> None:
        self.accumulated += delta_ms
        if self.accumulated > self.period_ms:
            self.accumulated = 0.0
            self.action(elapsed_ms, delta_ms, peer)


def position_data(peer: RoutinePeer) -> dict[str, Any]:
    """A position message's data: `{"time", "positionData": {positionX..Z, rotationX..W}}`."""
    x, y, z = peer.position
    return {
        "time": int(now_ms()),
        "positionData": {
            "positionX": x,
            "positionY": y,
            "positionZ": z,
            "rotationX": 0,
            "rotationY": 0,
            "rotationZ": 0,
            "rotationW": 0,
        },
    }


def profile_data(peer: RoutinePeer) -> dict[str, Any]:
    """A profile message's data: `{"time", "profileData": {"userId", "profileVersion": "1"}}`."""
    return {"time": int(now_ms()), "profileData": {"userId": peer.id, "profileVersion": "1"}}


def chat_data(peer: RoutinePeer) -> dict[str, Any]:
    """A chat message's data: `{"time", "chatData": {"messageId": uuid4, "text": 40 random [A-Za-z0-9]}}`."""
    rng = peer.rng
    message_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    text = "".join(rng.choice(_ALPHANUMERIC) for _ in range(40))
    return {"time": int(now_ms()), "chatData": {"messageId": message_id, "text": text}}


class Sequence:
    """Several routines run in order on each tick."""

    __slots__ = ("parts",)

    def __init__(self, *parts: Routine) -> None:
        self.parts = parts

    def __call__(self, elapsed_ms: float, delta_ms: float, peer: Any) -> None:
        for part in self.parts:
            part(elapsed_ms, delta_ms, peer)


def catalyst(options: RoomOptions, walk_area: float | None = None) -> Routine:
    """The original's routine: position, profile and chat loops; with `walk_area`, a random walk."""

    def position(elapsed: float, delta: float, peer: RoutinePeer) -> None:
        if walk_area is not None:
            p = peer.position
            p[0] = min(walk_area, max(-walk_area, p[0] + peer.rng.uniform(-0.5, 0.5)))
            p[2] = min(walk_area, max(-walk_area, p[2] + peer.rng.uniform(-0.5, 0.5)))
        peer.send_message(peer.room, position_data(peer), POSITION)

    def profile(elapsed: float, delta: float, peer: RoutinePeer) -> None:
        peer.send_message(peer.room, profile_data(peer), PROFILE)

    def chat(elapsed: float, delta: float, peer: RoutinePeer) -> None:
        peer.send_message(peer.room, chat_data(peer), CHAT)

    return Sequence(
        PeriodicAction(options.position_every * 1000.0, position),
        PeriodicAction(options.profile_every * 1000.0, profile),
        PeriodicAction(options.chat_every * 1000.0, chat),
    )


def silent(elapsed_ms: float, delta_ms: float, peer: Any) -> None:
    """Sends nothing."""


def load_routine(spec: str) -> Callable[..., Any]:
    """The callable a `package.module:function` names; ValueError with the reason if it cannot."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"routine {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"routine {spec!r}: cannot import {module_name!r}: {exc}") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"routine {spec!r}: {attr!r} is not a function of {module_name!r}")
    return func


def make_routine(name: str, options: RoomOptions, peer: Any = None) -> Routine:
    """A fresh routine instance for one peer."""
    if name == "catalyst":
        return catalyst(options)
    if name == "walk":
        return catalyst(options, walk_area=options.area)
    if name == "silent":
        return silent
    if name in BUILTIN_ROUTINES:  # pragma: no cover - a built-in added to common without a routine here
        raise ValueError(f"routine {name!r} has no aiortc implementation")
    func = load_routine(name)
    if getattr(func, "factory", False):
        routine = func(options, peer)
        if not callable(routine):
            raise ValueError(f"routine {name!r}: its factory returned {type(routine).__name__}")
        return routine
    return func


def pick_routine(options: RoomOptions, rng: random.Random, peer: Any = None) -> tuple[str, Routine]:
    """One peer's routine, drawn by the options' weights: its name and a fresh instance."""
    name = options.pick_routine(rng)
    return name, make_routine(name, options, peer)


def check_routines(options: RoomOptions) -> None:
    """Import every custom routine the options name (ValueError if one cannot be loaded)."""
    for name in options.routines:
        if name not in BUILTIN_ROUTINES:
            load_routine(name)
