"""Weighted (or sequential) HTTP requests from the profile, with checks, over pooled keep-alive connections.

http:// requests go through `simulators.http.client.FastClient` (requests encoded once, httptools
parsing, a few µs per request); https:// URLs, and every URL with `client: aiohttp`, go through
aiohttp, which also follows redirects, keeps cookies and decodes gzip (FastClient does none of these).

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
from harness.simulator import Simulator, User, check_target_choice
from simulators.http.client import ClientError, FastClient, PreparedRequest


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
    client: Literal["fast", "aiohttp"] = "fast"
    """`fast`: harness's lean HTTP/1.1 client for http:// URLs (several times cheaper per request;
    no redirects, cookies or gzip decoding); `aiohttp`: aiohttp for every URL. https:// URLs always
    use aiohttp."""


USER_AGENT = "harness"


class _Prepared:
    """One request spec, resolved once: URL, body, encoded request (fast path) and checks."""

    __slots__ = (
        "contains",
        "data",
        "expected",
        "fast",
        "headers",
        "max_latency",
        "method",
        "name",
        "needle",
        "sent",
        "status",
        "url",
    )

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
            if not any(name.lower() == "content-type" for name in self.headers):
                self.headers["Content-Type"] = "application/json"
        else:
            self.data = spec.body.encode() if spec.body is not None else None
        self.sent = len(self.data or b"")
        self.fast: PreparedRequest | None = None
        """Set when the request goes through FastClient."""
        # The checks, in the form the hot path tests them (no per-response conversions).
        checks = spec.checks
        self.status = checks.status
        self.expected: frozenset[int] | None = (
            None
            if checks.status is None
            else frozenset(checks.status if isinstance(checks.status, list) else [checks.status])
        )
        self.contains = checks.contains
        self.needle = checks.contains.encode() if checks.contains is not None else None
        self.max_latency = checks.max_latency


class HttpSimulator(Simulator):
    """Generic HTTP load: weighted or sequential requests with status, body and latency checks."""

    name = "http"
    description = "Generic HTTP requests with weights and checks (pooled keep-alive; aiohttp for https)."
    Options = HttpOptions
    options: HttpOptions

    @classmethod
    def check_profile(cls, options: HttpOptions, profile: Any) -> None:
        check_target_choice(profile, options.target, options.base_url, "base_url")

    async def setup(self) -> None:
        base = self.options.base_url or self.ctx.target_url(self.options.target)
        if not base.startswith(("http://", "https://")):
            raise UsageError(f"group {self.ctx.group!r}: base URL must be http(s), got {base!r}")
        options = self.options
        self.requests = [_Prepared(spec, base, options.headers) for spec in options.requests]
        self.cum_weights = list(itertools.accumulate(spec.weight for spec in options.requests))
        self.timeout_message = f"timeout after {options.timeout:g}s"
        self.fast: FastClient | None = None
        self.session: aiohttp.ClientSession | None = None
        if options.client == "fast" and any(r.url.startswith("http://") for r in self.requests):
            self.fast = FastClient(options.connections, options.timeout, {"User-Agent": USER_AGENT})
            for request in self.requests:
                if request.url.startswith("http://"):
                    try:
                        request.fast = self.fast.prepare(
                            request.method, request.url, request.headers, request.data
                        )
                    except ValueError as exc:
                        raise UsageError(
                            f"group {self.ctx.group!r}: request {request.name!r}: {exc}"
                        ) from None
        if any(r.fast is None for r in self.requests):
            connector = aiohttp.TCPConnector(limit=options.connections, limit_per_host=0, ttl_dns_cache=300)
            self.session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=options.timeout),
                skip_auto_headers=("User-Agent",),
                headers={"User-Agent": USER_AGENT},
            )

    async def iteration(self, user: User) -> None:
        if self.options.order == "sequence":
            for request in self.requests:
                await self.send(request)
        elif len(self.requests) == 1:
            await self.send(self.requests[0])
        else:
            index = bisect.bisect(self.cum_weights, self.ctx.rng.random() * self.cum_weights[-1])
            await self.send(self.requests[min(index, len(self.requests) - 1)])

    async def send(self, request: _Prepared) -> None:
        """Send one request and record it; the latency includes waiting for a pooled connection."""
        error: str | BaseException | None = None
        received = 0
        start = time.perf_counter()
        try:
            if request.fast is not None:
                response = await request.fast.pool.client.send(request.fast)
                body = response.body
                status = response.status
            else:
                assert self.session is not None
                async with self.session.request(
                    request.method, request.url, headers=request.headers, data=request.data
                ) as aio_response:
                    body = await aio_response.read()
                    status = aio_response.status
            latency = time.perf_counter() - start
            received = len(body)
            if request.expected is None:
                if status >= 400:
                    error = f"HTTP {status}"
            elif status not in request.expected:
                error = f"HTTP {status} (expected {request.status})"
            if error is None:
                if request.needle is not None and request.needle not in body:
                    error = f"body does not contain {request.contains!r}"
                elif request.max_latency is not None and latency > request.max_latency:
                    error = f"slower than {request.max_latency * 1000:.0f} ms"
        except TimeoutError:  # FastClient's RequestTimeout and aiohttp's timeouts alike
            latency = time.perf_counter() - start
            error = self.timeout_message
        except (ClientError, aiohttp.ClientError, OSError) as exc:
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
        fast = getattr(self, "fast", None)
        if fast is not None:
            await fast.close()
        session = getattr(self, "session", None)
        if session is not None:
            await session.close()
