"""`mlops-mlflow`: the `mlops` training loop through the real MLflow client against an MLflow tracking server.

The seed (`Trainy-ai/pluto-server` load tests, `seed-systems.md` §4) has many training runs log five
metrics a step to an ingestion pipeline. This simulator runs the same loop through `MlflowClient`
(`pip install 'harness[mlflow]'`, i.e. mlflow-skinny) against any MLflow tracking server:

    targets:
      mlflow: {url: "http://127.0.0.1:5000", health: /health}    # `mlflow server ...`, started by you
    groups:
      training:
        simulator: mlops-mlflow
        users: 50                       # 50 training runs at a time
        think_time: 100ms               # the "compute" between two logged steps
        options:
          experiment: harness-load-test
          mode: batch                   # one log_batch per step; `metric`: one log_metric per value
          steps: 1000                   # steps per run; then the run is FINISHED and a new one starts
          params: {test_type: load_test, target_rps: 1000}

Each virtual user is one training run at a time. `start_user` creates the run (`create_run`, tagged
`harness.run_id`, `harness.group`, `harness.user`, `harness.curve_seed` and `tags`) and logs `params`;
each iteration is one logged training step: the five curve metrics of `curves.TrainingCurve` (loss
falling, accuracy rising, with noise; with `batch_metrics` also `batch_loss`, `batch_size`,
`gpu_util`) and `epoch`, all with the step number and the wall-clock timestamp. After `steps` steps the
run is set FINISHED and the user's next iteration creates a new run; a stopped user finishes its run.
`log_every: N` logs every N-th training step (steps N, 2N, … up to `steps`), so a run needs fewer calls.
MLflow has no console-log API: with `console_every: N` the console lines of the last N logged steps
(the seed's "Training step S completed - batch_size: B") are uploaded as one text artifact
`console/step-00000123.txt` (`log_text`; the run's first upload also fetches the run to find its
artifact store). A server started with `--artifacts-destination` receives them over HTTP.

What is recorded (kind `mlflow`):
- requests `run_create`, `log_params`, `log_batch` (batch mode) or `log_metric` (metric mode, one per
  value), `log_text` and `run_finish`. Every MLflow call is synchronous (`synchronous=True`): when it
  returns, the server has stored the data, so a call's latency IS the time to acknowledgment. It is
  measured in the worker thread around the call alone: a worker runs 64 calls at once, so beyond 64
  busy users per worker calls wait for a thread, unmeasured (add `processes`). A failed call is a
  failed request whose reason is one line: `RESOURCE_DOES_NOT_EXIST: … (HTTP 404)`, `HTTP 503 (retries
  exhausted)`, `connection error: Connection refused`, `timed out after 10s`.
- phase `log_step` (metric mode only, not in totals): the time to log all of a step's values.
- counters `points` (metric values acknowledged), `steps` (steps whose values were all acknowledged)
  and `console_lines`; a data point per finished run (its MLflow run id, steps, points, failures, s).
The run ends with an "MLflow ingest" table: calls, failures, calls/s, p50/p95 per call, and points/s.

Settings MLflow only reads from the environment (it has no per-client ones): a worker process runs one
group, so `setup` sets `MLFLOW_HTTP_REQUEST_TIMEOUT` (`request_timeout`), `…_MAX_RETRIES`
(`max_retries`, default 0: a 429/5xx is a failure, not a hidden retry), `…_BACKOFF_FACTOR`,
`MLFLOW_HTTP_POOL_MAXSIZE` (one pooled connection per thread) and `MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT`
(else every finished run prints its URL and costs an extra GET) there, and restores them in `teardown`;
`prepare_run` sets them only around its own calls. Importing this module turns MLflow's usage telemetry
off (`MLFLOW_DISABLE_TELEMETRY`, unless already set): it would record every call of the load test.
Authentication comes from MLflow's own `MLFLOW_TRACKING_TOKEN` / `_USERNAME` / `_PASSWORD`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from harness.durations import Duration
from harness.errors import UsageError
from harness.metrics import error_text
from harness.simulator import Simulator, User, check_target_choice
from simulators.mlops.curves import TrainingCurve
from simulators.mlops.environment import restore_env, set_env

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read once, when mlflow is imported

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException, RestException

KIND = "mlflow"
CALLS = ("run_create", "log_params", "log_batch", "log_metric", "log_text", "run_finish")
DEFAULT_PARAMS: dict[str, str | int | float | bool] = {"test_type": "load_test", "target_rps": 1000}


class MlflowLoopOptions(BaseModel):
    """Options of the `mlops-mlflow` simulator."""

    model_config = ConfigDict(extra="forbid")
    target: str | None = None
    """The profile target that is the tracking server; default: the profile's only target."""
    tracking_uri: str | None = None
    """The tracking server (`http://host:5000`, `${MLFLOW_TRACKING_URI}`); replaces `target`."""
    experiment: str = Field(default="harness-load-test", min_length=1)
    """The experiment the runs go into; created if missing."""
    mode: Literal["batch", "metric"] = "batch"
    """`batch`: one `log_batch` per step with all its values; `metric`: one `log_metric` per value."""
    steps: int = Field(default=1000, ge=1)
    """Training steps per run; then the run is FINISHED and the next iteration starts a new one."""
    log_every: int = Field(default=1, ge=1)
    """Each iteration logs every N-th training step (steps N, 2N, … up to `steps`)."""
    steps_per_epoch: int = Field(default=100, ge=1)
    """The `epoch` metric is step // steps_per_epoch."""
    batch_metrics: bool = False
    """Also log the seed's per-batch figures `batch_loss`, `batch_size` and `gpu_util` (9 values a step)."""
    console_every: int = Field(default=0, ge=0)
    """Every N logged steps, upload their console lines as one text artifact (`log_text`); 0: never."""
    params: dict[str, str | int | float | bool] = Field(default_factory=lambda: dict(DEFAULT_PARAMS))
    """Logged once per run (MLflow stores them as strings)."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Extra tags on every run."""
    request_timeout: Duration = Field(default=10.0, gt=0)
    """Connect and read timeout of one HTTP call (MLflow takes whole seconds: rounded up)."""
    max_retries: int = Field(default=0, ge=0, le=10)
    """Retries of a connection error, timeout, 429 or 5xx inside one call (their wait is in its latency)."""
    backoff_factor: int = Field(default=1, ge=0, le=120)
    """Seconds of the first retry's backoff, doubling after (MLflow takes whole seconds)."""


def describe_error(exc: BaseException, timeout: float | None = None) -> str:
    """One line for a failed MLflow call: its error code and HTTP status, or what the connection did."""
    if isinstance(exc, RestException):
        return f"{_first_line(exc.message, 200)} (HTTP {exc.get_http_status_code()})"
    text = str(exc)
    if isinstance(exc, MlflowException):
        if m := re.search(r"too many (\d{3}) error responses", text):
            return f"HTTP {m[1]} (retries exhausted)"
        if m := re.search(r"failed with error code (\d{3})", text):
            return f"HTTP {m[1]} {exc.error_code}"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, requests.Timeout) or "timed out" in text or "timeout exception" in text:
        return f"timed out after {timeout:g}s" if timeout else "timed out"
    if isinstance(cause, requests.ConnectionError) or "Max retries exceeded" in text:
        if m := re.search(r"\[Errno -?\d+\] ([^'\"()\]]+)", text):
            return f"connection error: {m[1].strip()}"
        if "RemoteDisconnected" in text or "Connection aborted" in text:
            return "connection error: closed by the server"
        return "connection error"
    if isinstance(exc, MlflowException):
        return f"{exc.error_code}: {_first_line(exc.message, 200)}"
    return error_text(exc)


def _first_line(text: str, limit: int) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def request_timeout(options: MlflowLoopOptions) -> int:
    """The timeout MLflow applies: whole seconds, at least 1."""
    return max(1, math.ceil(options.request_timeout))


def http_env(options: MlflowLoopOptions, connections: int) -> dict[str, str]:
    """The MLflow environment settings that make its HTTP calls behave as `options` say."""
    return {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(request_timeout(options)),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(options.max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(options.backoff_factor),
        "MLFLOW_HTTP_POOL_CONNECTIONS": str(connections),
        "MLFLOW_HTTP_POOL_MAXSIZE": str(connections),
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }


@contextlib.contextmanager
def _scoped_env(values: dict[str, str]) -> Iterator[None]:
    saved = set_env(values)
    try:
        yield
    finally:
        restore_env(saved)


def resolve_tracking_uri(options: MlflowLoopOptions, targets: dict[str, str]) -> str:
    """The tracking URI: explicit, else the named target, else the profile's only target."""
    if options.tracking_uri:
        return options.tracking_uri
    if options.target is not None:
        if options.target not in targets:
            raise UsageError(f"mlflow: no target named {options.target!r}; have {sorted(targets)}")
        return targets[options.target]
    if len(targets) == 1:
        return next(iter(targets.values()))
    raise UsageError(
        f"mlflow: name the tracking server ('target', one of {sorted(targets)}) or give tracking_uri"
    )


def step_values(curve: TrainingCurve, step: int, batch_metrics: bool = False) -> dict[str, float]:
    """A logged step's values, in the order they are logged: the curve's metrics (draws from its rng, so
    a run is reproduced by calling this for its steps in order on a curve from its `harness.curve_seed`)."""
    values: dict[str, float] = dict(curve.metrics(step))
    if batch_metrics:
        values.update(curve.batch(step))
    values["epoch"] = float(curve.epoch(step))
    return values


def _timed(func: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, BaseException | None, Any]:
    """Call `func` in this thread: its latency, the exception it raised (or None) and its result."""
    began = time.perf_counter()
    try:
        result = func(*args, **kwargs)
    except Exception as exc:
        return time.perf_counter() - began, exc, None
    return time.perf_counter() - began, None, result


@dataclass
class _Training:
    """One user's training: the open MLflow run (if any) and where it is."""

    index: int
    runs: int = 0
    run_id: str | None = None
    curve: TrainingCurve | None = None
    step: int = 0
    """The last training step logged in the open run."""
    logged: int = 0
    """Steps logged in the open run (attempted)."""
    points: int = 0
    failures: int = 0
    started: float = 0.0
    console: list[str] | None = None


class MlflowLoopSimulator(Simulator):
    """Training runs logging metrics through the real MLflow client to an MLflow tracking server."""

    name = "mlops-mlflow"
    description = "ML training loops logging metrics through the real MLflow client (log_batch or log_metric)"
    Options = MlflowLoopOptions
    extra = "mlflow"
    threads: ClassVar[int] = 64

    @classmethod
    def check_profile(cls, options: MlflowLoopOptions, profile: Any) -> None:
        check_target_choice(profile, options.target, options.tracking_uri, "tracking_uri")

    @classmethod
    def prepare_run(
        cls, options: MlflowLoopOptions, targets: dict[str, str], run_id: str, log: logging.Logger
    ) -> dict[str, Any]:
        """Create the experiment (or find it) once, before any worker starts; an unreachable server or a
        rejected call is a one-line UsageError (exit 2)."""
        uri = resolve_tracking_uri(options, targets)
        client = MlflowClient(tracking_uri=uri)
        with _scoped_env(http_env(options, cls.threads)):
            try:
                experiment = client.get_experiment_by_name(options.experiment)
                if experiment is None:
                    try:
                        experiment_id = client.create_experiment(options.experiment)
                    except RestException as exc:
                        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                            raise
                        experiment = client.get_experiment_by_name(options.experiment)  # created meanwhile
                        if experiment is None:
                            raise
                        experiment_id = experiment.experiment_id
                else:
                    experiment_id = experiment.experiment_id
            except MlflowException as exc:
                reason = describe_error(exc, request_timeout(options))
                if reason.startswith(("connection error", "timed out")):
                    raise UsageError(f"mlflow: cannot reach the tracking server at {uri}: {reason}") from None
                raise UsageError(f"mlflow: experiment {options.experiment!r} at {uri}: {reason}") from None
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise UsageError(
                f"mlflow: experiment {options.experiment!r} at {uri} is deleted: restore it or rename"
            )
        log.info("MLflow %s: experiment %r (id %s)", uri, options.experiment, experiment_id)
        return {"tracking_uri": uri, "experiment_id": str(experiment_id)}

    async def setup(self) -> None:
        opts: MlflowLoopOptions = self.options
        prepared = self.ctx.prepared or self.prepare_run(opts, self.ctx.targets, self.ctx.run_id, self.log)
        self._saved_env = set_env(http_env(opts, self.threads))
        self.uri: str = prepared["tracking_uri"]
        self.experiment_id: str = prepared["experiment_id"]
        self.client = MlflowClient(tracking_uri=self.uri)
        self.timeout = float(request_timeout(opts))
        self.params = [Param(k, str(v)) for k, v in opts.params.items()]
        self._finishing: set[asyncio.Task[None]] = set()

    async def teardown(self) -> None:
        if getattr(self, "_finishing", None):  # runs being finished when their users were cancelled
            await asyncio.wait(set(self._finishing), timeout=self.timeout + 1.0)
        restore_env(getattr(self, "_saved_env", {}))

    async def start_user(self, user: User) -> None:
        state = _Training(index=self.ctx.global_user(user))
        user.data = {"training": state}
        await self._open_run(state)

    async def iteration(self, user: User) -> None:
        assert user.data is not None
        state: _Training = user.data["training"]
        if state.run_id is None and not await self._open_run(state):
            return
        await self._log_step(state)
        if state.step >= self.options.steps:
            await self._finish_shielded(state)

    async def stop_user(self, user: User) -> None:
        state: _Training | None = (user.data or {}).get("training")
        if state is not None and state.run_id is not None:
            await self._finish_shielded(state)

    async def _finish_shielded(self, state: _Training) -> None:
        """Finish the run even if the user is cancelled meanwhile (a worker that stops cancels users still
        in `stop_user`): the call and its record go on, and `teardown` waits for them."""
        task = asyncio.ensure_future(self._finish_run(state))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        await asyncio.shield(task)

    def _record(self, name: str, latency: float, error: BaseException | None) -> bool:
        message = None if error is None else describe_error(error, self.timeout)
        self.metrics.request(name, latency, kind=KIND, ok=error is None, error=message)
        return error is None

    async def _open_run(self, state: _Training) -> bool:
        """Create a run and log its params; False (recorded) if the run could not be created."""
        opts: MlflowLoopOptions = self.options
        seed = self.ctx.rng.getrandbits(32)
        state.runs += 1
        tags = {
            **opts.tags,
            "harness.run_id": self.ctx.run_id,
            "harness.group": self.ctx.group,
            "harness.user": str(state.index),
            "harness.curve_seed": str(seed),
            "harness.mode": opts.mode,
        }
        name = f"harness-{self.ctx.group}-user{state.index}-run{state.runs}"
        latency, error, run = await self.ctx.run_blocking(
            _timed, self.client.create_run, self.experiment_id, tags=tags, run_name=name
        )
        if not self._record("run_create", latency, error):
            return False
        state.run_id = run.info.run_id
        state.curve = TrainingCurve(
            random.Random(seed), total_steps=opts.steps, steps_per_epoch=opts.steps_per_epoch
        )
        state.step = state.logged = state.points = state.failures = 0
        state.started = time.time()
        state.console = []
        if self.params:
            latency, error, _ = await self.ctx.run_blocking(
                _timed, self.client.log_batch, state.run_id, params=self.params, synchronous=True
            )
            if not self._record("log_params", latency, error):
                state.failures += 1
        return True

    async def _log_step(self, state: _Training) -> None:
        opts: MlflowLoopOptions = self.options
        assert state.run_id is not None and state.curve is not None and state.console is not None
        step = min(state.step + opts.log_every, opts.steps)
        for s in range(state.step + 1, step + 1):
            if opts.console_every:
                size = self.ctx.rng.choice((16, 32, 64, 128))
                state.console.append(f"Training step {s} completed - batch_size: {size}")
        state.step = step
        state.logged += 1
        values = step_values(state.curve, step, opts.batch_metrics)
        timestamp = int(time.time() * 1000)
        run_id = state.run_id
        if opts.mode == "batch":
            batch = [Metric(k, v, timestamp, step) for k, v in values.items()]
            latency, error, _ = await self.ctx.run_blocking(
                _timed, self.client.log_batch, run_id, metrics=batch, synchronous=True
            )
            ok = self._record("log_batch", latency, error)
            points = len(values) if ok else 0
            state.failures += 0 if ok else 1
        else:
            results = await self.ctx.run_blocking(self._log_each, run_id, values, timestamp, step)
            points = sum(self._record("log_metric", latency, error) for latency, error in results)
            state.failures += len(values) - points
            self.metrics.phase("log_step", sum(r[0] for r in results), ok=points == len(values))
        state.points += points
        self.metrics.counter("points", points)
        if points == len(values):
            self.metrics.counter("steps")
        if opts.console_every and state.logged % opts.console_every == 0:
            await self._upload_console(state, run_id)

    def _log_each(
        self, run_id: str, values: dict[str, float], timestamp: int, step: int
    ) -> list[tuple[float, BaseException | None]]:
        """Metric mode, in one worker thread: one `log_metric` per value, each timed."""
        out = []
        for key, value in values.items():
            latency, error, _ = _timed(
                self.client.log_metric, run_id, key, value, timestamp=timestamp, step=step, synchronous=True
            )
            out.append((latency, error))
        return out

    async def _upload_console(self, state: _Training, run_id: str) -> None:
        """Upload the console lines since the last upload as one text artifact (`log_text`)."""
        assert state.console is not None
        text = "\n".join(state.console) + "\n"
        lines, state.console = len(state.console), []
        latency, error, _ = await self.ctx.run_blocking(
            _timed, self.client.log_text, run_id, text, f"console/step-{state.step:08d}.txt"
        )
        if self._record("log_text", latency, error):
            self.metrics.counter("console_lines", lines)
        else:
            state.failures += 1

    async def _finish_run(self, state: _Training) -> None:
        """Set the open run FINISHED (recorded as `run_finish`) and leave the user without a run."""
        run_id, state.run_id = state.run_id, None
        assert run_id is not None
        if state.console:  # the lines since the last upload (a run that ended between two)
            await self._upload_console(state, run_id)
        latency, error, _ = await self.ctx.run_blocking(
            _timed, self.client.set_terminated, run_id, "FINISHED", int(time.time() * 1000)
        )
        if not self._record("run_finish", latency, error):
            state.failures += 1
        self.metrics.datapoint(
            f"run-{run_id}",
            {
                "user": state.index,
                "steps": state.step,
                "logged_steps": state.logged,
                "points": state.points,
                "failures": state.failures,
                "seconds": round(time.time() - state.started, 3),
                "finished": error is None,
            },
        )

    @classmethod
    def summary_tables(
        cls, group: str, endpoints: list[dict[str, Any]], counters: dict[str, float]
    ) -> list[dict[str, Any]]:
        """The MLflow ingest table: each call's count, failures, rate and latency, and points/s."""
        by_name = {e["name"]: e for e in endpoints if e["name"] in CALLS and e.get("kind") == KIND}
        if not by_name:
            return []
        rows = [
            [
                name,
                int(e["requests"]),
                int(e["failures"]),
                round(float(e.get("rps") or 0.0), 2),
                float(e.get("p50_ms") or 0.0),
                float(e.get("p95_ms") or 0.0),
            ]
            for name in CALLS
            if (e := by_name.get(name)) is not None
        ]
        points = float(counters.get("points", 0.0))
        log = by_name.get("log_batch") or by_name.get("log_metric")
        note = f"{int(points)} points in {int(counters.get('steps', 0))} complete steps"
        if log is not None and log["requests"] and log.get("rps"):
            seconds = log["requests"] / float(log["rps"])
            note += (
                f": {points / seconds:.0f} points/s acknowledged, "
                f"{points / log['requests']:.1f} points per {log['name']} call"
            )
        return [
            {
                "title": "MLflow ingest",
                "columns": ["call", "calls", "failures", "calls/s", "p50 ms", "p95 ms"],
                "rows": rows,
                "points": int(points),
                "note": note,
            }
        ]
