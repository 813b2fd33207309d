"""A loopback webhook listener for ACA-Py sub-wallets: basic messages, ping responses, record changes.

One `WebhookListener` per worker: an aiohttp server on 127.0.0.1 and a free port, whose `url` goes into
each sub-wallet's `wallet_webhook_urls`. ACA-Py posts `POST {url}/topic/{topic}/` with the sub-wallet in
the `x-wallet-id` header; the listener routes each post to whoever waits for it:

- `basicmessages`: a message whose content starts with an id from `message_id()` resolves the future of
  `expect_message(id, wallet_id)`; a second receipt of the same id is a duplicate, a receipt by another
  wallet is misrouted, one after its waiter gave up is late (all counted, see `on_duplicate` etc.).
- `ping` (`state: response_received`, needs the agent's `--monitor-ping`): resolves `expect_ping(thread
  id)`; a response that arrives before its waiter is registered is kept for a minute.
- anything else (`connections`, `mediation`, `out_of_band`, …): counted per topic and state, and the
  latest body per record kept, for `wait_event`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from harness.targets.runner import serve_local

MESSAGE_PREFIX = "hm-"
"""Message ids start with this; the content's first word is the id."""
_EARLY_TTL = 60.0


def message_id(tenant: str | int) -> str:
    """A unique message id: the prefix, the sender, 12 random hex digits."""
    return f"{MESSAGE_PREFIX}{tenant}-{secrets.token_hex(6)}"


def message_content(msg_id: str, size: int) -> str:
    """The content of a basic message: its id, then padding up to `size` characters."""
    content = f"{msg_id} "
    return content + "x" * max(0, size - len(content))


class WebhookListener:
    """Receive one worker's sub-wallet webhooks and hand them to the futures waiting for them."""

    def __init__(self) -> None:
        self.url = ""
        """`http://127.0.0.1:PORT` once started (the sub-wallets' webhook URL)."""
        self.topics: Counter[tuple[str, str]] = Counter()
        """Posts received by (topic, state)."""
        self.duplicates = 0
        self.misrouted = 0
        self.late = 0
        self.on_duplicate: Callable[[str], None] | None = None
        """Called with the id of a message received a second time."""
        self.on_misrouted: Callable[[str], None] | None = None
        self.on_late: Callable[[str], None] | None = None
        self._messages: dict[str, tuple[str | None, asyncio.Future[float]]] = {}
        self._received: dict[str, str | None] = {}
        """Ids received once (id → wallet), for duplicate detection."""
        self._given_up: set[str] = set()
        self._pings: dict[str, asyncio.Future[float]] = {}
        self._early_pings: dict[str, float] = {}
        self._records: dict[tuple[str, str], dict[str, Any]] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Listen on 127.0.0.1 and a free port; the base URL."""
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/topic/{topic}/", self._handle)
        app.router.add_post("/topic/{topic}", self._handle)
        self._runner, self.url = await serve_local(app)
        return self.url

    async def close(self) -> None:
        """Stop listening; pending waiters are cancelled."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        for _, future in self._messages.values():
            future.cancel()
        for future in self._pings.values():
            future.cancel()

    async def __aenter__(self) -> WebhookListener:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- waiters -----------------------------------------------------------------------------------------

    def expect_message(self, msg_id: str, wallet_id: str | None) -> asyncio.Future[float]:
        """A future resolved with the arrival time (`time.monotonic()`) of message `msg_id` at `wallet_id`."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._messages[msg_id] = (wallet_id, future)
        return future

    def forget_message(self, msg_id: str, *, late: bool = True) -> None:
        """Stop waiting for a message; with `late` (its timeout passed) a later receipt counts as late."""
        entry = self._messages.pop(msg_id, None)
        if entry is not None:
            if not entry[1].done():
                entry[1].cancel()
            if late:
                self._given_up.add(msg_id)

    def expect_ping(self, thread_id: str) -> asyncio.Future[float]:
        """A future resolved with the arrival time of the response to the trust ping `thread_id`."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        early = self._early_pings.pop(thread_id, None)
        if early is not None:
            future.set_result(early)
        else:
            self._pings[thread_id] = future
        return future

    def forget_ping(self, thread_id: str) -> None:
        """Stop waiting for a ping response."""
        future = self._pings.pop(thread_id, None)
        if future is not None and not future.done():
            future.cancel()

    def record(self, topic: str, record_id: str) -> dict[str, Any] | None:
        """The latest webhook body of a record (`connections` by `connection_id`, `mediation` by id)."""
        return self._records.get((topic, record_id))

    async def wait_event(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds after some webhook (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    return predicate()
        return True

    # --- the server --------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        topic = request.match_info["topic"]
        wallet_id = request.headers.get("x-wallet-id")
        try:
            body = await request.json()
        except ValueError:
            return web.Response(status=400, text="not JSON")
        if not isinstance(body, dict):
            body = {"body": body}
        self.topics[(topic, str(body.get("state", "")))] += 1
        if topic == "basicmessages":
            self._message(body, wallet_id, arrived)
        elif topic == "ping":
            self._ping(body, arrived)
        else:
            record_id = body.get("connection_id") if topic == "connections" else None
            record_id = record_id or body.get("mediation_id") or body.get("oob_id") or body.get("id")
            if record_id:
                self._records[(topic, str(record_id))] = body
        async with self._changed:
            self._changed.notify_all()
        return web.Response(text="ok")

    def _message(self, body: dict[str, Any], wallet_id: str | None, arrived: float) -> None:
        content = str(body.get("content") or "")
        msg_id = content.split(" ", 1)[0]
        if not msg_id.startswith(MESSAGE_PREFIX):
            return
        if msg_id in self._received:
            self.duplicates += 1
            if self.on_duplicate is not None:
                self.on_duplicate(msg_id)
            return
        self._received[msg_id] = wallet_id
        if msg_id in self._given_up:
            self._given_up.discard(msg_id)
            self.late += 1
            if self.on_late is not None:
                self.on_late(msg_id)
            return
        entry = self._messages.pop(msg_id, None)
        if entry is None:
            return
        expected_wallet, future = entry
        if expected_wallet is not None and wallet_id != expected_wallet:
            self.misrouted += 1
            if self.on_misrouted is not None:
                self.on_misrouted(msg_id)
            if not future.done():
                future.set_exception(RuntimeError("delivered to another wallet"))
            return
        if not future.done():
            future.set_result(arrived)

    def _ping(self, body: dict[str, Any], arrived: float) -> None:
        if body.get("state") != "response_received":
            return
        thread_id = str(body.get("thread_id") or "")
        future = self._pings.pop(thread_id, None)
        if future is not None:
            if not future.done():
                future.set_result(arrived)
            return
        self._early_pings[thread_id] = arrived
        stale = [t for t, at in self._early_pings.items() if arrived - at > _EARLY_TTL]
        for t in stale:
            del self._early_pings[t]
