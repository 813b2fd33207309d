"""`mlops-http`: training runs posting NDJSON straight to an ML-metrics ingest service.

As the seed's `locustfile_http.py` (`seed-systems.md` §4.1), each iteration is one request, chosen by
weight (default metrics 5, logs 3, data 2), with `Authorization: Bearer <key>`, `X-Run-Id`,
`X-Project-Name` and `Content-Type: application/x-ndjson`:

    POST /ingest/metrics   {"time": ms, "step": n, "data": {"train/loss": …, "train/accuracy": …,
                            "val/loss": …, "val/accuracy": …, "learning_rate": …}}
    POST /ingest/logs      {"time": ms, "message": "Training step n completed - batch_size: 64",
                            "lineNumber": n, "logType": "stdout"}
    POST /ingest/data      {"time": ms, "step": n, "data": "{\\"batch_loss\\": …, \\"batch_size\\": …,
                            \\"gpu_util\\": …}", "dataType": "batch_metrics", "logName": "training_metrics"}

one NDJSON line per record and `records_per_request` records a request (1; the seed's stress variant
sends 5 metrics records, `--set groups.X.options.records_per_request=5`). Unlike the seed's uniform
random numbers, values follow a training curve per run (`curves.TrainingCurve`): loss falls, accuracy
rises, the learning rate warms up and decays, all with noise. Each virtual user is one run with its own
numeric run id and step counter; after `steps` steps it starts a new run.

A request succeeds on 200, 201 or 202 (the seed's rule). Recorded: requests named as the seed's Locust
names (`POST /ingest/metrics`, …), counters `records` (NDJSON lines sent) and `points` (metric values
sent), and `rejected` (records in failed requests). The seed's thresholds: `p95 < 500ms`,
`p99 < 1s`, `error_rate < 1%` (profile `mlops-http`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.durations import Duration
from harness.simulator import Simulator, User, check_weights
from simulators.http.client import FastClient
from simulators.mlops.curves import TrainingCurve

SEED_KEY = "mlps_loadtest_deterministic_key_for_ci_load_tests_12345678"
"""The API key of the seed's CI load test (a test key, not a secret)."""
KINDS = ("metrics", "logs", "data")
OK_STATUSES = frozenset({200, 201, 202})


class IngestOptions(BaseModel):
    """Options of the `mlops-http` simulator."""

    model_config = ConfigDict(extra="forbid")
    target: str | None = None
    """A profile target (default: the only one)."""
    base_url: str | None = None
    """The ingest service's URL instead of a target (the seed's INGEST_URL, http://localhost:3003)."""
    api_key: str = SEED_KEY
    """Sent as `Authorization: Bearer …` (use `${ENV}` for a real key)."""
    project: str = "load-test-project"
    """Sent as `X-Project-Name`."""
    weights: dict[str, float] = Field(default_factory=lambda: {"metrics": 5.0, "logs": 3.0, "data": 2.0})
    """Relative frequency of each request kind (metrics, logs, data)."""
    records_per_request: int = Field(default=1, ge=1, le=10_000)
    """NDJSON records per request (the seed's stress test: 5)."""
    steps: int = Field(default=10_000, ge=1)
    """Steps per run; then the user starts a new run (a new run id)."""
    steps_per_epoch: int = Field(default=100, ge=1)
    timeout: Duration = Field(default=30.0, gt=0)
    connections: int = Field(default=1000, ge=1)
    """Keep-alive connections per worker, shared by its users."""

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        return check_weights(value, KINDS)


class IngestSimulator(Simulator):
    """Raw NDJSON ingest requests (metrics, console logs, structured data) with the seed's weights."""

    name = "mlops-http"
    description = "ML metrics ingest over raw HTTP: the seed's NDJSON metrics/logs/data requests"
    Options = IngestOptions

    async def setup(self) -> None:
        opts: IngestOptions = self.options
        base = (opts.base_url or self.ctx.target_url(opts.target)).rstrip("/")
        self.urls = {kind: f"{base}/ingest/{kind}" for kind in KINDS}
        self.kinds = [k for k in KINDS if opts.weights.get(k, 0) > 0]
        self.cumulative: list[float] = []
        total = 0.0
        for kind in self.kinds:
            total += opts.weights[kind]
            self.cumulative.append(total)
        self.fast: FastClient | None = None
        self.session: aiohttp.ClientSession | None = None
        if base.startswith("https://"):
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=opts.timeout),
                connector=aiohttp.TCPConnector(limit=opts.connections),
            )
        else:
            self.fast = FastClient(connections=opts.connections, timeout=opts.timeout)

    async def teardown(self) -> None:
        if self.fast is not None:
            await self.fast.close()
        if self.session is not None:
            await self.session.close()

    async def start_user(self, user: User) -> None:
        user.data = {"index": self.ctx.global_user(user), "runs": 0}
        self._new_run(user.data)

    def _new_run(self, data: dict[str, Any]) -> None:
        opts: IngestOptions = self.options
        data["runs"] += 1
        # numeric (the ingest service parses X-Run-Id as u64) and unique per user and run
        data["run_id"] = str(int(time.time() * 1000) * 1_000_000 + data["index"] % 1_000_000)
        data["step"] = 0
        data["curve"] = TrainingCurve(
            self.ctx.rng, total_steps=opts.steps, steps_per_epoch=opts.steps_per_epoch
        )
        data["headers"] = {
            "Authorization": f"Bearer {opts.api_key}",
            "X-Run-Id": data["run_id"],
            "X-Project-Name": opts.project,
            "Content-Type": "application/x-ndjson",
        }

    def _kind(self) -> str:
        pick = self.ctx.rng.random() * self.cumulative[-1]
        for kind, edge in zip(self.kinds, self.cumulative, strict=True):
            if pick < edge:
                return kind
        return self.kinds[-1]

    async def iteration(self, user: User) -> None:
        data = user.data
        assert data is not None
        opts: IngestOptions = self.options
        if data["step"] >= opts.steps:
            self._new_run(data)
        kind = self._kind()
        curve: TrainingCurve = data["curve"]
        lines = []
        points = 0
        for _ in range(opts.records_per_request):
            data["step"] += 1
            step = data["step"]
            now = int(time.time() * 1000)
            if kind == "metrics":
                values = curve.metrics(step)
                points += len(values)
                record: dict[str, Any] = {"time": now, "step": step, "data": values}
            elif kind == "logs":
                batch = curve.batch(step)
                record = {
                    "time": now,
                    "message": f"Training step {step} completed - batch_size: {batch['batch_size']}",
                    "lineNumber": step,
                    "logType": "stdout",
                }
            else:
                record = {
                    "time": now,
                    "step": step,
                    "data": json.dumps(curve.batch(step)),
                    "dataType": "batch_metrics",
                    "logName": "training_metrics",
                }
            lines.append(json.dumps(record, separators=(",", ":")))
        body = ("\n".join(lines) + "\n").encode()
        status, error, latency, received = await self._post(self.urls[kind], data["headers"], body)
        ok = error is None and status in OK_STATUSES
        if error is None and not ok:
            error = f"HTTP {status}: {received[:120].decode(errors='replace')}"
        self.metrics.request(
            f"POST /ingest/{kind}",
            latency,
            kind="http",
            ok=ok,
            error=error,
            bytes_sent=len(body),
            bytes_received=len(received),
        )
        self.metrics.counter("records" if ok else "rejected", len(lines))
        if ok and points:
            self.metrics.counter("points", points)

    async def _post(
        self, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str | None, float, bytes]:
        """POST once: the status, an error if there was no response, the latency and the body."""
        start = time.perf_counter()
        try:
            if self.fast is not None:
                response = await self.fast.request("POST", url, headers, body)
                status, received = response.status, response.body
            else:
                assert self.session is not None
                async with self.session.post(url, headers=headers, data=body) as r:
                    status, received = r.status, await r.read()
        except Exception as exc:  # no response: a failed request with its reason
            return 0, f"{type(exc).__name__}: {exc}", time.perf_counter() - start, b""
        return status, None, time.perf_counter() - start, received
