"""The metric-recording API that simulators use, and the per-second windows a worker ships.

A simulator records through `ctx.metrics` (one `Metrics` per worker):

    metrics.request("GET /home", latency_s, ok=True, bytes_received=512)
    with metrics.timer("login"):            # also `async with`, and @metrics.timer("x") on a function
        ...
    metrics.phase("time_to_first_token", ttft_s)   # part of a request above: kept out of totals
    metrics.counter("messages_sent")
    metrics.gauge("queue_depth", 12)
    metrics.datapoint("peer-7", {"rtt_ms": 3.1, "jitter_ms": 0.4})

Every second the worker calls `drain()`, which returns the finished seconds as plain data: per
second and per name a count, failures, bytes and an HdrHistogram of latency (encoded), plus a second
histogram measured from the *intended* start for open-model iterations. Histograms merge exactly,
so percentiles over any time range and any number of workers are a merge of windows.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_DIGITS = 3
"""Histogram range 1 µs .. 1 h at 3 significant digits: every percentile within 0.1%."""

ERROR_KIND = "error"
"""Kind of a whole failed iteration (e.g. `(iteration)`): a failure in the totals, not a request."""

PHASE_KIND = "phase"
"""Kind of a measurement that is part of a request recorded under another name (a time to first token,
a polling phase, a per-position view of the same message): it has its own row, histogram and failures,
but group and run totals leave it out, so no operation is counted twice."""


def counts_as_request(kind: str) -> bool:
    """Whether rows of this kind add to the request count and latency of group and run totals."""
    return kind != ERROR_KIND and kind != PHASE_KIND


def counts_as_failure(kind: str) -> bool:
    """Whether failures of rows of this kind add to the failures of group and run totals."""
    return kind != PHASE_KIND


MAX_ERROR_MESSAGES = 50
"""Distinct error messages kept per name per second; the rest count under one 'other' line."""

F = TypeVar("F", bound=Callable[..., Any])

# Set by the worker around each open-model iteration: how late the iteration started (seconds).
schedule_lag: contextvars.ContextVar[float | None] = contextvars.ContextVar("schedule_lag", default=None)


def new_histogram() -> HdrHistogram:
    """An empty latency histogram in microseconds."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def decode_histogram(encoded: str | bytes) -> HdrHistogram:
    """A histogram from its compressed form."""
    hist = new_histogram()
    hist.decode_and_add(encoded)
    return hist


def merge_into(target: HdrHistogram, encoded: str | bytes | None) -> None:
    """Add an encoded histogram to `target`."""
    if encoded:
        target.decode_and_add(encoded)


def percentiles_ms(hist: HdrHistogram, points: tuple[float, ...] = (50, 90, 95, 99)) -> dict[float, float]:
    """Percentiles of a microsecond histogram, in milliseconds."""
    if hist.get_total_count() == 0:
        return {p: 0.0 for p in points}
    values = hist.get_percentile_to_value_dict(list(points))
    return {p: values[p] / 1000.0 for p in points}


def error_text(error: BaseException | str | None) -> str:
    """A short, stable message for an error (no addresses or ids that would defeat dedup)."""
    if error is None:
        return "failed"
    if isinstance(error, BaseException):
        text = str(error) or type(error).__name__
        if not text.startswith(type(error).__name__):
            text = f"{type(error).__name__}: {text}"
    else:
        text = error
    return text.strip().splitlines()[0][:300] if text.strip() else "failed"


@dataclass
class _Stat:
    kind: str
    count: int = 0
    failures: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    hist: HdrHistogram = field(default_factory=new_histogram)
    hist_intended: HdrHistogram | None = None
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class _Second:
    stats: dict[str, _Stat] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)


class Timer:
    """Times a block or a function and records it as a request; a raised exception marks it failed."""

    __slots__ = ("_kind", "_metrics", "_name", "_start", "bytes_received", "bytes_sent", "error", "ok")

    def __init__(self, metrics: Metrics, name: str, kind: str) -> None:
        self._metrics = metrics
        self._name = name
        self._kind = kind
        self._start = 0.0
        self.ok = True
        self.error: BaseException | str | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def fail(self, error: BaseException | str | None = None) -> None:
        """Mark the timed operation failed without raising."""
        self.ok = False
        self.error = error

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        latency = time.perf_counter() - self._start
        if exc is not None and not isinstance(exc, GeneratorExit):
            self.ok, self.error = False, exc
        if exc is None or not _is_cancel(exc):
            self._metrics.request(
                self._name,
                latency,
                kind=self._kind,
                ok=self.ok,
                error=self.error,
                bytes_sent=self.bytes_sent,
                bytes_received=self.bytes_received,
            )

    async def __aenter__(self) -> Timer:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)


def _is_cancel(exc: BaseException) -> bool:
    import asyncio

    return isinstance(exc, asyncio.CancelledError)


class Metrics:
    """Records one worker's operations into per-second windows."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._seconds: dict[int, _Second] = {}
        self._datapoints: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []

    def _second(self) -> _Second:
        t = int(self._clock())
        sec = self._seconds.get(t)
        if sec is None:
            sec = self._seconds[t] = _Second()
        return sec

    def request(
        self,
        name: str,
        latency: float,
        *,
        kind: str = "request",
        ok: bool = True,
        error: BaseException | str | None = None,
        bytes_sent: int = 0,
        bytes_received: int = 0,
    ) -> None:
        """Record one operation that took `latency` seconds.

        `name` groups operations in every table and chart (keep it low-cardinality: a route, not a URL
        with ids); `kind` says what sort of operation it is (http, sdk, ws, …); a failed operation
        keeps its latency and adds `error` (an exception or message) to the deduplicated error list.
        """
        sec = self._second()
        stat = sec.stats.get(name)
        if stat is None:
            stat = sec.stats[name] = _Stat(kind)
        stat.count += 1
        stat.bytes_sent += bytes_sent
        stat.bytes_received += bytes_received
        micros = max(LOWEST_US, min(int(latency * 1e6), HIGHEST_US))
        stat.hist.record_value(micros)
        lag = schedule_lag.get()
        if lag is not None:
            if stat.hist_intended is None:
                stat.hist_intended = new_histogram()
            stat.hist_intended.record_value(max(LOWEST_US, min(int((latency + lag) * 1e6), HIGHEST_US)))
        if not ok:
            stat.failures += 1
            message = error_text(error)
            if message in stat.errors or len(stat.errors) < MAX_ERROR_MESSAGES:
                stat.errors[message] = stat.errors.get(message, 0) + 1
            else:
                stat.errors["(other errors)"] = stat.errors.get("(other errors)", 0) + 1

    def phase(
        self, name: str, latency: float, *, ok: bool = True, error: BaseException | str | None = None
    ) -> None:
        """Record part of an operation recorded elsewhere (kind `phase`): its own row, not in totals."""
        self.request(name, latency, kind=PHASE_KIND, ok=ok, error=error)

    def timer(self, name: str, kind: str = "request") -> Any:
        """A context manager (sync or async) or decorator that records the block's duration as `name`."""
        return _TimerFactory(self, name, kind)

    def counter(self, name: str, value: float = 1.0) -> None:
        """Add `value` to a per-second counter (e.g. messages sent)."""
        counters = self._second().counters
        counters[name] = counters.get(name, 0.0) + value

    def gauge(self, name: str, value: float) -> None:
        """Set a gauge; the last value in each second is kept (e.g. a queue depth)."""
        self._second().gauges[name] = float(value)

    def datapoint(self, entity: str, values: dict[str, Any], t: float | None = None) -> None:
        """Store a free-form record about one entity (a peer, a conversation, a wallet)."""
        self._datapoints.append({"t": self._clock() if t is None else t, "entity": entity, "values": values})

    def event(self, type_: str, detail: dict[str, Any] | None = None) -> None:
        """Put a simulator event on the run's timeline (e.g. 'talk finished')."""
        self._events.append({"t": self._clock(), "type": type_, "detail": detail or {}})

    def drain(self, everything: bool = False) -> dict[str, Any]:
        """The finished seconds (all of them if `everything`), as plain data for the collector."""
        now = int(self._clock())
        windows: list[dict[str, Any]] = []
        metrics: list[dict[str, Any]] = []
        for t in sorted(self._seconds):
            if t >= now and not everything:
                continue
            sec = self._seconds.pop(t)
            for name, stat in sec.stats.items():
                windows.append(
                    {
                        "t": t,
                        "name": name,
                        "kind": stat.kind,
                        "count": stat.count,
                        "failures": stat.failures,
                        "bytes_sent": stat.bytes_sent,
                        "bytes_received": stat.bytes_received,
                        "hist": stat.hist.encode(),
                        "hist_intended": stat.hist_intended.encode() if stat.hist_intended else None,
                        "errors": stat.errors,
                    }
                )
            metrics.extend(
                {"t": t, "name": n, "type": "counter", "value": v} for n, v in sec.counters.items()
            )
            metrics.extend({"t": t, "name": n, "type": "gauge", "value": v} for n, v in sec.gauges.items())
        datapoints, self._datapoints = self._datapoints, []
        events, self._events = self._events, []
        return {"windows": windows, "metrics": metrics, "datapoints": datapoints, "events": events}


class _TimerFactory:
    __slots__ = ("_kind", "_metrics", "_name", "_timer")

    def __init__(self, metrics: Metrics, name: str, kind: str) -> None:
        self._metrics, self._name, self._kind = metrics, name, kind
        self._timer: Timer | None = None

    def __enter__(self) -> Timer:
        self._timer = Timer(self._metrics, self._name, self._kind)
        return self._timer.__enter__()

    def __exit__(self, *exc: Any) -> None:
        assert self._timer is not None
        self._timer.__exit__(*exc)

    async def __aenter__(self) -> Timer:
        return self.__enter__()

    async def __aexit__(self, *exc: Any) -> None:
        self.__exit__(*exc)

    def __call__(self, func: F) -> F:
        metrics, name, kind = self._metrics, self._name, self._kind
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async with Timer(metrics, name, kind):
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with Timer(metrics, name, kind):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]
