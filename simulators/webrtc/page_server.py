"""What a `webrtc-browser` worker serves its browsers: the client page and a results API for its run.

One aiohttp server per worker, on 127.0.0.1 and a free port, in the worker's event loop:

- `GET /` (and `/index.html`) and `GET /peer.js`: the browser client (`client/`), never cached;
- the original results server's routes (`harness.targets.results.add_results_routes`) over a
  `RunBackend` whose one test is the harness run (its id is the page's `testId`, already started).

Each metrics PUT becomes the peer's data point (through `common.PeerReporter`, as aiortc peers'): the page's
`deliveries` extension (`{"position": [ms, ...], ...}`, first receipts since the last PUT) is taken out
and recorded as `deliver {sub}` requests (kind `webrtc`), and the browser's latest memory reading
(`memoryMB`, PSS of its processes) is added. With `influx_url`, every data point is also written to
InfluxDB in the original's line layout.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from harness.metrics import Metrics
from harness.targets.results import RunBackend, add_results_routes
from harness.targets.runner import serve_local
from simulators.webrtc.common import PeerReporter

CLIENT_DIR = Path(__file__).resolve().parent / "client"
"""The browser client's files (`index.html`, `peer.js`)."""
KIND = "webrtc"
MAX_DELIVERIES_PER_POINT = 20_000
"""At most this many delivery latencies are taken from one data point (the page caps them too)."""
NO_CACHE = {"Cache-Control": "no-store"}

log = logging.getLogger(__name__)


class PageServer:
    """The client page and the run's results API for one worker's browsers."""

    def __init__(
        self,
        metrics: Metrics,
        test_id: str,
        *,
        started_ms: int | None = None,
        influx_url: str | None = None,
    ) -> None:
        self.metrics = metrics
        self.test_id = test_id
        self.memory_mb: dict[str, float] = {}
        """Latest memory reading (MB) of each peer's browser, added to its data points as `memoryMB`."""
        self.points = 0
        """Metrics PUTs turned into data points so far."""
        self.backend = RunBackend(
            test_id, int(time.time() * 1000) if started_ms is None else started_ms, self.on_metrics
        )
        self.reporter = PeerReporter(metrics, test_id, influx_url, logging.getLogger(__name__))
        self._runner: web.AppRunner | None = None
        self.url = ""
        """The server's base URL (`http://127.0.0.1:PORT`) once started."""

    def build_app(self) -> web.Application:
        """The app: client files plus the results routes."""
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_get("/", self._file("index.html"))
        app.router.add_get("/index.html", self._file("index.html"))
        app.router.add_get("/peer.js", self._file("peer.js"))
        app.router.add_get("/favicon.ico", _no_icon)
        add_results_routes(app, self.backend)
        return app

    @staticmethod
    def _file(name: str) -> Any:
        path = CLIENT_DIR / name

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(path, headers=NO_CACHE)

        return handler

    async def start(self) -> str:
        """Listen on 127.0.0.1 and a free port; returns the base URL."""
        self._runner, self.url = await serve_local(self.build_app())
        return self.url

    async def close(self) -> None:
        """Stop serving (the results backend and the Influx writer close with the app)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await self.reporter.close()

    def page_url(self, params: dict[str, Any]) -> str:
        """The client page's URL with these query parameters (None values left out)."""
        query = {k: _param(v) for k, v in params.items() if v is not None}
        return f"{self.url}/?{urlencode(query)}"

    def on_metrics(self, peer_id: str, metrics: dict[str, Any], t: float) -> None:
        """A metrics PUT: deliveries → `deliver {sub}` requests; the rest (+ `memoryMB`) → a data point."""
        deliveries = metrics.pop("deliveries", None)
        if isinstance(deliveries, dict):
            budget = MAX_DELIVERIES_PER_POINT
            for sub, values in deliveries.items():
                if not isinstance(values, list):
                    continue
                name = f"deliver {str(sub)[:64]}"
                for ms in values[:budget]:
                    if isinstance(ms, int | float) and math.isfinite(ms):
                        self.metrics.request(name, max(0.0, float(ms)) / 1000.0, kind=KIND)
                budget -= min(len(values), budget)
        values = dict(metrics)
        memory = self.memory_mb.get(peer_id)
        if memory is not None:
            values["memoryMB"] = round(memory, 1)
        self.points += 1
        self.reporter.publish(peer_id, values, t)


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple):
        return ",".join(_param(v) for v in value)
    return str(value)


async def _no_icon(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204, headers=NO_CACHE)
