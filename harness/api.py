"""The Python API: read recorded runs from a notebook or a script.

    import harness

    run = harness.open_run()                 # the newest run in $HARNESS_DB or ./harness-data/harness.db
    run = harness.open_run("20261122-2002", db="ci.db")   # a run id or a unique prefix of one
    run.summary()["totals"]["p95_ms"]
    df = run.frame(by="name", window=5)      # pandas DataFrame (a list of dicts without pandas)
    run.timeline(window_s=30)["degradation"]
    run.compare("baseline/summary.json")     # or another run id; None = the profile's marked baseline
    harness.list_runs()

Everything is recomputed from the database, so it works for any past run (and for a running one).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

from harness.errors import UsageError
from harness.store import Run, Store, db_arg, db_exists, default_db_path, redact_db


def _open_store(db: str | Path | None) -> Store:
    path = db_arg(db) if db is not None else default_db_path()
    if not db_exists(path):
        raise UsageError(f"no database at {redact_db(path)}: run `harness start` first, or pass db=")
    store = Store(path)
    store.recover_aborted()
    return store


def _run_dict(run: Run, baselines: dict[str, str]) -> dict[str, Any]:
    row = run.model_dump(exclude={"profile_json", "summary_json"})
    summary = json.loads(run.summary_json) if run.summary_json else {}
    row["totals"] = summary.get("totals") or {}
    row["baseline"] = baselines.get(run.profile) == run.id
    return row


def list_runs(db: str | Path | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Recorded runs, newest first: id, profile, status, started_at, ended_at, exit_code, reason, …,
    `totals` (from the summary written at the end, empty if the run never finished) and `baseline`
    (whether it is the marked baseline of its profile)."""
    store = _open_store(db)
    try:
        baselines = store.baselines()
        return [_run_dict(r, baselines) for r in store.list_runs(limit)]
    finally:
        store.close()


def open_run(run_id: str | None = None, db: str | Path | None = None) -> RunData:
    """A recorded run by id or unique id prefix (None: the newest run) in `db` (default `$HARNESS_DB`,
    else ./harness-data/harness.db). UsageError for an unknown run or a missing database."""
    store = _open_store(db)
    try:
        if run_id is None:
            runs = store.list_runs(1)
            if not runs:
                raise UsageError(f"no runs in {store.display}")
            run = runs[0]
        else:
            found = store.get_run(run_id)
            if found is None:
                raise UsageError(f"no run matches {run_id!r} in {store.display} (see `harness runs`)")
            run = found
    except BaseException:
        store.close()
        raise
    return RunData(store, run)


class RunData:
    """One recorded run. Use as a context manager, or call `close()`, to release the database."""

    def __init__(self, store: Store, run: Run) -> None:
        self.store = store
        self.run = run

    @property
    def id(self) -> str:
        """The run id."""
        return self.run.id

    @property
    def profile(self) -> str:
        """The profile's name."""
        return self.run.profile

    @property
    def status(self) -> str:
        """running | passed | failed | aborted."""
        return self.run.status

    def __repr__(self) -> str:
        return f"<RunData {self.id} profile={self.profile!r} status={self.status}>"

    def _stored_summary(self) -> dict[str, Any]:
        return json.loads(self.run.summary_json) if self.run.summary_json else {}

    def summary(self) -> dict[str, Any]:
        """The summary.json of the run, recomputed from its windows (with the threshold results it
        recorded at the end)."""
        from harness.report import summarize

        summary = summarize(self.store, self.run, self._stored_summary().get("thresholds"))
        summary["reason"] = self.run.reason
        return summary

    def frame(self, by: str = "name", window: int = 1) -> Any:
        """Per-second (or per-`window`) rows — t (epoch seconds), group, name, users, requests,
        failures, rps, failures_s, mean/min/max and p50/p90/p95/p99 in ms — for the whole run
        (`by="run"`), per group or per (group, name). A pandas DataFrame (with a `time` column of
        timestamps) when pandas is installed, else a list of dicts."""
        from harness.report import per_second

        rows = per_second(self.store, self.id, window=window, by=by)
        try:
            import pandas as pd
        except ImportError:
            return rows
        df = pd.DataFrame(rows)
        if not df.empty:
            df.insert(0, "time", pd.to_datetime(df["t"], unit="s", utc=True))
        return df

    def thresholds(self) -> list[dict[str, Any]]:
        """The threshold results recorded at the end of the run ({expr, value, ok, …}); empty for a
        run that never finished."""
        return list(self._stored_summary().get("thresholds") or [])

    def timeline(
        self, window_s: int = 60, max_failure_pct: float = 10.0, max_p95_ms: float = 10_000.0
    ) -> dict[str, Any]:
        """The timeline analysis (`harness.timeline.analyze_timeline`): rows per window, the
        degradation point and the capacity estimate."""
        from harness.timeline import analyze_timeline

        return analyze_timeline(self.store, self.id, window_s, max_failure_pct, max_p95_ms)

    def compare(self, baseline: str | None = None, **limits: float) -> dict[str, Any]:
        """Compare with a baseline run id or summary.json path (None: the baseline marked for this
        profile); `limits` are `harness.compare.Limits` fields (p95_pct, p99_pct, error_rate_pp,
        zero_floor_ms)."""
        from harness.compare import Limits, compare_runs

        return compare_runs(self.store, self.id, baseline, Limits(**limits))

    def errors(self) -> list[dict[str, Any]]:
        """Distinct errors, most frequent first: group, name, message, count, first_seen, last_seen."""
        return self.store.errors(self.id)

    def events(self) -> list[dict[str, Any]]:
        """The run's timeline of events: t (epoch), offset_s (since the start), type, group, detail."""
        return [{**e, "offset_s": round(e["t"] - self.run.started_at, 3)} for e in self.store.events(self.id)]

    def mark_baseline(self) -> None:
        """Make this run the baseline of its profile."""
        self.store.set_baseline(self.profile, self.id)

    def close(self) -> None:
        """Release the database."""
        self.store.close()

    def __enter__(self) -> RunData:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
