"""Thresholds: the expression language, and evaluation from a real store (live, incremental and final)."""

from __future__ import annotations

import fnmatch
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.metrics import new_histogram
from harness.report import summarize
from harness.store import Run, Store
from harness.thresholds import (
    Threshold,
    ThresholdEvaluator,
    evaluate_all,
    failing_aborts,
    matches,
    parse_threshold,
)

# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "func", "group", "name", "op", "limit", "unit", "over"),
    [
        ("p95 < 500", "p95", None, None, "<", 500.0, "ms", None),
        ("p95 < 500ms", "p95", None, None, "<", 500.0, "ms", None),
        ("p99 <= 5s", "p99", None, None, "<=", 5000.0, "ms", None),
        ("p50 > 1.5m", "p50", None, None, ">", 90000.0, "ms", None),
        ("p90 >= 250us", "p90", None, None, ">=", 0.25, "ms", None),
        ("p99.9 < 1m30s", "p99.9", None, None, "<", 90000.0, "ms", None),
        ("p100 == 7", "p100", None, None, "==", 7.0, "ms", None),
        ("P95 != 1e3", "p95", None, None, "!=", 1000.0, "ms", None),
        ("mean < 120ms", "mean", None, None, "<", 120.0, "ms", None),
        ("avg(api) < 120", "mean", "api", None, "<", 120.0, "ms", None),
        ("min(api) >= 1", "min", "api", None, ">=", 1.0, "ms", None),
        ("max(api.home) < 2 s", "max", "api", "home", "<", 2000.0, "ms", None),
        ("error_rate < 1%", "error_rate", None, None, "<", 0.01, "ratio", None),
        ("error_rate(browse) < 0.05", "error_rate", "browse", None, "<", 0.05, "ratio", None),
        ("error_rate <= 2.5 %", "error_rate", None, None, "<=", 0.025, "ratio", None),
        ("requests > 100", "requests", None, None, ">", 100.0, "count", None),
        ("count(participants.timeout) < 50", "count", "participants", "timeout", "<", 50.0, "count", None),
        ("failures(*.timeout) == 0", "failures", "*", "timeout", "==", 0.0, "count", None),
        ("rps(ingest.*) > 100", "rps", "ingest", "*", ">", 100.0, "rps", None),
        ("rps(ingest.*) > 100 over 60s", "rps", "ingest", "*", ">", 100.0, "rps", 60.0),
        ("p95(api) < 5s over 2m", "p95", "api", None, "<", 5000.0, "ms", 120.0),
        ("p95 < 5s OVER 90", "p95", None, None, "<", 5000.0, "ms", 90.0),
        ("dropped == 0", "dropped", None, None, "==", 0.0, "count", None),
        ("dropped(api) < 10", "dropped", "api", None, "<", 10.0, "count", None),
        ("counter(timeout_errors) < 50", "counter", None, "timeout_errors", "<", 50.0, "count", None),
        ("counter(api.sent) >= 1", "counter", "api", "sent", ">=", 1.0, "count", None),
        ("gauge(queue_depth) < 1000", "gauge", None, "queue_depth", "<", 1000.0, "value", None),
        ("gauge(*.temp) > -5.5", "gauge", "*", "temp", ">", -5.5, "value", None),
        # names hold spaces, dots, slashes and brackets; the group is what comes before the first dot
        ("p99(api.GET /json) < 3s", "p99", "api", "GET /json", "<", 3000.0, "ms", None),
        ("p99(api.v1.2/items [x]) < 3s", "p99", "api", "v1.2/items [x]", "<", 3000.0, "ms", None),
        ("failures(browse.(iteration)) < 5", "failures", "browse", "(iteration)", "<", 5.0, "count", None),
        ("p95( api . home )<5", "p95", "api", "home", "<", 5.0, "ms", None),
        ("p95(*.GET ?json) < 5", "p95", "*", "GET ?json", "<", 5.0, "ms", None),
        ("p95() < 5", "p95", None, None, "<", 5.0, "ms", None),
        ("p95 (a?i) < 5", "p95", "a?i", None, "<", 5.0, "ms", None),
        ("p95(x.a<b>) < 5", "p95", "x", "a<b>", "<", 5.0, "ms", None),
    ],
)
def test_parse(
    expr: str,
    func: str,
    group: str | None,
    name: str | None,
    op: str,
    limit: float,
    unit: str,
    over: float | None,
) -> None:
    t = parse_threshold(expr)
    assert (t.func, t.group_glob, t.name_glob, t.op, t.unit, t.over) == (func, group, name, op, unit, over)
    assert t.limit == pytest.approx(limit)
    assert t.expr == expr.strip()
    assert (t.abort, t.delay) == (False, 0.0)


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("", "empty threshold"),
        ("   ", "empty threshold"),
        ("< 5", "must start with a function"),
        ("latency < 5", "unknown function 'latency'"),
        ("p95_ms < 500", "the old form; write p95(...) < 500ms"),
        ("p95_ms[api/home] < 500", "the old form"),
        ("p(95) < 5000", "write the percentile in the name"),
        ("p0 < 5", "a percentile must be above 0 and at most 100"),
        ("p101 < 5", "a percentile must be above 0 and at most 100"),
        ("p95[api] < 5", "a selector goes in parentheses"),
        ("p95(api < 5", "'(' is never closed"),
        ("p95(.home) < 5", "empty group before '.'"),
        ("p95(api.) < 5", "empty name after '.'"),
        ("p95 <> 5", "unknown comparison '<>'"),
        ("p95 = 5", "unknown comparison '='"),
        ("p95 => 5", "unknown comparison '=>'"),
        ("p95 5", "expected a comparison"),
        ("p95", "expected a comparison (< <= > >= == !=) after p95, found 'nothing'"),
        ("p95 <", "expected a value after '<'"),
        ("p95 < abc", "cannot read the value 'abc'"),
        ("p95 < 5 parsecs", "cannot read the latency '5 parsecs'"),
        ("p95 < 5%", "p95 is a latency"),
        ("error_rate < 5", "error_rate is a ratio from 0 to 1: write 5% or 0.05"),
        ("error_rate < 5ms", "error_rate takes a ratio (0.01) or a percentage (1%)"),
        ("error_rate < 150%", "error_rate is a percentage from 0% to 100%"),
        ("rps > 5s", "rps takes a plain number, got '5s'"),
        ("count < 5%", "count takes a plain number"),
        ("rps > inf", "cannot read the value 'inf'"),
        ("p95 < 5 over", "'over' needs a duration such as 60s"),
        ("p95 < over 5s", "expected a value after '<'"),
        ("p95 < 5s over soon", "'over' needs a duration such as 60s or 5m, got 'soon'"),
        ("p95 < 5s over 500ms", "'over' needs at least 1s"),
        ("counter < 5", "counter needs a name"),
        ("gauge() < 5", "gauge() needs a name"),
        ("dropped(api.home) == 0", "dropped is counted per group"),
        ("gauge(q) < 5 over 1m", "a gauge is its last value; 'over' does not apply"),
    ],
)
def test_parse_rejects_with_one_clear_line(expr: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_threshold(expr)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    if expr.strip():
        assert repr(expr.strip()) in message  # names the expression


def test_unknown_function_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        parse_threshold("latency < 5")
    for func in ("p99.9", "mean", "avg", "min", "max", "error_rate", "requests", "count", "rps", "gauge"):
        assert func in str(info.value)


def test_abort_and_delay_and_a_frozen_value() -> None:
    t = parse_threshold("p95 < 500ms", abort=True, delay=30)
    assert t == Threshold("p95 < 500ms", "p95", None, None, "<", 500.0, "ms", None, True, 30.0)
    assert t.percentile == 95.0 and parse_threshold("p99.9 < 1").percentile == 99.9
    assert parse_threshold("mean < 1").percentile is None
    with pytest.raises(AttributeError):
        t.limit = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="delay"):
        parse_threshold("p95 < 1", delay=-1)


def test_globs_are_star_and_question_mark_only() -> None:
    assert matches(None, "anything")
    assert matches("ingest*", "ingest-2") and not matches("ingest*", "xingest")
    assert matches("GET ?json", "GET /json") and not matches("GET ?json", "GET //json")
    assert matches("items [x]", "items [x]") and not matches("items [x]", "items x")
    assert matches("a.b", "a.b") and not matches("a.b", "aXb")
    assert not matches("api", "API")


# -- a run in a real store -------------------------------------------------------------------------

T0 = 1_700_000_000
RUN = "run-1"
SECONDS = 10


@dataclass
class Rec:
    t: int
    group: str
    name: str
    ms: int
    ok: bool
    kind: str = "http"


def make_records(seed: int = 3) -> list[Rec]:
    rng = random.Random(seed)
    recs = []
    for s in range(SECONDS):
        t = T0 + s
        for _ in range(20):
            recs.append(Rec(t, "participants", "user_message", rng.randint(100, 9000), rng.random() > 0.05))
        for _ in range(30):
            recs.append(Rec(t, "api", "GET /json", rng.randint(1, 60), rng.random() > 0.02))
        for _ in range(10):
            recs.append(Rec(t, "api", "POST /echo", rng.randint(5, 400), True))
        for _ in range(40 + s * 5):  # ingest speeds up
            recs.append(Rec(t, "ingest", "v2.batch/upload", rng.randint(2, 30), True))
        if s in (2, 5):
            recs.append(Rec(t, "browse", "(iteration)", 0, False, kind="error"))
    return recs


def metric_rows() -> list[dict[str, Any]]:
    rows = []
    for s in range(SECONDS):
        t = T0 + s
        rows.append({"t": t, "group": "participants", "name": "timeout", "type": "counter", "value": 3.0})
        rows.append({"t": t, "group": "api", "name": "server_errors", "type": "counter", "value": 1.0})
        rows.append(
            {"t": t, "group": "participants", "name": "queue_depth", "type": "gauge", "value": float(s)}
        )
        if s in (1, 3):
            rows.append({"t": t, "group": "api", "name": "timeout_errors", "type": "counter", "value": 2.0})
        if s < 5:
            rows.append({"t": t, "group": "api", "name": "queue_depth", "type": "gauge", "value": 100.0})
    return rows


def health_rows() -> list[dict[str, Any]]:
    return [
        {"t": T0 + s + 0.5, "group": g, "worker": 0, "dropped": 1 if (g == "api" and s >= 8) else 0}
        for s in range(SECONDS)
        for g in ("participants", "api", "ingest")
    ]


def windows_of(recs: list[Rec]) -> list[dict[str, Any]]:
    per: dict[tuple[int, str, str], list[Rec]] = defaultdict(list)
    for r in recs:
        per[(r.t, r.group, r.name)].append(r)
    out = []
    for (t, group, name), items in sorted(per.items()):
        hist = new_histogram()
        for r in items:
            hist.record_value(max(1, r.ms * 1000))
        out.append(
            {
                "t": t,
                "group": group,
                "name": name,
                "kind": items[0].kind,
                "count": len(items),
                "failures": sum(not r.ok for r in items),
                "bytes_sent": 0,
                "bytes_received": 0,
                "hist": hist.encode(),
                "hist_intended": None,
            }
        )
    return out


def write_second(store: Store, t: int, recs: list[Rec], run_id: str = RUN) -> None:
    """Everything of second `t`, the way the collector writes it: one transaction."""
    store.write_second(
        run_id,
        windows_of([r for r in recs if r.t == t]),
        [],
        [m for m in metric_rows() if m["t"] == t],
        [],
        [h for h in health_rows() if int(h["t"]) == t],
        [],
        [],
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "harness.db")
    s.create_run(Run(id=RUN, profile="p", started_at=T0, ended_at=T0 + SECONDS))
    return s


@pytest.fixture
def recs() -> list[Rec]:
    return make_records()


@pytest.fixture
def full(store: Store, recs: list[Rec]) -> Store:
    for s in range(SECONDS):
        write_second(store, T0 + s, recs)
    return store


def evaluate(store: Store, *exprs: str, **kwargs: Any) -> list[dict[str, Any]]:
    evaluator = ThresholdEvaluator([parse_threshold(e) for e in exprs], store, RUN, T0)
    if "now" not in kwargs:
        kwargs.setdefault("final", True)
        kwargs.setdefault("ended_at", T0 + SECONDS)
    return evaluator.evaluate(**kwargs)


# -- truth, computed from the raw records ----------------------------------------------------------


def select(recs: list[Rec], group: str | None, name: str | None, lo: int = 0, hi: int = 2**62) -> list[Rec]:
    return [
        r
        for r in recs
        if lo <= r.t <= hi
        and (group is None or fnmatch.fnmatchcase(r.group, group))
        and (name is None or fnmatch.fnmatchcase(r.name, name))
    ]


def percentile(values_ms: list[int], p: float) -> float:
    """The recorded value at rank round(p% of n) (HdrHistogram's rank rule), in ms."""
    ordered = sorted(values_ms)
    rank = max(1, int(p * len(ordered) / 100 + 0.5))
    return float(ordered[rank - 1])


def truth(recs: list[Rec], func: str, group: str | None, name: str | None, seconds: float) -> float:
    chosen = select(recs, group, name)
    timed = [r.ms for r in chosen if r.kind != "error"]
    requests = len(timed)
    failures = sum(not r.ok for r in chosen)
    if func.startswith("p"):
        return percentile(timed, float(func[1:]))
    return {
        "mean": lambda: sum(timed) / len(timed),
        "min": lambda: float(min(timed)),
        "max": lambda: float(max(timed)),
        "error_rate": lambda: failures / requests,
        "requests": lambda: float(requests),
        "failures": lambda: float(failures),
        "rps": lambda: requests / seconds,
    }[func]()


@pytest.mark.parametrize(
    "expr",
    [
        "p50 < 1s",
        "p95 < 1s",
        "p99 < 1s",
        "p99.9 < 1s",
        "p95(participants.user_message) < 5s",
        "p99(participants.user_message) < 10s",
        "p90(api) < 50",
        "p95(api.GET /json) < 50ms",
        "p75(ingest.v2.batch/upload) < 50ms",
        "mean < 1s",
        "avg(api.POST /echo) < 1s",
        "min(api) < 1s",
        "max(participants) < 10s",
        "max(*.GET ?json) < 10s",
        "error_rate < 1%",
        "error_rate(participants) < 1%",
        "error_rate(api.GET /json) < 1%",
        "requests > 100",
        "requests(ingest.*) > 100",
        "count(api) > 100",
        "failures < 10",
        "failures(*.user_message) < 10",
        "rps > 100",
        "rps(ingest.*) > 100",
        "rps(a?i) > 100",
    ],
)
def test_final_values_match_the_raw_truth(full: Store, recs: list[Rec], expr: str) -> None:
    threshold = parse_threshold(expr)
    [result] = evaluate(full, expr)
    func = "requests" if threshold.func == "count" else threshold.func
    expected = truth(recs, func, threshold.group_glob, threshold.name_glob, SECONDS)
    tolerance = 1e-3 if threshold.unit == "ms" else 1e-6  # HdrHistogram: 3 significant digits
    assert result["value"] == pytest.approx(expected, rel=tolerance, abs=1e-3), result
    assert result["ok"] is threshold.passes(result["value"])
    assert result["unit"] == threshold.unit and result["over"] is None and result["abort"] is False
    assert "reason" not in result


def test_whole_run_values_agree_with_the_summary(full: Store) -> None:
    run = full.get_run(RUN)
    assert run is not None
    summary = summarize(full, run)
    totals = summary["totals"]
    results = evaluate(
        full, "requests > 0", "failures > 0", "error_rate < 1", "rps > 0", "p95 < 1", "max < 1"
    )
    assert [r["value"] for r in results] == [
        totals["requests"],
        totals["failures"],
        totals["error_rate"],
        totals["rps"],
        totals["p95_ms"],
        totals["max_ms"],
    ]
    endpoint = next(e for e in summary["endpoints"] if e["name"] == "GET /json")
    [p99, rate] = evaluate(full, "p99(api.GET /json) < 1", "error_rate(api.GET /json) < 1")
    assert (p99["value"], rate["value"]) == (endpoint["p99_ms"], endpoint["error_rate"])
    # failed iterations count as failures of their group but not as requests
    assert summary["group_totals"]["browse"]["failures"] == 2
    [browse_failures, browse_requests] = evaluate(full, "failures(browse) == 2", "requests(browse) == 0")
    assert browse_failures["value"] == 2 and browse_requests["value"] == 0
    assert browse_failures["ok"] and browse_requests["ok"]


def test_only_failed_iterations(full: Store) -> None:
    rate, p95 = evaluate(full, "error_rate(browse) < 1%", "p95(browse) < 1s")
    assert (rate["value"], rate["ok"]) == (1.0, False)  # nothing but failures: everything failed
    assert (p95["value"], p95["ok"]) == (None, False)
    assert p95["reason"] == "only failed iterations matched browse: no timed requests"


def test_count_falls_back_to_a_counter(full: Store) -> None:
    results = evaluate(
        full,
        "count(participants.timeout) < 50",  # no request named timeout: the counter (3/s × 10 s)
        "count(timeout_errors) < 50",  # a counter name in any group
        "count(*.server_errors) < 5",
        "count(api) > 0",  # requests match: requests, not counters
        "count(nothing.here) < 1",  # never counted: 0 at the end
    )
    assert [r["value"] for r in results[:3]] == [30, 4, 10]
    assert [r["ok"] for r in results[:3]] == [True, True, False]
    assert results[3]["value"] == 400
    assert (results[4]["value"], results[4]["ok"]) == (0, True)
    assert results[4]["reason"] == "no requests or counter matched nothing.here: counted as 0"
    assert all(r["unit"] == "count" for r in results)
    # without a selector, count is every request: no counter stands in for missing requests
    store = Store(full.path.parent / "counters-only.db")
    store.write_second(
        RUN, [], [], [{"t": T0, "group": "g", "name": "c", "type": "counter", "value": 5.0}], [], [], [], []
    )
    [bare] = evaluate(store, "count < 100")
    assert (bare["value"], bare["ok"], bare["reason"]) == (None, False, "no requests recorded")
    [live] = evaluate(full, "count(nothing.here) > 1", now=T0 + 30)
    assert (live["value"], live["ok"]) == (None, True)  # while live: no data yet, not a failure


def test_counters_and_gauges(full: Store) -> None:
    results = evaluate(
        full,
        "counter(timeout) == 30",
        "counter(participants.timeout) == 30",
        "counter(api.timeout) == 0",
        "counter(*_errors) == 14",
        "gauge(queue_depth) == 109",  # each group's last value, summed: 9 + 100 (api stopped at s=4)
        "gauge(participants.queue_depth) == 9",
        "gauge(timeout) == 0",  # a counter is not a gauge
        "counter(timeout) == 9 over 3s",
        "counter(timeout_errors) == 0 over 3s",  # it counted earlier, not in the last 3 s: 0
    )
    values = [r["value"] for r in results]
    assert values == [30, 30, 0, 14, 109.0, 9.0, None, 9, 0]
    assert [r["ok"] for r in results] == [True, True, True, True, True, True, False, True, True]
    # a counter is stored only when it counts: one never seen counted nothing
    assert results[2]["reason"] == "no counter matched api.timeout: counted as 0"
    assert results[6]["reason"] == "no gauge matched timeout"
    assert results[4]["unit"] == "value"
    assert "reason" not in results[8]


def test_gauge_seconds_split_across_flushes_add_up(store: Store) -> None:
    for value in (2.0, 5.0):  # two workers' gauges of the same second, written by two flushes
        store.write_second(
            RUN,
            [],
            [],
            [{"t": T0, "group": "g", "name": "q", "type": "gauge", "value": value}],
            [],
            [],
            [],
            [],
        )
    assert evaluate(store, "gauge(q) == 7")[0]["value"] == 7.0


def test_dropped(full: Store) -> None:
    results = evaluate(full, "dropped == 0", "dropped(api) < 1", "dropped(ingest) == 0", "dropped(nope) == 0")
    assert [r["value"] for r in results] == [2, 2, 0, None]
    assert [r["ok"] for r in results] == [False, False, True, False]
    assert results[3]["reason"] == "no worker of nope reported"
    assert evaluate(full, "dropped(api) == 0 over 1s")[0]["value"] == 1


def test_trailing_window_at_the_end_is_the_last_seconds(full: Store, recs: list[Rec]) -> None:
    last3 = select(recs, "participants", "user_message", lo=T0 + 7)
    whole = select(recs, "participants", "user_message")
    p95_last, p95_whole, rps_last, rps_whole = evaluate(
        full,
        "p95(participants.user_message) < 5s over 3s",
        "p95(participants.user_message) < 5s",
        "rps(ingest.*) > 100 over 3s",
        "rps(ingest.*) > 100",
    )
    assert p95_last["value"] == pytest.approx(percentile([r.ms for r in last3], 95), rel=1e-3)
    assert p95_whole["value"] == pytest.approx(percentile([r.ms for r in whole], 95), rel=1e-3)
    assert p95_last["over"] == 3.0 and p95_whole["over"] is None
    ingest_last3 = len(select(recs, "ingest", None, lo=T0 + 7))
    assert rps_last["value"] == pytest.approx(ingest_last3 / 3, abs=1e-3)
    assert rps_whole["value"] == pytest.approx(len(select(recs, "ingest", None)) / SECONDS, abs=1e-3)
    assert rps_last["value"] > rps_whole["value"]  # ingest sped up


def test_trailing_window_live_is_the_last_complete_seconds(full: Store, recs: list[Rec]) -> None:
    now = T0 + 7.4  # complete: t <= T0 + 5; the window of 3 s is T0+3 .. T0+5
    rps, requests, whole = evaluate(
        full, "rps(ingest.*) > 0 over 3s", "requests(ingest) > 0 over 3s", "requests(ingest) > 0", now=now
    )
    in_window = len(select(recs, "ingest", None, lo=T0 + 3, hi=T0 + 5))
    assert requests["value"] == in_window
    assert rps["value"] == pytest.approx(in_window / 3, abs=1e-3)
    assert whole["value"] == len(select(recs, "ingest", None, hi=T0 + 5))
    # early in a run the window reaches back before the start: rps divides by the seconds run
    [early] = evaluate(full, "rps(ingest) > 0 over 60s", now=T0 + 3.5)  # complete: T0, T0+1
    assert early["value"] == pytest.approx(len(select(recs, "ingest", None, hi=T0 + 1)) / 2, abs=1e-3)


def test_an_empty_trailing_window_after_data_counts_zero(store: Store, recs: list[Rec]) -> None:
    for s in range(5):  # the api stops answering after 5 s; ingest goes on
        write_second(store, T0 + s, recs)
    for s in range(5, SECONDS):
        write_second(store, T0 + s, [r for r in recs if r.group != "api"])
    exprs = [
        "rps(api) > 10 over 3s",
        "requests(api) > 0 over 3s",
        "failures(api) == 0 over 3s",
        "count(api.*) > 0 over 3s",
        "p95(api) < 1s over 3s",
        "error_rate(api) < 1% over 3s",
        "rps(nothing) > 10 over 3s",
    ]
    final = evaluate(store, *exprs)
    assert [r["value"] for r in final] == [0.0, 0, 0, 0, None, None, None]
    assert [r["ok"] for r in final] == [False, False, True, False, False, False, False]
    assert final[4]["reason"] == "no requests matched api in the last 3s"
    live = evaluate(store, *exprs, now=T0 + SECONDS + 1.5)  # complete: up to T0+9
    assert [r["value"] for r in live] == [0.0, 0, 0, 0, None, None, None]
    assert [r["ok"] for r in live] == [False, False, True, False, True, True, True]  # a stall fails live


def test_live_whole_run_rps_divides_by_the_complete_seconds(full: Store, recs: list[Rec]) -> None:
    [rps] = evaluate(full, "rps(api) > 0", now=T0 + 6.9)  # complete seconds T0 .. T0+4: 5 s
    assert rps["value"] == pytest.approx(len(select(recs, "api", None, hi=T0 + 4)) / 5, abs=1e-3)


ALL_EXPRS = [
    "p95(participants.user_message) < 5s",
    "p99 < 10s",
    "mean(api) < 30",
    "min < 5",
    "max(ingest.*) < 1s",
    "error_rate < 5%",
    "requests(api) > 0",
    "count(participants.timeout) < 50",
    "failures < 100",
    "rps(ingest.*) > 50",
    "dropped == 0",
    "counter(server_errors) < 50",
    "gauge(queue_depth) < 200",
    "p95(participants.user_message) < 5s over 4s",
    "rps(ingest.*) > 50 over 2s",
    "error_rate(api) < 5% over 5s",
    "count(timeout_errors) < 50 over 3s",
    "dropped(api) == 0 over 2s",
]


def test_incremental_evaluation_equals_one_shot(store: Store, recs: list[Rec]) -> None:
    thresholds = [parse_threshold(e) for e in ALL_EXPRS]
    incremental = ThresholdEvaluator(thresholds, store, RUN, T0)
    for s in range(SECONDS):
        write_second(store, T0 + s, recs)
        for now in (T0 + s + 0.2, T0 + s + 0.9):  # live calls, sometimes twice within a second
            live = incremental.evaluate(now)
            fresh = ThresholdEvaluator(thresholds, store, RUN, T0).evaluate(now)
            assert live == fresh, now
    final = incremental.evaluate(final=True, ended_at=T0 + SECONDS)
    one_shot = ThresholdEvaluator(thresholds, store, RUN, T0).evaluate(final=True, ended_at=T0 + SECONDS)
    assert final == one_shot
    assert all(r["value"] is not None for r in final), final


def test_each_row_is_read_once(full: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluator = ThresholdEvaluator([parse_threshold(e) for e in ALL_EXPRS[:13]], full, RUN, T0)
    read: list[int] = []
    original = full.rows

    def counting(sql: str, **params: Any) -> list[dict[str, Any]]:
        rows = original(sql, **params)
        read.append(len(rows))
        return rows

    monkeypatch.setattr(full, "rows", counting)
    first = evaluator.evaluate(T0 + 20)
    assert sum(read) == len(full.windows(RUN)) + len(metric_rows()) + len(health_rows())
    read.clear()
    assert evaluator.evaluate(T0 + 20.5) == first
    assert sum(read) == 0  # nothing new was stored: nothing read


def test_late_rows_of_an_old_second_still_count(store: Store, recs: list[Rec]) -> None:
    for s in range(SECONDS):
        write_second(store, T0 + s, recs)
    evaluator = ThresholdEvaluator([parse_threshold("requests(api) > 0")], store, RUN, T0)
    before = evaluator.evaluate(T0 + 30)[0]["value"]
    late = [Rec(T0 + 1, "api", "GET /json", 5, True)] * 3  # a slow worker's batch of an old second
    store.write_second(RUN, windows_of(late), [], [], [], [], [], [])
    assert evaluator.evaluate(T0 + 31)[0]["value"] == before + 3


def test_incomplete_seconds_wait_while_live(store: Store, recs: list[Rec]) -> None:
    for s in range(SECONDS):
        write_second(store, T0 + s, recs)
    evaluator = ThresholdEvaluator([parse_threshold("requests(api) > 0")], store, RUN, T0)
    [live] = evaluator.evaluate(T0 + 5.5)  # complete: t <= T0 + 3
    assert live["value"] == len(select(recs, "api", None, hi=T0 + 3))
    [final] = evaluator.evaluate(final=True, ended_at=T0 + SECONDS)
    assert final["value"] == len(select(recs, "api", None))


def test_no_data_is_ok_while_live_but_fails_at_the_end(store: Store) -> None:
    exprs = ["p95(api.*) < 1s", "error_rate < 1%", "rps > 1", "gauge(depth) > 0", "p95 < 1s over 10s"]
    live = evaluate(store, *exprs, now=T0 + 30)
    assert all(r["ok"] is True and r["value"] is None for r in live), live
    assert live[0]["reason"] == "no data yet: no requests matched api.*"
    assert live[4]["reason"] == "no data yet: no requests recorded in the last 10s"
    final = evaluate(store, *exprs)
    assert all(r["ok"] is False and r["value"] is None for r in final), final
    assert [r["reason"] for r in final] == [
        "no requests matched api.*",
        "no requests recorded",
        "no requests recorded",
        "no gauge matched depth",
        "no requests recorded in the last 10s",
    ]
    assert failing_aborts(live, 100) is None


def test_a_selector_that_never_matches_fails_at_the_end(full: Store) -> None:
    [result] = evaluate(full, "p95(checkout) < 1s")
    assert (result["value"], result["ok"], result["reason"]) == (None, False, "no requests matched checkout")


def test_abort_only_after_its_delay(full: Store) -> None:
    thresholds = [
        parse_threshold("p99 < 10s", abort=True),  # passes
        parse_threshold("error_rate(participants) < 1%", abort=True, delay=30),  # fails, after 30 s
        parse_threshold("p50 < 1ms"),  # fails, but does not abort
        parse_threshold("p95(checkout) < 1s", abort=True),  # no data yet: never an abort
    ]
    results = ThresholdEvaluator(thresholds, full, RUN, T0).evaluate(T0 + 20)
    assert [r["ok"] for r in results] == [True, False, False, True]
    assert [r["abort"] for r in results] == [True, True, False, True]
    assert results[1]["delay"] == 30.0
    assert failing_aborts(results, elapsed=29.9) is None
    failed = failing_aborts(results, elapsed=30)
    assert failed is not None and failed["expr"] == "error_rate(participants) < 1%"
    assert failed["value"] > 0.01


def test_runs_do_not_mix(full: Store, recs: list[Rec]) -> None:
    full.create_run(Run(id="other", profile="p", started_at=T0))
    write_second(full, T0, recs, run_id="other")
    [mine] = evaluate(full, "requests(api) > 0")
    assert mine["value"] == len(select(recs, "api", None))
    other = ThresholdEvaluator([parse_threshold("requests(api) > 0")], full, "other", T0)
    assert other.evaluate(final=True, ended_at=T0 + 1)[0]["value"] == len(select(recs, "api", None, hi=T0))


def test_final_without_ended_at_uses_the_run_row(full: Store, recs: list[Rec]) -> None:
    evaluator = ThresholdEvaluator([parse_threshold("rps(api) > 0")], full, RUN, T0)
    [result] = evaluator.evaluate(final=True)
    assert result["value"] == pytest.approx(len(select(recs, "api", None)) / SECONDS, abs=1e-3)


# -- the seed systems' thresholds, in this syntax --------------------------------------------------

SEEDS = [
    # k6 (LLM engine): http_req_duration p(95)<5000 over all requests; http_req_failed rate<0.05
    ("p95 < 5000", False),
    ("error_rate < 0.05", True),
    # k6: user_message_duration p(95)<5000, p(99)<10000 — one named operation
    ("p95(participants.user_message) < 5000", False),
    ("p99(*.user_message) < 10s", True),
    # k6 counters: timeout_errors count<50, server_errors count<50
    ("count(timeout_errors) < 50", True),
    ("count(server_errors) < 50", True),
    ("counter(server_errors) < 5", False),
    # Locust/mlop: P95_THRESHOLD_MS=500, P99_THRESHOLD_MS=1000, MAX_ERROR_RATE=0.01
    ("p95(ingest) < 500ms", True),
    ("p99(ingest) < 1000", True),
    ("error_rate(ingest) <= 1%", True),
]


@pytest.mark.parametrize(("expr", "ok"), SEEDS)
def test_seed_thresholds_parse_and_evaluate(full: Store, expr: str, ok: bool) -> None:
    [result] = evaluate(full, expr)
    assert result["value"] is not None, result
    assert result["ok"] is ok, result


# -- compatibility with the summary-based API ------------------------------------------------------


def test_evaluate_all_from_a_summary(full: Store) -> None:
    run = full.get_run(RUN)
    assert run is not None
    summary = summarize(full, run)
    thresholds = [
        parse_threshold("p95 < 5s"),
        parse_threshold("error_rate(api) < 1%", abort=True),
        parse_threshold("p99(api.GET /json) < 1s"),
        parse_threshold("p50(x.y) < 1"),
        parse_threshold("p95(api.*) < 1s"),
    ]
    results = evaluate_all(thresholds, summary)
    assert [r["value"] for r in results[:3]] == [
        summary["totals"]["p95_ms"],
        summary["group_totals"]["api"]["error_rate"],
        next(e["p99_ms"] for e in summary["endpoints"] if e["name"] == "GET /json"),
    ]
    assert results[1]["abort"] is True
    assert (results[3]["value"], results[3]["ok"]) == (None, False)
    assert (results[4]["value"], results[4]["reason"]) == (None, "needs ThresholdEvaluator (the database)")
    assert evaluate_all([], summary) == []
