"""Weighted (or sequential) HTTP requests from the profile, with checks, over pooled keep-alive connections.

groups:
  browse:
    simulator: http
    users: 50
    options:
      target: echo                  # a name from `targets:` (or base_url: http://127.0.0.1:8080)
      requests:
        - {name: home, url: /, weight: 5}
        - {name: search, method: POST, url: /echo, json: {q: shoes}, checks: {status: 200, contains: shoes}}
"""

from __future__ import annotations

import bisect
import itertools
import json as jsonlib
import time
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.durations import Duration
from harness.errors import UsageError
from harness.simulator import Simulator, User


class Checks(BaseModel):
    """What makes a response a success."""

    model_config = ConfigDict(extra="forbid")
    status: int | list[int] | None = None
    """Accepted status code(s); by default any status below 400."""
    contains: str | None = None
    """Text the body must contain."""
    max_latency: Duration | None = None
    """Slower responses count as failures."""


class RequestSpec(BaseModel):
    """One request the simulator may send."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str | None = None
    """How the request is named in stats; defaults to 'METHOD path'."""
    method: str = "GET"
    url: str
    """A path joined to the target's base URL, or an absolute http(s) URL."""
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    json_body: Any = Field(default=None, alias="json")
    weight: float = Field(default=1.0, gt=0)
    """Relative frequency in `weighted` order."""
    checks: Checks = Field(default_factory=Checks)

    @field_validator("method")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @model_validator(mode="after")
    def _one_body(self) -> RequestSpec:
        if self.body is not None and self.json_body is not None:
            raise ValueError("give 'body' or 'json', not both")
        return self


class HttpOptions(BaseModel):
    """Options of the `http` simulator."""

    model_config = ConfigDict(extra="forbid")
    target: str | None = None
    """Name of a profile target to send to (default: the only target)."""
    base_url: str | None = None
    """An explicit base URL instead of a target."""
    requests: list[RequestSpec] = Field(min_length=1)
    order: Literal["weighted", "sequence"] = "weighted"
    """`weighted`: one request per iteration, chosen by weight; `sequence`: all, in order."""
    timeout: Duration = Field(default=10.0, gt=0)
    """Total time allowed for one request."""
    connections: int = Field(default=1000, ge=1)
    """Pooled keep-alive connections per worker, shared by all its users."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Headers sent with every request."""


class _Prepared:
    __slots__ = ("checks", "data", "headers", "method", "name", "sent", "url")

    def __init__(self, spec: RequestSpec, base: str, common: dict[str, str]) -> None:
        path = spec.url
        self.url = (
            path if path.startswith(("http://", "https://")) else base.rstrip("/") + "/" + path.lstrip("/")
        )
        self.name = spec.name or f"{spec.method} {path}"
        self.method = spec.method
        self.headers = {**common, **spec.headers}
        if spec.json_body is not None:
            self.data: bytes | None = jsonlib.dumps(spec.json_body).encode()
            self.headers.setdefault("Content-Type", "application/json")
        else:
            self.data = spec.body.encode() if spec.body is not None else None
        self.checks = spec.checks
        self.sent = len(self.data or b"")


class HttpSimulator(Simulator):
    """Generic HTTP load: weighted or sequential requests with status, body and latency checks."""

    name = "http"
    description = "Generic HTTP requests with weights and checks (aiohttp, pooled keep-alive)."
    Options = HttpOptions
    options: HttpOptions

    @classmethod
    def check_profile(cls, options: HttpOptions, profile: Any) -> None:
        if options.base_url is not None:
            if options.target is not None:
                raise ValueError("give 'target' or 'base_url', not both")
            return
        names = sorted(profile.targets)
        if options.target is not None and options.target not in profile.targets:
            raise ValueError(f"target {options.target!r} is not in the profile's targets {names}")
        if options.target is None and len(names) != 1:
            raise ValueError(
                f"name the target to send to ('target: NAME', one of {names}) or give 'base_url'"
            )

    async def setup(self) -> None:
        base = self.options.base_url or self.ctx.target_url(self.options.target)
        if not base.startswith(("http://", "https://")):
            raise UsageError(f"group {self.ctx.group!r}: base URL must be http(s), got {base!r}")
        self.requests = [_Prepared(spec, base, self.options.headers) for spec in self.options.requests]
        self.cum_weights = list(itertools.accumulate(spec.weight for spec in self.options.requests))
        connector = aiohttp.TCPConnector(limit=self.options.connections, limit_per_host=0, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.options.timeout),
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "harness"},
        )

    async def iteration(self, user: User) -> None:
        if self.options.order == "sequence":
            for request in self.requests:
                await self.send(request)
        else:
            index = bisect.bisect(self.cum_weights, self.ctx.rng.random() * self.cum_weights[-1])
            await self.send(self.requests[min(index, len(self.requests) - 1)])

    async def send(self, request: _Prepared) -> None:
        """Send one request and record it."""
        error: str | BaseException | None = None
        received = 0
        start = time.perf_counter()
        try:
            async with self.session.request(
                request.method, request.url, headers=request.headers, data=request.data
            ) as response:
                body = await response.read()
                received = len(body)
                status = response.status
            latency = time.perf_counter() - start
            checks = request.checks
            if checks.status is None:
                if status >= 400:
                    error = f"HTTP {status}"
            elif status not in (checks.status if isinstance(checks.status, list) else [checks.status]):
                error = f"HTTP {status} (expected {checks.status})"
            if error is None and checks.contains is not None and checks.contains.encode() not in body:
                error = f"body does not contain {checks.contains!r}"
            if error is None and checks.max_latency is not None and latency > checks.max_latency:
                error = f"slower than {checks.max_latency * 1000:.0f} ms"
        except TimeoutError:
            latency = time.perf_counter() - start
            error = f"timeout after {self.options.timeout:g}s"
        except aiohttp.ClientError as exc:
            latency = time.perf_counter() - start
            error = exc
        self.metrics.request(
            request.name,
            latency,
            kind="http",
            ok=error is None,
            error=error,
            bytes_sent=request.sent,
            bytes_received=received,
        )

    async def teardown(self) -> None:
        session = getattr(self, "session", None)
        if session is not None:
            await session.close()
