"""Helpers for the LLM Engine simulator tests: the real `llm_engine` app on 127.0.0.1, recording
every request it receives (time, method, path, query, content type, body), in the test's own loop."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import BaseModel

from harness.metrics import Metrics
from harness.simulator import SimulatorContext
from harness.targets.llm_engine import LlmEngineConfig, build_app


@dataclass
class Seen:
    """One request the engine received."""

    t: float
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    raw: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.raw.decode()))


@asynccontextmanager
async def engine(**config: Any) -> AsyncIterator[tuple[str, list[Seen]]]:
    """The engine's base URL and the list its requests are recorded into."""
    app = build_app(LlmEngineConfig.model_validate({"seed": 1, **config}))
    seen: list[Seen] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        seen.append(
            Seen(
                time.perf_counter(),
                request.method,
                request.path,
                dict(request.query),
                request.content_type,
                raw,
                dict(request.headers),
            )
        )
        return await handler(request)

    app.middlewares.insert(0, record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), seen
    finally:
        await server.close()


def make_ctx(
    options: BaseModel, url: str, metrics: Metrics, prepared: Any = None, run_id: str = "t1", workers: int = 1
) -> SimulatorContext:
    """A context for worker 0 of one group, the engine as its only target `llm`."""
    return SimulatorContext(
        run_id=run_id,
        group="g",
        worker_index=0,
        workers=workers,
        options=options,
        targets={"llm": url},
        metrics=metrics,
        log=logging.getLogger("test"),
        rng=random.Random(1),
        run_dir=Path("."),
        prepared=prepared,
    )


def merged(drained: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Windows from several drains, summed by name (count, failures, errors)."""
    out: dict[str, dict[str, Any]] = {}
    for d in drained:
        for w in d["windows"]:
            m = out.setdefault(w["name"], {"count": 0, "failures": 0, "errors": {}, "hists": []})
            m["count"] += w["count"]
            m["failures"] += w["failures"]
            m["hists"].append(w["hist"])
            for k, v in w["errors"].items():
                m["errors"][k] = m["errors"].get(k, 0) + v
    return out


def counters(drained: list[dict[str, Any]]) -> dict[str, float]:
    """Counter totals over several drains."""
    out: dict[str, float] = {}
    for d in drained:
        for m in d["metrics"]:
            if m["type"] == "counter":
                out[m["name"]] = out.get(m["name"], 0.0) + m["value"]
    return out
