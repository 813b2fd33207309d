"""The collector: the only database writer of a run.

Workers' batches arrive (through the supervisor's pipe reader) with `submit`; once a second the
collector merges them per (second, group, name), writes windows, errors, metrics, data points,
health, events and logs in one transaction, and hands a live `tick` to its listeners (the terminal
view, the panel). A tick is computed from what was stored, over the last `LIVE_WINDOW` seconds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from harness.metrics import counts_as_failure, counts_as_request, merge_into, new_histogram, percentiles_ms
from harness.store import Store

log = logging.getLogger(__name__)

LIVE_WINDOW = 5
"""Seconds over which live rps and percentiles are computed."""

Tick = dict[str, Any]


class Collector:
    """Merges worker batches and writes them once a second."""

    def __init__(
        self, store: Store, run_id: str, started_at: float, duration: float, secrets: set[str] | None = None
    ) -> None:
        self.store = store
        self.secrets = sorted(secrets or (), key=len, reverse=True)
        """Values that must never be written: replaced with *** in error messages, logs and events."""
        self.run_id = run_id
        self.started_at = started_at
        self.duration = duration
        self.listeners: list[Callable[[Tick], None]] = []
        self.group_state: Callable[[], dict[str, dict[str, Any]]] = dict
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recent: dict[tuple[str, str], deque[tuple[int, int, int, bytes]]] = defaultdict(
            lambda: deque(maxlen=LIVE_WINDOW * 3)
        )
        self._kinds: dict[tuple[str, str], str] = {}
        self._totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self._health: dict[str, dict[str, Any]] = {}
        self._dropped_total = 0
        self._recent_errors: deque[dict[str, Any]] = deque(maxlen=20)
        self.last_tick: Tick | None = None
        self.live_thresholds: list[dict[str, Any]] = []
        """The latest live threshold verdicts (set by the controller), shown with each tick."""
        self.write_failures = 0

    # -- input (any thread) ----------------------------------------------------------------
    def submit(self, group: str, worker: int, batch: dict[str, Any]) -> None:
        """A worker's batch."""
        self._inbox.put(("batch", (group, worker, batch)))

    def event(self, type_: str, group: str | None = None, t: float | None = None, **detail: Any) -> None:
        """Put an event on the run's timeline."""
        self._inbox.put(("event", {"t": t or time.time(), "type": type_, "group": group, "detail": detail}))

    def log_record(self, entry: dict[str, Any]) -> None:
        """Keep a warning or error with the run."""
        self._inbox.put(("log", entry))

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the once-a-second writer thread."""
        self._thread = threading.Thread(target=self._loop, name="collector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write everything still queued and stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            # flush a little after each second boundary, once workers have shipped that second
            now = time.time()
            self._stop.wait(1.0 - (now % 1.0) + 0.25)
            if self._stop.is_set():
                break
            try:
                self.flush()
            except Exception:  # never let one bad second kill the writer; it is logged and counted
                self.write_failures += 1
                log.exception("collector failed to write a second")

    # -- the work --------------------------------------------------------------------------
    def flush(self) -> Tick | None:
        """Drain the inbox, write it in one transaction and emit a tick."""
        merged: dict[tuple[int, str, str], dict[str, Any]] = {}
        errors: dict[tuple[str, str, str], dict[str, Any]] = {}
        metrics: dict[tuple[int, str, str, str], dict[str, Any]] = {}
        datapoints: list[dict[str, Any]] = []
        health: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        logs: list[dict[str, Any]] = []
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "event":
                events.append(item)
            elif kind == "log":
                logs.append({**item, "message": self._redact(item["message"])})
            elif kind == "forget":
                self._health.pop(item, None)
            else:
                group, worker, batch = item
                self._merge_batch(group, worker, batch, merged, errors, metrics, datapoints, health, events)
        windows = []
        for (t, group, name), w in merged.items():
            hist = w.pop("_hist", None)
            if hist is not None:
                w["hist"] = hist.encode()
            hist_i = w.pop("_hist_intended", None)
            if hist_i is not None:
                w["hist_intended"] = hist_i.encode()
            windows.append({"t": t, "group": group, "name": name, **w})
            self._recent[(group, name)].append((t, w["count"], w["failures"], w["hist"]))
            totals = self._totals[(group, name)]
            totals[0] += w["count"]
            totals[1] += w["failures"]
            self._kinds[(group, name)] = w["kind"]
        if self.secrets:
            for entry in errors.values():
                entry["message"] = self._redact(entry["message"])
            for item in (*events, *datapoints):
                for key in ("detail", "values"):
                    if key in item:
                        item[key] = self._redact_data(item[key])
        if any((windows, errors, metrics, datapoints, health, events, logs)):
            self.store.write_second(
                self.run_id,
                windows,
                list(errors.values()),
                list(metrics.values()),
                datapoints,
                health,
                events,
                logs,
            )
        tick = self._tick()
        # the timeline's new moments ride along, so a live view needs no polling for its markers
        tick["events"] = [
            {"t": e["t"], "type": e["type"], "group": e.get("group"), "detail": e.get("detail") or {}}
            for e in events
        ]
        self.last_tick = tick
        for listener in list(self.listeners):
            try:
                listener(tick)
            except Exception:
                log.exception("a live-tick listener failed")
        return tick

    def _merge_batch(
        self,
        group: str,
        worker: int,
        batch: dict[str, Any],
        merged: dict[tuple[int, str, str], dict[str, Any]],
        errors: dict[tuple[str, str, str], dict[str, Any]],
        metrics: dict[tuple[int, str, str, str], dict[str, Any]],
        datapoints: list[dict[str, Any]],
        health: list[dict[str, Any]],
        events: list[dict[str, Any]],
    ) -> None:
        for w in batch.get("windows", []):
            key = (w["t"], group, w["name"])
            have = merged.get(key)
            if have is None:
                merged[key] = {
                    "kind": w["kind"],
                    "count": w["count"],
                    "failures": w["failures"],
                    "bytes_sent": w["bytes_sent"],
                    "bytes_received": w["bytes_received"],
                    "hist": w["hist"],
                    "hist_intended": w["hist_intended"],
                }
            else:
                # a second of the same name from another worker: merge the histograms exactly
                for field in ("count", "failures", "bytes_sent", "bytes_received"):
                    have[field] += w[field]
                for field in ("hist", "hist_intended"):
                    if w[field] is None:
                        continue
                    live = have.get(f"_{field}")
                    if live is None:
                        live = have[f"_{field}"] = new_histogram()
                        merge_into(live, have[field])
                    merge_into(live, w[field])
            for message, count in (w.get("errors") or {}).items():
                ekey = (group, w["name"], message)
                entry = errors.get(ekey)
                if entry is None:
                    errors[ekey] = {
                        "group": group,
                        "name": w["name"],
                        "message": message,
                        "count": count,
                        "t": w["t"],
                    }
                    self._recent_errors.append(errors[ekey])
                else:
                    entry["count"] += count
                    entry["t"] = max(entry["t"], w["t"])
        for m in batch.get("metrics", []):
            mkey = (m["t"], group, m["name"], m["type"])
            if mkey in metrics and m["type"] == "counter":
                metrics[mkey]["value"] += m["value"]
            elif mkey in metrics and m["type"] == "gauge":
                metrics[mkey]["value"] += m["value"]  # gauges of one group add up across its workers
            else:
                metrics[mkey] = {
                    "t": m["t"],
                    "group": group,
                    "name": m["name"],
                    "type": m["type"],
                    "value": m["value"],
                }
        for d in batch.get("datapoints", []):
            datapoints.append({"group": group, **d})
        for e in batch.get("events", []):
            events.append({"group": group, **e})
        h = batch.get("health")
        if h:
            row = {"group": group, "worker": worker, **h}
            health.append(row)
            self._health[f"{group}#{worker}"] = row
            self._dropped_total += int(h.get("dropped", 0))

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def _redact_data(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._redact(value)
        if isinstance(value, dict):
            return {k: self._redact_data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._redact_data(v) for v in value]
        return value

    def forget_worker(self, group: str, worker: int) -> None:
        """Drop a stopped worker from the live health view."""
        self._inbox.put(("forget", f"{group}#{worker}"))

    # -- live view -------------------------------------------------------------------------
    def _tick(self) -> Tick:
        now = time.time()
        last_complete = int(now) - 1
        since = last_complete - LIVE_WINDOW + 1
        elapsed = max(0.0, now - self.started_at)
        span = max(1.0, min(float(LIVE_WINDOW), elapsed))
        endpoints = []
        groups: dict[str, dict[str, Any]] = {}
        group_hists: dict[str, Any] = {}
        total_hist = new_histogram()
        for (group, name), recent in sorted(self._recent.items()):
            hist = new_histogram()
            count = failures = 0
            for t, c, f, encoded in recent:
                if since <= t <= last_complete:
                    count += c
                    failures += f
                    merge_into(hist, encoded)
            p = percentiles_ms(hist, (50, 95, 99))
            kind = self._kinds.get((group, name), "request")
            if counts_as_request(kind) and hist.get_total_count():
                group_hists.setdefault(group, new_histogram()).add(hist)
                total_hist.add(hist)
            total_requests, total_failures = self._totals[(group, name)]
            endpoints.append(
                {
                    "group": group,
                    "name": name,
                    "kind": kind,
                    "rps": count / span,
                    "errors_per_s": failures / span,
                    "p50_ms": p[50],
                    "p95_ms": p[95],
                    "p99_ms": p[99],
                    "requests": total_requests,
                    "failures": total_failures,
                }
            )
            g = groups.setdefault(group, {"rps": 0.0, "errors_per_s": 0.0, "requests": 0, "failures": 0})
            if counts_as_request(kind):
                g["rps"] += count / span
                g["requests"] += total_requests
            if counts_as_failure(kind):
                g["errors_per_s"] += failures / span
                g["failures"] += total_failures
        state = self.group_state()
        for name, info in state.items():
            g = groups.setdefault(name, {"rps": 0.0, "errors_per_s": 0.0, "requests": 0, "failures": 0})
            g.update(info)
        for name, g in groups.items():
            gp = percentiles_ms(group_hists[name], (50, 95, 99)) if name in group_hists else None
            g.update({f"p{q}_ms": (gp[q] if gp else 0.0) for q in (50, 95, 99)})
            g["users"] = sum(
                h.get("users", 0) for k, h in self._health.items() if k.rsplit("#", 1)[0] == name
            )
        workers = list(self._health.values())
        total_requests = sum(g["requests"] for g in groups.values())
        total_failures = sum(g["failures"] for g in groups.values())
        tp = percentiles_ms(total_hist, (50, 95, 99))
        return {
            "t": now,
            "elapsed": elapsed,
            "duration": self.duration,
            "groups": groups,
            "endpoints": endpoints,
            "totals": {
                "requests": total_requests,
                "failures": total_failures,
                "rps": sum(g["rps"] for g in groups.values()),
                "error_rate": total_failures / total_requests if total_requests else 0.0,
                "p50_ms": tp[50],
                "p95_ms": tp[95],
                "p99_ms": tp[99],
            },
            "health": {
                "workers": len(workers),
                "cpu_max": max((h.get("cpu_percent", 0.0) for h in workers), default=0.0),
                "loop_lag_max_ms": max((h.get("loop_lag_max_ms", 0.0) for h in workers), default=0.0),
                "rss_mb": sum(h.get("rss_bytes", 0) for h in workers) / 1e6,
                "dropped": self._dropped_total,
            },
            "errors": list(self._recent_errors)[-5:],
            "thresholds": list(self.live_thresholds),
        }
