"""The `echo` target: a small httpbin-like HTTP service behind the service model.

Routes: `GET /health` and `GET /_stats` (exempt from the service model), `GET /` ("ok"),
`ANY /echo`, `ANY /status/{code}`, `ANY /delay/{ms}`, `GET /bytes/{n}` and `GET /json`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from harness.targets.service import ServiceModel, ServiceModelConfig, instrument

MAX_BYTES = 10 * 1024 * 1024
MAX_DELAY_MS = 60_000
_PATTERN = bytes(range(256))


class EchoConfig(ServiceModelConfig):
    """The configuration of the `echo` target."""

    seed: int | None = None
    """Seeds the service-time and error sampling, for a reproducible run; none means random."""


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def _root(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    if body:
        content_type = request.headers.get("Content-Type", "application/octet-stream")
        return web.Response(body=body, headers={"Content-Type": content_type})
    query: dict[str, Any] = {}
    for key in request.query:
        values = request.query.getall(key)
        query[key] = values[0] if len(values) == 1 else values
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": query,
            "headers": dict(request.headers),
        }
    )


async def _status(request: web.Request) -> web.Response:
    try:
        code = int(request.match_info["code"])
    except ValueError:
        return _bad_request("status must be an integer")
    # 1xx are not final responses, so aiohttp cannot send one as the answer.
    if not 200 <= code <= 599:
        return _bad_request("status must be between 200 and 599")
    return web.Response(status=code)


async def _delay(request: web.Request) -> web.Response:
    try:
        ms = float(request.match_info["ms"])
    except ValueError:
        return _bad_request("delay must be a number of milliseconds")
    if not 0 <= ms <= MAX_DELAY_MS:
        return _bad_request(f"delay must be between 0 and {MAX_DELAY_MS} ms")
    await asyncio.sleep(ms / 1000)
    return web.json_response({"delay_ms": ms})


async def _bytes(request: web.Request) -> web.Response:
    try:
        n = int(request.match_info["n"])
    except ValueError:
        return _bad_request("n must be an integer")
    if not 0 <= n <= MAX_BYTES:
        return _bad_request(f"n must be between 0 and {MAX_BYTES}")
    repeats, rest = divmod(n, len(_PATTERN))
    return web.Response(body=_PATTERN * repeats + _PATTERN[:rest], content_type="application/octet-stream")


async def _json(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "id": 42,
            "name": "echo",
            "tags": ["reference", "target"],
            "active": True,
            "score": 0.5,
            "owner": {"name": "harness", "email": None},
        }
    )


def build_app(config: EchoConfig) -> web.Application:
    """The echo application, with `config`'s service model in front of every route but health and stats."""
    app = web.Application()
    instrument(app, ServiceModel(config, seed=config.seed))
    app.router.add_get("/", _root)
    app.router.add_route("*", "/echo", _echo)
    app.router.add_route("*", "/status/{code}", _status)
    app.router.add_route("*", "/delay/{ms}", _delay)
    app.router.add_get("/bytes/{n}", _bytes)
    app.router.add_get("/json", _json)
    return app
