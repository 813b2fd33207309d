"""Several panel processes as one panel, through the Redis of the Socket.IO message queue.

Behind gunicorn with `HARNESS_MESSAGE_QUEUE=redis://…`, Flask-SocketIO's Redis manager already
delivers every emit (`tick`, `run_status`) to the clients of every process. A run, though, lives in
the process that started it. This module publishes what the queue does not carry, so that any
process answers for any process's active run:

- its state (`harness:run:<id>`: owner, status, profile, latest tick, group state and modes), written
  each second with a short expiry, so a dead owner's run stops looking active within `STATE_TTL_S`;
- its recent ticks (`harness:ticks:<id>`, capped), so a client joining on another process gets the
  same history as on the owner (pushed before each emit: a joiner may see a tick twice, never miss one;
  the page drops a tick it already has);
- stop and scale requests made on another process: published on `harness:control:<owner>`, carried
  out by the owner's listener thread, answered on `harness:reply:<request>`.

Only Redis (and Valkey) URLs give this; another queue (Kombu) still carries the emits.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from harness.errors import UsageError
from harness.store import redact_db

log = logging.getLogger(__name__)

PREFIX = "harness:"
STATE_TTL_S = 5
"""A run's state expires this long after its owner last wrote it (the owner writes it every second)."""
TICKS_TTL_S = 120
"""A run's tick list expires this long after its last tick (the owner deletes it when the run ends)."""
REPLY_TIMEOUT_S = 5.0
"""How long a forwarded stop or scale waits for the owner's answer."""
REDIS_SCHEMES = ("redis", "rediss", "valkey", "valkeys", "unix")
BACKOFF_S = 5.0
"""After a failed Redis call, the next ones are skipped this long (a run's pump must not wait on it)."""


class OwnerUnavailable(UsageError):
    """The process that owns a run did not answer a forwarded request."""


Handler = Callable[[dict[str, Any]], None]
"""Carries out one forwarded request (`op`: stop or scale); raises UsageError (or a subclass) to refuse."""


def cluster_url(message_queue: str | None) -> str | None:
    """The Redis URL of a message queue, or None when it is not Redis (or there is no queue)."""
    if not message_queue:
        return None
    scheme = message_queue.split(":", 1)[0].lower()
    return message_queue if scheme in REDIS_SCHEMES else None


class Cluster:
    """This panel process's view of the others (one per app; threads share it)."""

    def __init__(self, url: str, keep_ticks: int) -> None:
        try:
            import redis
        except ImportError:
            raise UsageError(
                "HARNESS_MESSAGE_QUEUE is a Redis URL but the redis package is missing: "
                "pip install 'harness[scale-out]'"
            ) from None
        self.url = url
        self.keep_ticks = keep_ticks
        self._redis_module = redis
        self._client: Any = None
        self._client_pid = -1
        self.me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        """This process's name on the control channel."""
        self._handler: Handler | None = None
        self._listener: threading.Thread | None = None
        self._lock = threading.Lock()
        self._written: dict[str, float] = {}
        self._down_until = 0.0

    # -- connection ------------------------------------------------------------------------
    @property
    def redis(self) -> Any:
        """A client for this process (a process forked by gunicorn gets its own)."""
        if self._client is None or self._client_pid != os.getpid():
            with self._lock:
                if self._client is None or self._client_pid != os.getpid():
                    self._client = self._redis_module.Redis.from_url(
                        self.url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2
                    )
                    self._client_pid = os.getpid()
                    self.me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
                    self._listener = None
        return self._client

    def check(self) -> bool:
        """Ping Redis once (at start): a warning, not a failure, when it cannot be reached."""
        try:
            self.redis.ping()
            return True
        except self._redis_module.RedisError as exc:
            log.warning(
                "message queue %s unreachable (%s): the live view pauses until it is back; "
                "runs go on and are stored",
                redact_db(self.url),
                exc,
            )
            return False

    # -- the owner's side ------------------------------------------------------------------
    def serve(self, handler: Handler) -> None:
        """Carry out requests forwarded to this process (started when it starts its first run)."""
        self._handler = handler
        self.redis  # noqa: B018  (a forked process gets its own client and name first)
        with self._lock:
            if self._listener is not None and self._listener.is_alive():
                return
            self._listener = threading.Thread(target=self._listen, name="panel-cluster", daemon=True)
            self._listener.start()

    def _listen(self) -> None:
        """Subscribe to this process's channel and answer each request in its own thread; a lost
        Redis is retried every second (the run goes on meanwhile), with one line when it goes and one
        when it is back."""
        lost = False
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self._channel(self.me))
                if lost:
                    log.info("panel cluster: Redis is back")
                    lost = False
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        threading.Thread(target=self._answer, args=(message["data"],), daemon=True).start()
            except self._redis_module.RedisError as exc:
                if not lost:
                    log.warning("panel cluster: Redis unavailable (%s); retrying every second", exc)
                    lost = True
                time.sleep(1.0)

    def _answer(self, data: str) -> None:
        try:
            request: dict[str, Any] = json.loads(data)
        except (TypeError, ValueError):
            return
        reply: dict[str, Any] = {"ok": True}
        try:
            if self._handler is None:
                raise UsageError("this panel process runs nothing")
            self._handler(request)
        except UsageError as exc:
            reply = {"ok": False, "kind": type(exc).__name__, "error": str(exc)}
        except Exception as exc:  # the requester gets an answer, not a timeout
            log.exception("panel cluster: request %s failed", request.get("op"))
            reply = {"ok": False, "kind": "error", "error": f"{type(exc).__name__}: {exc}"}
        key = f"{PREFIX}reply:{request.get('id')}"
        try:
            self.redis.pipeline().rpush(key, json.dumps(reply)).expire(key, 30).execute()
        except Exception:
            log.exception("panel cluster: could not answer")

    def publish_state(self, run_id: str, state: Callable[[], dict[str, Any]], force: bool = False) -> None:
        """Write an active run's state, `state()` (at most once a second unless `force`)."""
        now = time.monotonic()
        if not force and now - self._written.get(run_id, 0.0) < 1.0:
            return
        self._written[run_id] = now
        body = json.dumps({**state(), "owner": self.me, "updated": time.time()}, default=str)
        self._quiet(lambda: self.redis.set(self._state_key(run_id), body, ex=STATE_TTL_S))

    def publish_tick(self, run_id: str, tick: dict[str, Any]) -> None:
        """Append a tick to the run's capped list (call before emitting it)."""
        key = f"{PREFIX}ticks:{run_id}"

        def push() -> None:
            pipe = self.redis.pipeline()
            pipe.rpush(key, json.dumps(tick, default=str))
            pipe.ltrim(key, -self.keep_ticks, -1)
            pipe.expire(key, TICKS_TTL_S)
            pipe.execute()

        self._quiet(push)

    def forget(self, run_id: str) -> None:
        """The run has ended: remove its state and ticks."""
        self._written.pop(run_id, None)
        self._quiet(lambda: self.redis.delete(self._state_key(run_id), f"{PREFIX}ticks:{run_id}"))

    # -- every process's side --------------------------------------------------------------
    def state(self, run_id: str) -> dict[str, Any] | None:
        """Another process's active run, as last written (None: not active anywhere)."""
        body = self._quiet(lambda: self.redis.get(self._state_key(run_id)))
        if not body:
            return None
        try:
            state: dict[str, Any] = json.loads(body)
        except ValueError:
            return None
        return state

    def active_runs(self) -> dict[str, dict[str, Any]]:
        """Every process's active run: run id → state."""

        def scan() -> dict[str, dict[str, Any]]:
            keys = list(self.redis.scan_iter(match=f"{PREFIX}run:*", count=100))
            out: dict[str, dict[str, Any]] = {}
            for key, body in zip(keys, self.redis.mget(keys) if keys else [], strict=True):
                if body:
                    out[key[len(f"{PREFIX}run:") :]] = json.loads(body)
            return out

        return self._quiet(scan) or {}

    def ticks(self, run_id: str) -> list[dict[str, Any]]:
        """The run's recent ticks, oldest first."""
        rows = self._quiet(lambda: self.redis.lrange(f"{PREFIX}ticks:{run_id}", 0, -1)) or []
        return [json.loads(r) for r in rows]

    def forward(self, owner: str, request: dict[str, Any]) -> None:
        """Send a request to the owner of a run and wait for its answer; re-raise its refusal."""
        request = {**request, "id": secrets.token_hex(8)}
        client = self.redis
        try:
            if not client.publish(self._channel(owner), json.dumps(request)):
                raise OwnerUnavailable(f"run {request.get('run_id')}: the panel process running it is gone")
            answer = client.blpop([f"{PREFIX}reply:{request['id']}"], timeout=REPLY_TIMEOUT_S)
        except self._redis_module.RedisError as exc:
            raise OwnerUnavailable(
                f"run {request.get('run_id')}: the message queue is unavailable ({exc})"
            ) from None
        if answer is None:
            raise OwnerUnavailable(
                f"run {request.get('run_id')}: the panel process running it did not answer "
                f"in {REPLY_TIMEOUT_S:g} s"
            )
        reply = json.loads(answer[1])
        if not reply.get("ok"):
            raise _refusal(reply.get("kind", ""), str(reply.get("error", "refused")))

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _channel(owner: str) -> str:
        return f"{PREFIX}control:{owner}"

    @staticmethod
    def _state_key(run_id: str) -> str:
        return f"{PREFIX}run:{run_id}"

    def _quiet(self, call: Callable[[], Any]) -> Any:
        """Redis being away must not break a run or a page: log, and answer as if nothing were shared."""
        if time.monotonic() < self._down_until:
            return None
        try:
            result = call()
        except self._redis_module.RedisError as exc:
            if not self._down_until:  # one line when it goes, one when it is back
                log.warning("panel cluster: Redis unavailable (%s); retrying every %g s", exc, BACKOFF_S)
            self._down_until = time.monotonic() + BACKOFF_S
            return None
        if self._down_until:
            self._down_until = 0.0
            log.info("panel cluster: Redis is back")
        return result


def _refusal(kind: str, message: str) -> UsageError:
    """The owner's refusal as the exception the API maps to its status code."""
    from web.runs import RunConflict, RunNotFound

    classes: dict[str, type[UsageError]] = {
        "RunConflict": RunConflict,
        "RunNotFound": RunNotFound,
        "OwnerUnavailable": OwnerUnavailable,
    }
    return classes.get(kind, UsageError)(message)
