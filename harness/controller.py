"""The controller: one run from a validated profile to `summary.json` and an exit code.

It starts the profile's targets (embedded ones in their own supervised processes; external ones
checked), creates the run in the store, starts the collector and the supervisor, drives the
supervisor once a second until the duration ends, every group finishes, a signal arrives or an
abort threshold fails, then stops gracefully and writes the summary recomputed from the database.

Signal handlers only enqueue; the main loop decides (first Ctrl-C: graceful stop; second: now).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets as pysecrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.collector import Collector
from harness.errors import (
    EXIT_ABORTED,
    EXIT_BAD_INPUT,
    EXIT_PASSED,
    EXIT_THRESHOLDS_FAILED,
    HarnessError,
    TargetError,
    UsageError,
)
from harness.profile import LoadedProfile
from harness.remote import RemoteRun
from harness.report import summarize, write_summary
from harness.report.files import write_reports
from harness.store import Run, Store
from harness.supervisor import Supervisor, prepare_forkserver
from harness.targets import get_target
from harness.targets.runner import EmbeddedTarget, check_url
from harness.thresholds import ThresholdEvaluator, failing_aborts

log = logging.getLogger(__name__)

ABORT_CHECK_EVERY = 2.0
"""Seconds between live threshold evaluations (abort-on-fail ones stop the run when they fail)."""


@dataclass
class RunOptions:
    """How to run a profile (from the CLI or the panel)."""

    db_path: str | Path
    """A SQLite file, or a database URL (see harness.store)."""
    report_dir: Path | None = None
    view_mode: str = "quiet"
    """live | lines | quiet | none — the terminal view (none: not even the final summary)."""
    log_level: int = logging.INFO
    listeners: list[Any] = field(default_factory=list)
    """Extra callables that receive each live tick."""
    agent_hub: Any = None
    """The agents hub (`web.agents.AgentHub`) a profile with `agents:` takes its agents from."""


@dataclass
class RunResult:
    """What a finished run produced."""

    run_id: str
    status: str
    exit_code: int
    summary: dict[str, Any]
    report_dir: Path


class SecretFilter(logging.Filter):
    """Replaces secret values in log messages with `***`."""

    def __init__(self, secrets: set[str]) -> None:
        super().__init__()
        self.secrets = sorted(secrets, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            redacted = redact(message, self.secrets)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


def redact(text: str, secrets: list[str] | set[str]) -> str:
    """`text` with every secret replaced by `***`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class _RunLogHandler(logging.Handler):
    """Keeps the run's warnings and errors in the store (through the collector)."""

    def __init__(self, collector: Collector) -> None:
        super().__init__(logging.WARNING)
        self.collector = collector

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.collector.log_record(
                {
                    "t": record.created,
                    "level": record.levelname,
                    "source": record.name,
                    "message": record.getMessage(),
                }
            )
        except Exception:
            self.handleError(record)


def new_run_id() -> str:
    """A sortable, unique run id: `20261122-193205-a1b2`."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + pysecrets.token_hex(2)


def start_targets(
    loaded: LoadedProfile, db_path: str | Path | None = None, host: str = "127.0.0.1"
) -> tuple[dict[str, str], list[EmbeddedTarget]]:
    """Start embedded targets on `host` and check external ones; TargetError names the one that failed.

    A target that keeps data in the harness database (one whose config has a `db` field, e.g. `results`)
    gets the run's database `db_path` unless its config names another. A run on agents serves its
    embedded targets where it serves the hub, so that agents can reach them."""
    urls: dict[str, str] = {}
    started: list[EmbeddedTarget] = []
    try:
        for name, ref in loaded.profile.targets.items():
            if ref.embedded:
                kind = ref.kind or name
                config = ref.config()
                if db_path is not None and "db" in get_target(kind).config_model.model_fields:
                    config.setdefault("db", str(db_path))
                target = EmbeddedTarget(name, kind, config, port=ref.port, host=host)
                urls[name] = target.start(timeout=ref.start_timeout)
                started.append(target)
                log.info("target %s (%s) ready at %s", name, kind, urls[name])
            else:
                assert ref.url is not None
                url = ref.url.rstrip("/")
                check_url(name, url, ref.health, ref.start_timeout)
                urls[name] = url
    except BaseException:
        for target in started:
            target.stop()
        raise
    return urls, started


def compare_with_baseline(
    store: Store, run_id: str, profile: str, summary: dict[str, Any]
) -> dict[str, Any] | None:
    """Compare a finished run with its profile's marked baseline (`harness runs --mark-baseline`).

    The verdict goes into the summary and the log; it does not change the exit code — thresholds do.
    """
    from harness.compare import compare_summaries, run_summary

    baseline_id = store.get_baseline(profile)
    if baseline_id is None or baseline_id == run_id:
        return None
    try:
        result = compare_summaries(run_summary(store, baseline_id)["summary"], summary)
    except Exception:
        log.exception("could not compare with baseline %s", baseline_id)
        return None
    if result["regression"]:
        log.warning(
            "slower than baseline %s: %s (harness compare %s for the table)",
            baseline_id,
            "; ".join(str(r) for r in result["regressions"][:3]),
            run_id,
        )
    else:
        log.info("no regression against baseline %s", baseline_id)
    return {"run_id": baseline_id, "regression": result["regression"], "regressions": result["regressions"]}


class RunController:
    """One run of a profile. `run()` blocks (the CLI's main thread, or a panel's worker thread);
    `stop()` and `scale()` may be called from any thread: they only enqueue, the run's loop decides."""

    def __init__(self, loaded: LoadedProfile, options: RunOptions) -> None:
        self.loaded = loaded
        self.options = options
        self.run_id = new_run_id()
        """Known at once, before targets start, so a caller can follow the run."""
        self.status = "starting"
        """starting | running | stopping | passed | failed | aborted | error"""
        self.error: str | None = None
        """Why the run could not start (bad target, boot failure), if it could not."""
        self.result: RunResult | None = None
        self.done = threading.Event()
        self.supervisor: Supervisor | None = None
        self.collector: Collector | None = None
        self.started_at: float | None = None
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._listeners: list[Any] = list(options.listeners)
        self._stop_requested = False
        self._hurry = False

    def add_listener(self, listener: Any) -> None:
        """Receive every live tick (called from the collector's thread); add before `run()`."""
        self._listeners.append(listener)

    def stop(self, who: str = "operator", immediate: bool = False) -> None:
        """Ask the run to stop gracefully; a second request (or `immediate`) stops it at once."""
        if self._stop_requested or immediate:
            self._hurry = True
        self._stop_requested = True
        self._commands.put(("stop", who))

    def scale(self, group: str, value: float | None, who: str = "operator") -> None:
        """Hold a group at `value` users (closed) or iterations/s (open); None follows its shape again."""
        if group not in self.loaded.profile.groups:
            raise UsageError(f"no group {group!r} in profile {self.loaded.profile.name!r}")
        if value is not None and (value < 0 or value != value):
            raise UsageError(f"group {group!r}: users or rate must be a number >= 0, got {value!r}")
        self._commands.put(("scale", group, value, who))

    def run(self) -> RunResult:
        """Run to the end; HarnessError if it cannot start (the reason is also in `error`)."""
        try:
            self.result = self._run()
            return self.result
        except HarnessError as exc:
            self.status, self.error = "error", str(exc)
            raise
        except BaseException as exc:
            self.status, self.error = "error", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.done.set()

    def _next_command(self, supervisor: Supervisor, timeout: float) -> str | None:
        """Apply queued scale commands; returns who asked to stop, if someone did."""
        try:
            command = self._commands.get(timeout=timeout)
        except queue.Empty:
            return None
        while True:
            if command[0] == "stop":
                return str(command[1])
            _, group, value, who = command
            supervisor.scale(group, value, who)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return None

    def _run(self) -> RunResult:
        remote: RemoteRun | None = None
        if self.loaded.profile.agents is not None:
            remote = RemoteRun.take(
                self.options.agent_hub, self.run_id, self.loaded, cancelled=lambda: self._stop_requested
            )
        try:
            return self._run_with(remote)
        finally:
            if remote is not None:
                remote.end()

    def _run_with(self, remote: RemoteRun | None) -> RunResult:
        from harness.console import LiveView, print_summary

        loaded, options, run_id = self.loaded, self.options, self.run_id
        profile = loaded.profile
        store = Store(options.db_path)
        for old_id in store.recover_aborted():
            log.warning("run %s was left running by a controller that died: marked aborted", old_id)
        secret_filter = SecretFilter(loaded.secrets)
        root = logging.getLogger()
        for handler in root.handlers:
            handler.addFilter(secret_filter)

        prepare_forkserver(loaded)
        host = remote.hub.bind_host if remote is not None else "127.0.0.1"
        targets, embedded = start_targets(loaded, options.db_path, host=host)
        if remote is not None:
            remote.controller_targets = [t.name for t in embedded]
        # a kind name check for embedded targets happened in start_targets; keep the list for the panel
        _ = [get_target(ref.kind or name) for name, ref in profile.targets.items() if ref.embedded]

        report_dir = options.report_dir or Path("harness-data") / "runs" / run_id
        report_dir.mkdir(parents=True, exist_ok=True)
        started_at = time.time()
        store.create_run(
            Run(
                id=run_id,
                profile=profile.name,
                source=loaded.source,
                description=profile.description,
                started_at=started_at,
                duration_s=profile.duration,
                controller_pid=os.getpid(),
                host=socket.gethostname(),
                profile_json=json.dumps(loaded.raw, default=str),
            )
        )
        collector = Collector(store, run_id, started_at, profile.duration, loaded.secrets)
        run_handler = _RunLogHandler(collector)
        run_handler.addFilter(secret_filter)
        root.addHandler(run_handler)
        supervisor = Supervisor(
            run_id, loaded, targets, collector, store, str(report_dir), options.log_level, remote=remote
        )
        view = LiveView(
            run_id,
            profile.name,
            profile.duration,
            "quiet" if options.view_mode == "none" else options.view_mode,  # type: ignore[arg-type]
        )
        collector.listeners.append(view.update)
        collector.listeners.extend(self._listeners)
        self.supervisor, self.collector, self.started_at = supervisor, collector, started_at
        self.status = "running"
        status, reason = "running", ""
        thresholds = profile.parsed_thresholds()
        abort_thresholds = [t for t in thresholds if t.abort]
        evaluator = ThresholdEvaluator(thresholds, store, run_id, started_at)
        try:
            collector.event(
                "run_started",
                None,
                t=started_at,
                profile=profile.name,
                duration_s=profile.duration,
                targets=targets,
            )
            if remote is not None:
                remote.announce(collector)
            collector.start()
            supervisor.prepare()  # the groups' once-per-run set-up; a failure aborts below
            supervisor.start()
            view.start()
            next_abort_check = started_at + ABORT_CHECK_EVERY
            while True:
                now = time.time()
                supervisor.tick(now)
                if supervisor.fatal:
                    status, reason = "aborted", supervisor.fatal
                    log.error("%s", supervisor.fatal)
                    break
                for target in embedded:
                    if target.ensure_running():
                        collector.event("target_restarted", None, target=target.name, url=target.url)
                        log.warning("embedded target %s died and was restarted", target.name)
                if now - supervisor.started_at >= profile.duration:  # the clock starts after set-up
                    reason = "duration reached"
                    break
                if supervisor.all_finished:
                    reason = "every group finished"
                    break
                if thresholds and now >= next_abort_check:
                    next_abort_check = now + ABORT_CHECK_EVERY
                    live = evaluator.evaluate(now)
                    collector.live_thresholds = live
                    failed = failing_aborts(live, now - started_at) if abort_thresholds else None
                    if failed:
                        status = "failed"
                        reason = (
                            f"threshold failed: {failed['expr']} (value {failed['value']} {failed['unit']})"
                        )
                        collector.event(
                            "threshold_aborted",
                            None,
                            expr=failed["expr"],
                            value=failed["value"],
                            unit=failed["unit"],
                            over=failed["over"],
                            elapsed=round(now - started_at, 3),
                        )
                        log.error("aborting: %s", reason)
                        break
                stop = self._next_command(supervisor, timeout=max(0.05, 1.0 - (time.time() % 1.0)))
                if stop is None:
                    continue
                status, reason = "aborted", f"stopped by {stop}"
                log.warning(
                    "%s: stopping (grace %.0fs; stop again to stop at once)", reason, profile.stop_grace
                )
                break
            self.status = "stopping"
            collector.event("stopping", None, reason=reason)
            supervisor.stop(profile.stop_grace, immediate=self._hurry, hurry=lambda: self._hurry)
        finally:
            supervisor.finish()  # after the workers: stop what prepare_run launched, keep its evidence
            ended_at = time.time()
            collector.event("run_stopped", None, t=ended_at, reason=reason, users_max=supervisor.users_max())
            collector.stop()
            view.stop()
            root.removeHandler(run_handler)
            for target in embedded:
                target.stop()

        run_row = store.get_run(run_id)
        assert run_row is not None
        run_row.ended_at = ended_at
        summary = summarize(store, run_row)
        results = evaluator.evaluate(final=True, ended_at=ended_at)
        if status == "running":
            status = "passed" if all(r["ok"] for r in results) else "failed"
        exit_code = {"passed": EXIT_PASSED, "failed": EXIT_THRESHOLDS_FAILED}.get(status, EXIT_ABORTED)
        if status == "aborted" and supervisor.fatal_is_bad_input:
            exit_code = EXIT_BAD_INPUT
        summary.update(
            status=status, thresholds=results, reason=reason, report_dir=str(report_dir), exit_code=exit_code
        )
        summary["baseline"] = compare_with_baseline(store, run_id, profile.name, summary)
        # record the verdict first: a report that crashes or is interrupted must not leave the run "running"
        write_summary(summary, report_dir)
        store.update_run(
            run_id,
            status=status,
            ended_at=ended_at,
            exit_code=exit_code,
            reason=reason,
            summary_json=json.dumps(summary, default=str),
        )
        summary["reports"] = write_reports(store, run_id, summary, report_dir)
        write_summary(summary, report_dir)
        store.update_run(run_id, summary_json=json.dumps(summary, default=str))
        store.close()
        self.status = status
        if options.view_mode != "none":
            print_summary(summary)
        return RunResult(run_id, status, exit_code, summary, report_dir)


def run(loaded: LoadedProfile, options: RunOptions) -> RunResult:
    """Run a profile to the end in this (main) thread: SIGINT/SIGTERM/SIGHUP stop it, a second one at once."""
    controller = RunController(loaded, options)

    def on_signal(signum: int, _frame: Any) -> None:
        controller.stop(who=signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return controller.run()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["RunController", "RunOptions", "RunResult", "TargetError", "run", "start_targets"]
