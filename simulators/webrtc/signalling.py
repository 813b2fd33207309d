"""The lighthouse client: REST for layers and rooms, the `/signal` WebSocket for offers and answers.

The wire protocol is the `lighthouse` target's (harness/targets/lighthouse.py). A user is
`{"userId", "peerId"}`; aiortc peers use their peer id as user id. Errors come out as
`LighthouseError` with a one-line message (the URL, the status, the lighthouse's `status` field), fit
for a failure record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

log = logging.getLogger(__name__)

SIGNAL_TYPES = ("OFFER", "ANSWER", "CANDIDATE", "REJECT", "LEAVE")
"""Peer-to-peer messages the lighthouse relays."""
LIGHTHOUSE_SRC = "__lighthouse__"
"""The `src` of the lighthouse's own notifications."""


class LighthouseError(Exception):
    """A lighthouse call that failed; the message is one line."""


def describe(exc: BaseException) -> str:
    """A one-line reason for a failed lighthouse call."""
    if isinstance(exc, LighthouseError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _q(part: str) -> str:
    return quote(part, safe="")


class Signal:
    """One peer's open `/signal` socket: `send` messages, incoming ones go to the handler in order."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        peer_id: str,
        handler: Callable[[dict[str, Any]], None],
        opened: dict[str, Any],
    ) -> None:
        self.ws = ws
        self.peer_id = peer_id
        self.handler = handler
        self.opened = opened
        """The OPEN payload: `{"maxConnections", "minConnections"}`."""
        self.closed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    message = json.loads(msg.data)
                except ValueError:
                    log.debug("%s: a signal that is not JSON: %.100s", self.peer_id, msg.data)
                    continue
                if not isinstance(message, dict):
                    continue
                try:
                    self.handler(message)
                except Exception as exc:  # a handler bug must not kill the socket
                    log.warning(
                        "%s: handling %s failed: %s", self.peer_id, message.get("type"), describe(exc)
                    )
        except (aiohttp.ClientError, ConnectionError) as exc:
            log.debug("%s: signal socket failed: %s", self.peer_id, describe(exc))
        finally:
            self.closed.set()

    def send(self, type_: str, dst: str, payload: dict[str, Any] | None = None) -> bool:
        """Queue `{"type", "dst", "payload"}` for the lighthouse; False if the socket is closed."""
        if self.ws.closed:
            return False
        message = {"type": type_, "dst": dst, "payload": payload or {}}
        task = asyncio.get_running_loop().create_task(self._send(message))
        _pending.add(task)
        task.add_done_callback(_pending.discard)
        return True

    async def send_wait(self, type_: str, dst: str, payload: dict[str, Any] | None = None) -> None:
        """Send a message now (errors are logged, not raised)."""
        if not self.ws.closed:
            await self._send({"type": type_, "dst": dst, "payload": payload or {}})

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await self.ws.send_str(json.dumps(message, separators=(",", ":")))
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            log.debug("%s: sending %s failed: %s", self.peer_id, message["type"], describe(exc))

    async def close(self) -> None:
        """Close the socket and stop reading."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2.0)
        if not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


_pending: set[asyncio.Task[None]] = set()
"""Sends in flight (kept referenced until done)."""


class LighthouseClient:
    """REST and signalling calls to one lighthouse, over a shared aiohttp session."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout = timeout

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path
        try:
            async with self.session.request(
                method, url, json=body, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as resp:
                text = await resp.text()
                try:
                    data = json.loads(text) if text else None
                except ValueError:
                    data = None
                if resp.status >= 400:
                    detail = data.get("status") if isinstance(data, dict) else None
                    if not detail and text.strip():
                        detail = text.strip().splitlines()[0][:120]
                    suffix = f" {detail}" if detail else ""
                    raise LighthouseError(f"{method} {path}: HTTP {resp.status}{suffix}")
                return data
        except LighthouseError:
            raise
        except TimeoutError:
            raise LighthouseError(
                f"{method} {path}: no answer from the lighthouse within {self.timeout:g}s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise LighthouseError(f"lighthouse {self.base_url} unreachable: {describe(exc)}") from None

    async def status(self) -> dict[str, Any]:
        """`GET /status`."""
        data = await self._call("GET", "/status")
        return data if isinstance(data, dict) else {}

    async def join_layer(self, layer: str, peer_id: str, user_id: str | None = None) -> list[dict[str, str]]:
        """`PUT /layers/{layer}`: the layer's users, self included."""
        body = {"userId": user_id or peer_id, "peerId": peer_id, "protocolVersion": 5}
        return _user_list(await self._call("PUT", f"/layers/{_q(layer)}", body))

    async def join_room(
        self, layer: str, room: str, peer_id: str, user_id: str | None = None
    ) -> list[dict[str, str]]:
        """`PUT /layers/{layer}/rooms/{room}`: the room's users, self included."""
        body = {"userId": user_id or peer_id, "peerId": peer_id}
        return _user_list(await self._call("PUT", f"/layers/{_q(layer)}/rooms/{_q(room)}", body))

    async def leave_room(self, layer: str, room: str, user_id: str) -> None:
        """`DELETE /layers/{layer}/rooms/{room}/users/{userId}`."""
        await self._call("DELETE", f"/layers/{_q(layer)}/rooms/{_q(room)}/users/{_q(user_id)}")

    async def leave_layer(self, layer: str, user_id: str) -> None:
        """`DELETE /layers/{layer}/users/{userId}`."""
        await self._call("DELETE", f"/layers/{_q(layer)}/users/{_q(user_id)}")

    async def open_signal(
        self, peer_id: str, handler: Callable[[dict[str, Any]], None], timeout: float | None = None
    ) -> Signal:
        """Open `/signal?id=peer_id` and wait for OPEN; messages after it go to `handler`."""
        timeout = self.timeout if timeout is None else timeout
        url = f"{self.base_url}/signal"
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            ws = await asyncio.wait_for(
                self.session.ws_connect(url, params={"id": peer_id}, autoping=True, max_msg_size=0), timeout
            )
            msg = await ws.receive(timeout=timeout)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise LighthouseError(f"signal socket closed before OPEN ({msg.type.name})")
            first = json.loads(msg.data)
            if first.get("type") == "ID-TAKEN":
                raise LighthouseError(f"peer id {peer_id} already has a signal socket (ID-TAKEN)")
            if first.get("type") != "OPEN":
                raise LighthouseError(f"expected OPEN on the signal socket, got {first.get('type')!r}")
        except LighthouseError:
            if ws is not None:
                await ws.close()
            raise
        except TimeoutError:
            if ws is not None:
                await ws.close()
            raise LighthouseError(f"signal socket: no OPEN from the lighthouse within {timeout:g}s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if ws is not None:
                await ws.close()
            raise LighthouseError(f"lighthouse {self.base_url} unreachable: {describe(exc)}") from None
        payload = first.get("payload") if isinstance(first.get("payload"), dict) else {}
        return Signal(ws, peer_id, handler, payload)


def _user_list(data: Any) -> list[dict[str, str]]:
    if not isinstance(data, list):
        return []
    return [u for u in data if isinstance(u, dict) and isinstance(u.get("peerId"), str)]
