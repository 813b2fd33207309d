"""Pass/fail thresholds: parsed from a profile, evaluated from the database while a run goes and at its end.

    FUNC [ "(" SELECTOR ")" ] OP VALUE [ "over" DURATION ]

    p95(participants.user_message) < 5s     one named operation of one group
    p99.9 < 2s                              every request of the run
    mean(api) <= 120ms                      every request of one group (`avg` is the same)
    error_rate < 1%                         failures / requests (0.01 and 1% are the same)
    rps(ingest.*) > 100 over 60s            requests per second of a trailing window
    count(participants.timeout) < 50        requests that match; else a counter of that name
    counter(timeout_errors) < 50            a counter's total, summed over groups
    gauge(queue_depth) < 1000               a gauge's last value
    dropped(api) == 0                       open-model arrivals that could not start

FUNC: `pNN`/`pNN.N`, `mean` (`avg`), `min`, `max` (latency, in ms); `error_rate` (a ratio);
`requests` (`count`), `failures`, `rps`, `dropped`; `counter(NAME)` (total); `gauge(NAME)` (last value).

SELECTOR: empty = the whole run; `GROUP`; `GROUP.NAME` — NAME is everything after the first dot, so
names may hold spaces, dots and slashes (`api.GET /json`). `*` and `?` glob in either part
(`ingest.*`, `*.timeout`); nothing else is special. For `counter`/`gauge` a selector without a dot
is a NAME in any group. `count(X)` counts requests matching X; if none match but a counter does
(`X` as its name, or `GROUP.NAME`), it is that counter's total. Operations recorded as errors of a
whole iteration (kind `error`, e.g. `(iteration)`) count as failures but not as requests or
latencies, as in the summary.

VALUE: latency takes `500` (ms), `500ms`, `5s`, `1.5m`; error_rate takes `0.01` or `1%`; the rest
plain numbers. `over 60s`: live, the last 60 complete seconds; at the end, the run's last 60 s
(not for `gauge`, which is a last value).

No data: while live, a threshold whose selector matched nothing yet passes (value None, a reason);
at the end it fails — except `counter`/`count(X)`, which count 0 (a counter is stored only once it
counts, so `count(participants.timeout) < 50` passes a run without timeouts). A trailing window that
is empty although its selector matched earlier counts 0 requests, failures and rps (a stall fails
`rps(api) > 10 over 60s`) and has no latency or error rate.

`ThresholdEvaluator` reads stored windows, counters, gauges and health rows — never process memory
— and reads each row once: whole-run thresholds keep merged state, trailing ones read their window.
"""

from __future__ import annotations

import math
import operator
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from hdrh.histogram import HdrHistogram

from harness.durations import format_duration, parse_duration
from harness.metrics import ERROR_KIND, PHASE_KIND, merge_into, new_histogram
from harness.store import Store

OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
LATENCY_FUNCS = ("mean", "min", "max")
"""Latency functions besides percentiles (`p95`, `p99.9`, …)."""
FUNCS = (
    "pNN",
    "mean",
    "min",
    "max",
    "error_rate",
    "requests",
    "count",
    "failures",
    "rps",
    "dropped",
    "counter",
    "gauge",
)
ALIASES = {"avg": "mean"}
_REQUEST_FUNCS = {"error_rate", "requests", "count", "failures", "rps"}
UNITS = {
    "error_rate": "ratio",
    "requests": "count",
    "count": "count",
    "failures": "count",
    "dropped": "count",
    "counter": "count",
    "rps": "rps",
    "gauge": "value",
}
LIVE_LAG_S = 2
"""While live, only seconds `t <= int(now) - LIVE_LAG_S` are complete (every worker has shipped them)."""

_FUNC = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*(?:\.\d+)?)")
_PERCENTILE = re.compile(r"p(\d+(?:\.\d+)?)")
_OP = re.compile(r"\s*(<=|>=|==|!=|=<|=>|<>|=|<|>)")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_OVER = re.compile(r"\s+over\b\s*", re.IGNORECASE)
_FUNC_HELP = (
    "p50…p99.9, mean, avg, min, max, error_rate, requests, count, failures, rps, dropped, counter, gauge"
)


@dataclass(frozen=True)
class Threshold:
    """One parsed threshold.

    `func` is normalized (`p95`, `p99.9`, `mean`, …); a glob of None matches anything; `limit` is in
    `unit` (ms for latency, a ratio for error_rate); `over` is a trailing window in seconds or None
    for the whole run; `delay` is how long after the start an abort may happen.
    """

    expr: str
    func: str
    group_glob: str | None
    name_glob: str | None
    op: str
    limit: float
    unit: str
    over: float | None = None
    abort: bool = False
    delay: float = 0.0

    @property
    def percentile(self) -> float | None:
        """95.0 for `p95`, 99.9 for `p99.9`; None for other functions."""
        match = _PERCENTILE.fullmatch(self.func)
        return float(match.group(1)) if match else None

    @property
    def is_latency(self) -> bool:
        """True if the threshold needs latency histograms."""
        return self.unit == "ms"

    @property
    def uses_windows(self) -> bool:
        """True if the threshold reads request windows."""
        return self.is_latency or self.func in _REQUEST_FUNCS

    @property
    def uses_metrics(self) -> bool:
        """True if the threshold reads counters or gauges (`count(X)` may fall back to a counter)."""
        return self.func in ("counter", "gauge") or (self.func == "count" and self.group_glob is not None)

    @property
    def selector(self) -> str:
        """The selector as written (normalized): '', 'api', 'api.GET /json', a counter name."""
        if self.group_glob is None:
            return self.name_glob or ""
        return self.group_glob if self.name_glob is None else f"{self.group_glob}.{self.name_glob}"

    def metric_selector(self) -> tuple[str | None, str | None]:
        """(group glob, name glob) of the counters/gauges this threshold reads.

        For `count(X)` with one part, X is a counter name in any group.
        """
        if self.func == "count" and self.name_glob is None:
            return None, self.group_glob
        return self.group_glob, self.name_glob

    def passes(self, value: float) -> bool:
        """Whether a measured value satisfies the threshold."""
        return bool(OPS[self.op](value, self.limit))


def parse_threshold(expr: str, abort: bool = False, delay: float = 0.0) -> Threshold:
    """Parse one expression; a ValueError names the expression and what is wrong, on one line."""
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay!r}")
    if not isinstance(expr, str):
        raise ValueError(f"a threshold is an expression such as 'p95 < 500ms', got {type(expr).__name__}")
    text = expr.strip()
    shown = repr(text)
    if not text:
        raise ValueError("empty threshold: expected e.g. 'p95(api) < 500ms' or 'error_rate < 1%'")
    match = _FUNC.match(text)
    if not match:
        raise ValueError(f"{shown}: must start with a function such as p95, mean, error_rate or rps")
    func = _function(match.group(1), shown)
    rest = text[match.end() :]
    group_glob: str | None = None
    name_glob: str | None = None
    if rest.lstrip().startswith("["):
        raise ValueError(f"{shown}: a selector goes in parentheses, e.g. p95(api.GET /json) < 500ms")
    if rest.lstrip().startswith("("):
        rest = rest.lstrip()
        close = _selector_end(rest)
        if close is None:
            raise ValueError(f"{shown}: '(' is never closed before the comparison")
        group_glob, name_glob = _selector(func, rest[1:close], shown)
        rest = rest[close + 1 :]
    elif func in ("counter", "gauge"):
        raise ValueError(f"{shown}: {func} needs a name, e.g. {func}(queue_depth) or {func}(GROUP.NAME)")
    op_match = _OP.match(rest)
    if not op_match:
        found = rest.strip().split(" ")[0] if rest.strip() else "nothing"
        raise ValueError(f"{shown}: expected a comparison (< <= > >= == !=) after {func}, found {found!r}")
    op = op_match.group(1)
    if op not in OPS:
        raise ValueError(f"{shown}: unknown comparison {op!r}; use one of < <= > >= == !=")
    tail = rest[op_match.end() :].strip()
    over: float | None = None
    parts = _OVER.split(" " + tail, maxsplit=1)
    value_text = parts[0].strip()
    if len(parts) == 2:
        over = _over(parts[1].strip(), shown)
    if not value_text:
        raise ValueError(f"{shown}: expected a value after {op!r}")
    if over is not None and func == "gauge":
        raise ValueError(f"{shown}: a gauge is its last value; 'over' does not apply to it")
    limit, unit = _limit(func, value_text, shown)
    return Threshold(text, func, group_glob, name_glob, op, limit, unit, over, bool(abort), float(delay))


def _function(word: str, shown: str) -> str:
    func = ALIASES.get(word.lower(), word.lower())
    percentile = _PERCENTILE.fullmatch(func)
    if percentile:
        p = float(percentile.group(1))
        if not 0 < p <= 100:
            raise ValueError(f"{shown}: a percentile must be above 0 and at most 100, got {word!r}")
        return f"p{p:g}"
    if func in FUNCS and func != "pNN":
        return func
    hint = ""
    if func == "p":
        hint = " (write the percentile in the name: p95(...), not p(95))"
    elif re.fullmatch(r"p\d+(?:\.\d+)?_ms|mean_ms|max_ms", func):
        hint = f" (the old form; write {func.removesuffix('_ms')}(...) < 500ms)"
    raise ValueError(f"{shown}: unknown function {word!r}{hint}; use one of {_FUNC_HELP}")


def _selector_end(rest: str) -> int | None:
    """Index of the ')' that closes the selector: the last ')' before the comparison."""
    match = re.match(r"\((.*)\)\s*(?:<|>|=|!)", rest, re.DOTALL)
    if match:
        return match.end(1)
    last = rest.rfind(")")
    return last if last > 0 else None


def _selector(func: str, inner: str, shown: str) -> tuple[str | None, str | None]:
    inner = inner.strip()
    if not inner:
        if func in ("counter", "gauge"):
            raise ValueError(f"{shown}: {func}() needs a name, e.g. {func}(queue_depth)")
        return None, None
    group, dot, name = inner.partition(".")
    group, name = group.strip(), name.strip()
    if dot and not group:
        raise ValueError(f"{shown}: empty group before '.' in {inner!r}; use *.{name} for any group")
    if dot and not name:
        raise ValueError(f"{shown}: empty name after '.' in {inner!r}; use {group}.* or just {group}")
    if func == "dropped" and dot:
        raise ValueError(f"{shown}: dropped is counted per group: write dropped or dropped(GROUP)")
    if func in ("counter", "gauge") and not dot:
        return None, group
    return group, (name if dot else None)


def _over(text: str, shown: str) -> float:
    if not text:
        raise ValueError(f"{shown}: 'over' needs a duration such as 60s or 5m")
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise ValueError(f"{shown}: 'over' needs a duration such as 60s or 5m, got {text!r}") from None
    if seconds < 1:
        raise ValueError(f"{shown}: 'over' needs at least 1s, got {text!r}")
    return seconds


def _limit(func: str, text: str, shown: str) -> tuple[float, str]:
    number = _NUMBER.match(text)
    if not number:
        raise ValueError(f"{shown}: cannot read the value {text!r}; expected a number")
    suffix = text[number.end() :].strip().lower()
    value = float(number.group())
    if _PERCENTILE.fullmatch(func) or func in LATENCY_FUNCS:
        if not suffix:
            return value, "ms"
        if suffix == "%":
            raise ValueError(f"{shown}: {func} is a latency: write 500ms, 5s or 1.5m, not a %")
        try:
            return parse_duration(text) * 1000.0, "ms"
        except ValueError:
            raise ValueError(
                f"{shown}: cannot read the latency {text!r}; write 500 (ms), 500ms, 5s or 1.5m"
            ) from None
    if func == "error_rate":
        if suffix == "%":
            if not 0 <= value <= 100:
                raise ValueError(f"{shown}: error_rate is a percentage from 0% to 100%, got {text!r}")
            return value / 100.0, "ratio"
        if suffix:
            raise ValueError(f"{shown}: error_rate takes a ratio (0.01) or a percentage (1%), got {text!r}")
        if not 0 <= value <= 1:
            raise ValueError(
                f"{shown}: error_rate is a ratio from 0 to 1: write {value:g}% or {value / 100:g}"
            )
        return value, "ratio"
    if suffix:
        raise ValueError(f"{shown}: {func} takes a plain number, got {text!r}")
    return value, UNITS[func]


# -- evaluation ------------------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """`*` any text, `?` one character, anything else literal (names may hold '[' or '.')."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.S)


def matches(glob: str | None, value: str) -> bool:
    """Whether `value` fits a selector part (None fits anything)."""
    return glob is None or _glob(glob).fullmatch(value) is not None


class _Acc:
    """What one threshold has gathered: request counts, a latency histogram, counters, gauges, dropped."""

    __slots__ = (
        "counter_seen",
        "counter_total",
        "dropped",
        "failures",
        "gauges",
        "health_seen",
        "hist",
        "matched",
        "requests",
        "whole_group",
    )

    def __init__(self, threshold: Threshold) -> None:
        self.whole_group = threshold.name_glob is None
        self.matched = False
        self.requests = 0
        self.failures = 0
        self.hist: HdrHistogram | None = new_histogram() if threshold.is_latency else None
        self.counter_seen = False
        self.counter_total = 0.0
        self.gauges: dict[tuple[str, str], list[float]] = {}
        self.health_seen = False
        self.dropped = 0

    def add_window(self, row: dict[str, Any]) -> None:
        if row["kind"] == PHASE_KIND and self.whole_group:
            return  # part of a request counted under another name (as in the summary's totals)
        self.matched = True
        self.failures += int(row["failures"])
        if row["kind"] == ERROR_KIND:
            return  # a whole iteration failed: a failure, not a request, no latency (as in the summary)
        self.requests += int(row["count"])
        if self.hist is not None:
            merge_into(self.hist, row["hist"])

    def add_metric(self, row: dict[str, Any]) -> None:
        if row["type"] == "counter":
            self.counter_seen = True
            self.counter_total += float(row["value"])
            return
        last = self.gauges.get((row["group"], row["name"]))
        t = float(row["t"])
        if last is None or t > last[0]:
            self.gauges[(row["group"], row["name"])] = [t, float(row["value"])]
        elif t == last[0]:
            last[1] += float(row["value"])  # the same second from another flush: the group's workers add up

    def add_health(self, row: dict[str, Any]) -> None:
        self.health_seen = True
        self.dropped += int(row["dropped"] or 0)


def _wants_metric(threshold: Threshold, row: dict[str, Any]) -> bool:
    kind = "gauge" if threshold.func == "gauge" else "counter"
    if row["type"] != kind:
        return False
    group, name = threshold.metric_selector()
    return matches(group, row["group"]) and matches(name, row["name"])


def _wants_window(threshold: Threshold, group: str, name: str) -> bool:
    return matches(threshold.group_glob, group) and matches(threshold.name_glob, name)


def _nothing(threshold: Threshold) -> str:
    """Why a threshold has no value: nothing matched its selector."""
    sel = threshold.selector
    func = threshold.func
    if func in ("counter", "gauge"):
        return f"no {func} matched {sel}"
    if func == "dropped":
        return f"no worker of {sel} reported" if sel else "no worker reported"
    if not sel:
        return "no requests recorded"
    return f"no requests or counter matched {sel}" if func == "count" else f"no requests matched {sel}"


def _value(
    threshold: Threshold, acc: _Acc, seconds: float, ever: set[str], final: bool
) -> tuple[float | None, str | None]:
    """The measured value, or None and why there is none.

    `ever`: the tables in which the selector matched a complete second so far; an empty trailing
    window of a selector that matched before counts 0 (a stall), and `count` keeps to requests once
    requests matched.
    """
    func = threshold.func
    if threshold.is_latency:
        if not acc.matched:
            return None, _nothing(threshold)
        assert acc.hist is not None
        if not acc.hist.get_total_count():
            where = threshold.selector or "the run"
            return None, f"only failed iterations matched {where}: no timed requests"
        p = threshold.percentile
        if p is not None:
            micros = float(acc.hist.get_value_at_percentile(p))
        elif func == "mean":
            micros = float(acc.hist.get_mean_value())
        elif func == "min":
            micros = float(acc.hist.get_min_value())
        else:
            micros = float(acc.hist.get_max_value())
        return round(micros / 1000.0, 3), None
    if func == "gauge":
        if not acc.gauges:
            return None, _nothing(threshold)
        return sum(v for _t, v in acc.gauges.values()), None
    if func == "dropped":
        if acc.health_seen:
            return float(acc.dropped), None
        return (0.0, None) if ever else (None, _nothing(threshold))
    counts_counters = threshold.uses_metrics and func != "gauge"  # counter(X), or count(X) falling back
    if func == "counter" or (counts_counters and not acc.matched and "window" not in ever):
        if acc.counter_seen:
            return acc.counter_total, None
        if ever:
            return 0.0, None
        if final:  # a counter is stored only when it counts: one that never did counted nothing
            return 0.0, f"{_nothing(threshold)}: counted as 0"
        return None, _nothing(threshold)
    if not acc.matched and (not ever or func == "error_rate"):
        return None, _nothing(threshold)  # an empty window of a selector that matched before counts 0
    if func in ("requests", "count"):
        return float(acc.requests), None
    if func == "failures":
        return float(acc.failures), None
    if func == "error_rate":
        if acc.requests:
            return round(acc.failures / acc.requests, 6), None
        return (1.0, None) if acc.failures else (0.0, None)  # only failed iterations: everything failed
    # rps
    if seconds <= 0:
        return None, "no complete second yet"
    return round(acc.requests / seconds, 3), None


def _number(value: float, unit: str) -> float | int:
    if unit == "count" and float(value).is_integer():
        return int(value)
    return value


class ThresholdEvaluator:
    """Evaluates thresholds from the store, incrementally: each stored row is read once.

    Call `evaluate(now)` while the run goes (it uses complete seconds only: `t <= int(now) - 2`) and
    `evaluate(final=True, ended_at=...)` once at the end (everything stored). Not thread-safe: use it
    from one thread.
    """

    def __init__(self, thresholds: list[Threshold], store: Store, run_id: str, started_at: float) -> None:
        self.thresholds = list(thresholds)
        self.store = store
        self.run_id = run_id
        self.started_at = float(started_at)
        self._accs: list[_Acc | None] = [_Acc(t) if t.over is None else None for t in self.thresholds]
        """Whole-run state per threshold (None for a trailing-window threshold)."""
        self._whole = [(t, a) for t, a in zip(self.thresholds, self._accs, strict=True) if a is not None]
        self._need_windows = any(t.uses_windows for t in self.thresholds)
        self._need_hist = any(t.is_latency and t.over is None for t in self.thresholds)
        self._need_metrics = any(t.uses_metrics for t in self.thresholds)
        self._need_health = any(t.func == "dropped" for t in self.thresholds)
        self._max_over = max((math.ceil(t.over) for t in self.thresholds if t.over is not None), default=0)
        self._last_id = {"window": 0, "metric": 0, "health": 0}
        self._pending: dict[str, list[dict[str, Any]]] = {"window": [], "metric": [], "health": []}
        self._first_id_at: dict[str, dict[int, int]] = {"metric": {}, "health": {}}
        """Per second, the smallest id seen: bounds a trailing window's read of tables indexed by run only."""
        self._seen: dict[str, set[tuple[str, ...]]] = {"window": set(), "metric": set(), "health": set()}
        """Keys of every row of a complete second read so far."""
        self._ever: list[set[str]] = [set() for _ in self.thresholds]
        """Per threshold, the tables in which its selector matched a complete second already."""
        self._routes: dict[str, dict[tuple[str, ...], list[_Acc]]] = {
            "window": {},
            "metric": {},
            "health": {},
        }

    # -- reading -------------------------------------------------------------------------------
    def _read_new(self, cutoff: int | None) -> None:
        """Read rows stored since the last call; fold those of complete seconds into whole-run state."""
        if self._need_windows:
            hist = "hist" if self._need_hist else "NULL AS hist"
            cols = f'id, t, "group", name, kind, count, failures, {hist}'
            if self._last_id["window"]:
                # the rowid range: only rows written since the last call (of any run), then this run's
                sql = (
                    f'SELECT {cols} FROM "window"{self.store.not_indexed} WHERE id > :last AND run_id = :r '
                    "ORDER BY id"
                )
            else:
                sql = f'SELECT {cols} FROM "window" WHERE run_id = :r AND id > :last ORDER BY id'
            self._fold("window", sql, cutoff)
        if self._need_metrics:
            sql = (
                'SELECT id, t, "group", name, type, value FROM metric '
                "WHERE run_id = :r AND id > :last ORDER BY id"
            )
            self._fold("metric", sql, cutoff)
        if self._need_health:
            sql = 'SELECT id, t, "group", dropped FROM health WHERE run_id = :r AND id > :last ORDER BY id'
            self._fold("health", sql, cutoff)

    def _fold(self, table: str, sql: str, cutoff: int | None) -> None:
        rows = self.store.rows(sql, r=self.run_id, last=self._last_id[table])
        if rows:
            self._last_id[table] = int(rows[-1]["id"])
            first = self._first_id_at.get(table)
            if first is not None:
                for row in rows:
                    first.setdefault(int(row["t"]), int(row["id"]))
        pending = self._pending[table] + rows
        if cutoff is None:
            ready, self._pending[table] = pending, []
        else:
            ready = [row for row in pending if int(row["t"]) <= cutoff]
            self._pending[table] = [row for row in pending if int(row["t"]) > cutoff]
        seen = self._seen[table]
        for row in ready:
            seen.add(_key(table, row))
            for acc in self._route(table, row):
                if table == "window":
                    acc.add_window(row)
                elif table == "metric":
                    acc.add_metric(row)
                else:
                    acc.add_health(row)

    def _route(self, table: str, row: dict[str, Any]) -> list[_Acc]:
        """The whole-run accumulators a row feeds (cached per key)."""
        key = _key(table, row)
        routes = self._routes[table]
        accs = routes.get(key)
        if accs is None:
            accs = routes[key] = [acc for threshold, acc in self._whole if _feeds(threshold, table, row)]
        return accs

    def _window_rows(self, table: str, lo: int, hi: int | None) -> list[dict[str, Any]]:
        """Rows of seconds lo..hi (hi None: to the end) of one table."""
        params: dict[str, Any] = {"r": self.run_id, "lo": lo, "hi": hi if hi is not None else 2**62}
        if table == "window":
            sql = (
                'SELECT t, "group", name, kind, count, failures, hist FROM "window" '
                "WHERE run_id = :r AND t >= :lo AND t <= :hi"
            )
            return self.store.rows(sql, **params)
        first = self._first_id_at[table]
        known = [
            first[t] for t in range(lo, (hi if hi is not None else max(first, default=lo)) + 1) if t in first
        ]
        params["min_id"] = min(known) if known else self._last_id[table] + 1
        if table == "metric":
            sql = 'SELECT t, "group", name, type, value FROM metric WHERE run_id = :r AND id >= :min_id'
        else:
            sql = 'SELECT t, "group", dropped FROM health WHERE run_id = :r AND id >= :min_id'
        rows = self.store.rows(sql, **params)
        return [row for row in rows if lo <= int(row["t"]) <= params["hi"]]

    def _prune(self, lo: int) -> None:
        for first in self._first_id_at.values():
            if len(first) > 2 * self._max_over + 16:
                for t in [t for t in first if t < lo]:
                    del first[t]

    # -- evaluating ----------------------------------------------------------------------------
    def evaluate(
        self, now: float | None = None, final: bool = False, ended_at: float | None = None
    ) -> list[dict[str, Any]]:
        """Each threshold's result: `{expr, value, ok, abort, delay, over, unit, reason?}`.

        Live (`final=False`), a threshold with no data yet passes (with a reason); at the end it fails.
        """
        now = time.time() if now is None else float(now)
        if final:
            cutoff: int | None = None
            end = float(ended_at) if ended_at is not None else self._ended_at(now)
        else:
            cutoff = int(now) - LIVE_LAG_S
            end = cutoff + 1.0  # the end of the last complete second
        self._read_new(cutoff)
        cache: dict[tuple[str, int, int | None], list[dict[str, Any]]] = {}
        results = []
        for index, (threshold, whole) in enumerate(zip(self.thresholds, self._accs, strict=True)):
            if whole is not None:
                acc = whole
                seconds = end - self.started_at
            else:
                assert threshold.over is not None
                n = math.ceil(threshold.over)
                lo = math.ceil(end - n) if final else int(end) - n
                hi = None if final else int(end) - 1
                seconds = end - max(float(lo), self.started_at)
                acc = self._trailing(threshold, lo, hi, cache)
            value, reason = _value(threshold, acc, seconds, self._matched_before(index), final)
            results.append(self._result(threshold, value, reason, final))
        if self._max_over and cutoff is not None:
            self._prune(cutoff - self._max_over - 2)
        return results

    def _matched_before(self, index: int) -> set[str]:
        """The tables in which a threshold's selector matched a row of a complete second so far."""
        threshold = self.thresholds[index]
        ever = self._ever[index]
        for table in _tables(threshold):
            if table not in ever and any(
                _feeds(threshold, table, dict(zip(_KEY_FIELDS[table], key, strict=True)))
                for key in self._seen[table]
            ):
                ever.add(table)
        return ever

    def _trailing(
        self,
        threshold: Threshold,
        lo: int,
        hi: int | None,
        cache: dict[tuple[str, int, int | None], list[dict[str, Any]]],
    ) -> _Acc:
        acc = _Acc(threshold)
        for table in _tables(threshold):
            key = (table, lo, hi)
            if key not in cache:
                cache[key] = self._window_rows(table, lo, hi)
            for row in cache[key]:
                if not _feeds(threshold, table, row):
                    continue
                if table == "window":
                    acc.add_window(row)
                elif table == "metric":
                    acc.add_metric(row)
                else:
                    acc.add_health(row)
        return acc

    def _ended_at(self, now: float) -> float:
        run = self.store.get_run(self.run_id)
        if run is not None and run.ended_at:
            return float(run.ended_at)
        return self.store.last_activity(self.run_id) or now

    def _result(
        self, threshold: Threshold, value: float | None, reason: str | None, final: bool
    ) -> dict[str, Any]:
        result: dict[str, Any] = {
            "expr": threshold.expr,
            "value": None if value is None else _number(value, threshold.unit),
            "ok": threshold.passes(value) if value is not None else not final,
            "abort": threshold.abort,
            "delay": threshold.delay,
            "over": threshold.over,
            "unit": threshold.unit,
        }
        if reason is not None:
            if threshold.over is not None:
                reason += f" in the last {format_duration(threshold.over)}"
            result["reason"] = reason if final else f"no data yet: {reason}"
        return result


def _tables(threshold: Threshold) -> list[str]:
    """The tables a threshold reads."""
    tables = []
    if threshold.uses_windows:
        tables.append("window")
    if threshold.uses_metrics:
        tables.append("metric")
    if threshold.func == "dropped":
        tables.append("health")
    return tables


def _key(table: str, row: dict[str, Any]) -> tuple[str, ...]:
    """What decides whether a row feeds a threshold: (group, name), plus the type of a metric."""
    if table == "window":
        return (row["group"], row["name"])
    if table == "metric":
        return (row["group"], row["name"], row["type"])
    return (row["group"],)


_KEY_FIELDS = {"window": ("group", "name"), "metric": ("group", "name", "type"), "health": ("group",)}


def _feeds(threshold: Threshold, table: str, row: dict[str, Any]) -> bool:
    """Whether a stored row counts toward a threshold."""
    if table == "window":
        return threshold.uses_windows and _wants_window(threshold, row["group"], row["name"])
    if table == "metric":
        return threshold.uses_metrics and _wants_metric(threshold, row)
    return threshold.func == "dropped" and matches(threshold.group_glob, row["group"])


def failing_aborts(results: Iterable[dict[str, Any]], elapsed: float) -> dict[str, Any] | None:
    """The first abort-on-fail result that failed (with a value) once its delay has passed, else None."""
    for result in results:
        if (
            result.get("abort")
            and not result.get("ok")
            and result.get("value") is not None
            and elapsed >= float(result.get("delay") or 0.0)
        ):
            return result
    return None


# -- compatibility: evaluation from a summary dict (until the controller uses the evaluator) ------------

_SUMMARY_KEYS = {"mean": "mean_ms", "max": "max_ms", "count": "requests"}


def evaluate_all(thresholds: list[Threshold], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Deprecated: results from a run summary; only what the summary holds (exact scopes, whole run).

    Use `ThresholdEvaluator`, which reads the database and handles every function, glob and window.
    """
    results = []
    for threshold in thresholds:
        value, reason = _from_summary(threshold, summary)
        result: dict[str, Any] = {
            "expr": threshold.expr,
            "value": value,
            "ok": value is not None and threshold.passes(value),
            "abort": threshold.abort,
            "delay": threshold.delay,
            "over": threshold.over,
            "unit": threshold.unit,
        }
        if reason:
            result["reason"] = reason
        results.append(result)
    return results


def _from_summary(threshold: Threshold, summary: dict[str, Any]) -> tuple[float | None, str | None]:
    p = threshold.percentile
    key = f"p{p:g}_ms" if p is not None else _SUMMARY_KEYS.get(threshold.func, threshold.func)
    unsupported = (
        threshold.over is not None
        or threshold.func in ("min", "counter", "gauge")
        or any(c in (threshold.selector or "") for c in "*?")
    )
    if unsupported:
        return None, "needs ThresholdEvaluator (the database)"
    if threshold.group_glob is None:
        source = summary.get("totals")
    elif threshold.name_glob is None:
        source = (summary.get("group_totals") or {}).get(threshold.group_glob)
    else:
        source = next(
            (
                e
                for e in summary.get("endpoints") or []
                if e.get("group") == threshold.group_glob and e.get("name") == threshold.name_glob
            ),
            None,
        )
    if source is None:
        return None, f"no requests matched {threshold.selector}"
    value = source.get(key)
    if value is None:
        return None, f"the summary has no {key}"
    return float(value), None
