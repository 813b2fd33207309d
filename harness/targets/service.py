"""The service model shared by embedded targets: a bounded worker pool in front of a slow backend.

A request first waits, in FIFO order, for one of `concurrency` workers; at most `queue_limit` may
wait, and one that waits longer than `timeout` gives up. Those turned away get 503 at once, as from
an overloaded proxy. A request that gets a worker holds it for a sampled service time (an
`asyncio.sleep`: it models a remote backend, not CPU), may then be failed with 500 at `error_rate`,
and otherwise runs its route handler while still holding the worker.

So with concurrency C and mean service time S, throughput caps at C/S; beyond that the queue fills,
latency rises with the queue length, and then 503s appear: what a saturated real service does.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ConfigDict, Field

from harness.distributions import Distribution
from harness.durations import Duration

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ServiceModelConfig(BaseModel):
    """How an embedded target behaves under load."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(default=8, ge=1)
    """How many requests are being served at once: the number of backend workers."""

    service_time: Distribution = Field(default=0.005, validate_default=True)
    """How long a worker is busy with one request, in seconds (a number, `20ms` or a distribution)."""

    queue_limit: int = Field(default=64, ge=0)
    """How many requests may wait for a free worker; any beyond this get 503 at once."""

    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """The fraction of served requests answered with 500 instead of the route's response."""

    timeout: Duration | None = None
    """How long a request may wait for a worker before it gets 503; none means for ever."""


class Refused(Exception):
    """A request the service model answers itself: 503 when overloaded, 500 for an injected failure."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class ServiceModel:
    """A FIFO worker pool with a service-time distribution, an error rate and counters."""

    def __init__(self, config: ServiceModelConfig, seed: int | None = None) -> None:
        self.config = config
        self.rng = random.Random(seed)
        self._free = config.concurrency
        # Our own FIFO of waiters rather than asyncio.Semaphore: we need the exact queue length for
        # queue_limit, and strict arrival order so that queueing delay grows the way it should.
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.served = 0
        self.rejected = 0
        self.timed_out = 0
        self.errors = 0
        self.in_service = 0
        self.peak_queued = 0

    @property
    def queued(self) -> int:
        """How many requests are waiting for a worker now."""
        return len(self._waiters)

    def stats(self) -> dict[str, Any]:
        """The counters as a JSON-ready dict (what `GET /_stats` returns)."""
        return {
            "concurrency": self.config.concurrency,
            "queue_limit": self.config.queue_limit,
            "in_service": self.in_service,
            "queued": self.queued,
            "peak_queued": self.peak_queued,
            "served": self.served,
            "rejected": self.rejected,
            "timed_out": self.timed_out,
            "errors": self.errors,
        }

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[None]:
        """Hold a worker for one request: wait, work for a service time, maybe fail; raises `Refused`."""
        await self._acquire()
        self.in_service += 1
        try:
            await asyncio.sleep(self.config.service_time.sample(self.rng))
            # random() < 1.0 always holds and < 0.0 never does, so the edges need no special case.
            if self.rng.random() < self.config.error_rate:
                self.errors += 1
                raise Refused(500, "injected failure (error_rate)")
            self.served += 1
            yield
        finally:
            self.in_service -= 1
            self._release()

    async def _acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self.config.queue_limit:
            self.rejected += 1
            raise Refused(503, f"overloaded: {self.config.queue_limit} requests already waiting")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self.peak_queued = max(self.peak_queued, len(self._waiters))
        try:
            async with asyncio.timeout(self.config.timeout):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled():
                # A worker was handed to us just as we gave up: pass it on rather than leak it.
                self._release()
            elif future in self._waiters:
                self._waiters.remove(future)
            if isinstance(exc, TimeoutError):
                self.rejected += 1
                self.timed_out += 1
                raise Refused(503, f"timed out after {self.config.timeout}s waiting for a worker") from None
            raise

    def _release(self) -> None:
        # Hand the worker straight to the oldest waiter so that a newcomer cannot overtake it.
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        self._free += 1


SERVICE_MODEL = web.AppKey("service_model", ServiceModel)
"""Where `instrument` stores a target's `ServiceModel` on its application."""


def service_middleware(
    model: ServiceModel, exempt_paths: Iterable[str] = ("/health", "/_stats")
) -> Middleware:
    """An aiohttp middleware sending every request, except to `exempt_paths`, through `model`."""
    exempt = frozenset(exempt_paths)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in exempt:
            return await handler(request)
        try:
            async with model.serve():
                return await handler(request)
        except Refused as exc:
            return web.json_response({"error": exc.reason}, status=exc.status)

    return middleware


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE_MODEL].stats())


def instrument(
    app: web.Application, model: ServiceModel, health_path: str = "/health", stats_path: str = "/_stats"
) -> None:
    """Put `model` in front of every route of `app` and add the exempt health and stats routes."""
    app[SERVICE_MODEL] = model
    app.middlewares.append(service_middleware(model, (health_path, stats_path)))
    app.router.add_get(health_path, _health)
    app.router.add_get(stats_path, _stats)
