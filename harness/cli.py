"""The command line: `python -m harness COMMAND` (or `harness COMMAND`).

Exit codes: 0 passed, 1 thresholds failed, 2 bad input (profile, flags, unreachable target at
start), 3 aborted or internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import __version__
from harness.durations import format_duration, parse_duration
from harness.errors import EXIT_ABORTED, EXIT_BAD_INPUT, HarnessError, UsageError

if TYPE_CHECKING:
    from harness.store import Store

log = logging.getLogger("harness")

EPILOG = """exit codes: 0 passed, 1 thresholds failed, 2 bad input, 3 aborted or internal error
docs: README.md; profiles: `harness profiles`; one target alone: `harness target echo`"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Multi-process simulation harness: run a load profile, watch it live, keep every second.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="controller and worker log level (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    start = sub.add_parser(
        "start",
        help="run a profile",
        description="Run a profile until its duration ends.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    start.add_argument(
        "--profile",
        "-p",
        required=True,
        metavar="NAME_OR_PATH",
        help="a built-in profile name (see `harness profiles`) or a YAML file",
    )
    start.add_argument(
        "--headless",
        action="store_true",
        help="no web panel (default: serve the panel on 127.0.0.1:8089 and keep it up after the run); "
        "a profile with agents: still serves the hub agents connect to on --host/--port for the run",
    )
    start.add_argument(
        "--duration", "-d", metavar="DURATION", help="override the profile's duration (30s, 2m, 1h)"
    )
    start.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile field, e.g. --set groups.browse.users=20 (repeatable)",
    )
    _db_arg(start)
    start.add_argument(
        "--report-dir",
        type=Path,
        metavar="DIR",
        help="where summary.json goes (default ./harness-data/runs/<run_id>/)",
    )
    start.add_argument(
        "--quiet", "-q", action="store_true", help="no live view: only the final summary (CI logs)"
    )
    _panel_args(start)

    serve = sub.add_parser(
        "serve",
        help="serve the web panel (start runs, watch them live, history, comparison)",
        description=(
            "Serve the web panel until Ctrl-C. It binds 127.0.0.1 unless --host says otherwise; any\n"
            "other address needs a token (--token or HARNESS_TOKEN). In production use gunicorn:\n"
            "  gunicorn --worker-class gthread -w 1 --threads 100 -b 127.0.0.1:8089 'web:create_app()'\n"
            "Several panel processes act as one panel when they share HARNESS_MESSAGE_QUEUE (a Redis\n"
            "URL; harness[scale-out]), HARNESS_SECRET_KEY, the token and the database: each shows and\n"
            "controls every process's active run (see the README, 'Several panel processes')."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _panel_args(serve)
    _db_arg(serve)

    profiles = sub.add_parser("profiles", help="list built-in profiles, simulators and targets")
    profiles.add_argument("--json", action="store_true", help="machine-readable output")

    validate = sub.add_parser("validate", help="check a profile without running it")
    validate.add_argument("profile", metavar="NAME_OR_PATH")
    validate.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    runs = sub.add_parser("runs", help="list recorded runs, newest first")
    _db_arg(runs)
    runs.add_argument("--limit", "-n", type=int, default=20)
    runs.add_argument("--json", action="store_true")
    runs.add_argument(
        "--mark-baseline",
        metavar="RUN",
        help="mark RUN as the baseline of its profile (what `harness compare RUN2` compares RUN2 with)",
    )

    show = sub.add_parser("show", help="the summary of one run (recomputed from the database)")
    show.add_argument("run_id", metavar="RUN", help="a run id or a unique prefix of one")
    _db_arg(show)
    show.add_argument("--json", action="store_true", help="print summary JSON")

    compare = sub.add_parser(
        "compare",
        help="compare a run with a baseline: exit 1 on a regression",
        description=(
            "Compare a run with a baseline, per endpoint (group/name) and in total: p95, p99, error\n"
            "rate and requests/s. A regression is p95 or p99 up by more than --p95/--p99 percent of\n"
            "the baseline, or the error rate up by more than --error-rate percentage points. A zero\n"
            "baseline p95/p99 has no relative change: only a current value above --zero-floor counts.\n"
            "Endpoints in only one of the runs are listed as added or removed, never as regressions."
        ),
        epilog="exit codes: 0 no regression, 1 regression, 2 bad input (unknown run, bad file or flag)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("run_id", metavar="RUN", help="a run id (or unique prefix), or a summary.json")
    compare.add_argument(
        "--baseline",
        "-b",
        metavar="RUN_OR_SUMMARY_JSON",
        help="a run id (or unique prefix) or a summary.json (default: the run marked with "
        "`harness runs --mark-baseline` for RUN's profile)",
    )
    compare.add_argument("--p95", default="20%", metavar="PCT", help="allowed p95 rise (default 20%%)")
    compare.add_argument("--p99", default="20%", metavar="PCT", help="allowed p99 rise (default 20%%)")
    compare.add_argument(
        "--error-rate",
        default="5",
        metavar="PP",
        help="allowed error-rate rise in percentage points (default 5)",
    )
    compare.add_argument(
        "--zero-floor",
        default="1ms",
        metavar="DURATION",
        help="with a zero baseline p95/p99, a regression only above this (default 1ms)",
    )
    _db_arg(compare)
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON")

    timeline = sub.add_parser(
        "timeline",
        help="find where a run degraded, and the users at that point",
        description=(
            "Cut a run into windows; per window: users, requests, failures, failure %, p50, p95, "
            "timeouts. The degradation point is the first window with failures above "
            "--max-failure-pct or p95 above --max-p95; the capacity estimate is 80-100% of its users."
        ),
    )
    timeline.add_argument("run_id", metavar="RUN", help="a run id or a unique prefix of one")
    timeline.add_argument("--window", "-w", default="60s", metavar="DURATION", help="window (default 60s)")
    timeline.add_argument(
        "--max-failure-pct", default="10", metavar="PCT", help="failures above this degrade (default 10%%)"
    )
    timeline.add_argument(
        "--max-p95", default="10s", metavar="DURATION", help="p95 above this degrades (default 10s)"
    )
    _db_arg(timeline)
    timeline.add_argument("--json", action="store_true", help="print the analysis as JSON")

    report = sub.add_parser(
        "report",
        help="write a run's report: html, csv, json (summary.json) or junit",
        description=(
            "Write a report of a recorded run, recomputed from the database. --out is a file, or a "
            "folder (default: the run's report folder) for summary.json, report.html, junit.xml or "
            "stats.csv + stats_history.csv + failures.csv."
        ),
    )
    report.add_argument("run_id", metavar="RUN", help="a run id or a unique prefix of one")
    report.add_argument(
        "--format", "-f", choices=["html", "csv", "json", "junit"], default="html", help="default html"
    )
    report.add_argument("--out", "-o", type=Path, metavar="PATH", help="output file or folder")
    report.add_argument(
        "--window",
        default="auto",
        metavar="DURATION",
        help="timeline window of the html report (default: auto, at most 60 windows)",
    )
    _db_arg(report)

    genie = sub.add_parser(
        "genie",
        help="Databricks Genie tools: export a space's conversations for replay",
        description="Databricks Genie tools (needs pip install 'harness[genie]').",
    )
    genie_sub = genie.add_subparsers(dest="genie_command", metavar="SUBCOMMAND", required=True)
    export = genie_sub.add_parser(
        "export",
        help="export a Genie space's conversations to YAML (the replayer's input)",
        description="Export a Genie space's conversations, through databricks-sdk, to the YAML the genie "
        "simulator replays. Auth: DATABRICKS_HOST and DATABRICKS_TOKEN, a .databrickscfg profile, or "
        "the Databricks CLI's login; --host overrides the host.",
        epilog="example: harness genie export --space-id 01ef... --from 7d -o conversations.yaml",
    )
    export.add_argument("--space-id", required=True, metavar="ID", help="the Genie space")
    export.add_argument(
        "--include-all", action="store_true", help="every user's conversations (needs CAN MANAGE)"
    )
    export.add_argument(
        "--from", dest="from_", metavar="WHEN", help="created since: 7d, 24h, 30m, 1w, ISO, date"
    )
    export.add_argument("--to", metavar="WHEN", help="created until (same forms)")
    export.add_argument("--max-conversations", type=int, metavar="N", help="stop after N conversations")
    export.add_argument(
        "-o", "--output", type=Path, default=Path("conversations.yaml"), help="default conversations.yaml"
    )
    export.add_argument("--host", help="workspace URL (default: DATABRICKS_HOST / the profile)")
    export.add_argument("--databricks-profile", metavar="NAME", help="a .databrickscfg profile")
    export.add_argument(
        "--retry-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up on an unreachable host after this long (default 10; the SDK's own is 300)",
    )

    agent = sub.add_parser(
        "agent",
        help="run workers for a controller on another machine",
        description=(
            "Connect to a controller and run the workers it places here, until Ctrl-C or SIGTERM (then the\n"
            "workers stop gracefully, what they recorded is handed over, and the agent exits 0).\n"
            "\n"
            "The controller is `harness start` of a profile with `agents:` (headless too: it serves the hub\n"
            "on --host/--port) or `harness serve`; its panel address is the hub. Off loopback the panel\n"
            "needs a token, and agents present the same one (--token or $HARNESS_TOKEN). A profile asks:\n"
            "  agents: {min: 2, wait: 60s, names: [], labels: [], local: false,\n"
            "           on_lost: move, lost_timeout: 30s, joining: spare}\n"
            "  min/wait      agents needed before the run starts, and how long to wait (fewer: exit 2)\n"
            "  names/labels  only agents with one of these --name values / --labels\n"
            "  local         also run workers on the controller's machine\n"
            "  on_lost       an agent away longer than lost_timeout: move its workers to an agent that came\n"
            "                during the run, else its share to the others (move); or fail the run (fail)\n"
            "  joining       an agent that connects mid-run: a spare for a lost one (spare), or (grow) it\n"
            "                gets `processes` workers of each running group at once and users are re-split\n"
            "A run takes every free agent that matches when it starts. Each group's `processes` is its\n"
            "workers on EACH agent, placed only on agents that have the group's simulator; users or rate\n"
            "are split by each agent's --processes. Embedded targets listen where the controller serves\n"
            "the hub; each agent reaches them at its --controller host.\n"
            "\n"
            "The agent says what it offers (cores, memory, processes, simulators that import here,\n"
            "open-file limit, versions), measures its clock offset to the controller (timestamps are\n"
            "corrected by it), and reports every second. Everything its workers send is kept until the\n"
            "controller has it (up to 100,000 messages or 256 MB; beyond that the oldest are dropped and\n"
            "counted): after a dropped connection the agent reconnects by itself and delivers what was\n"
            "recorded meanwhile. An agent silent for 3.5 s is `disconnected` (its workers are paused), and\n"
            "`lost` after lost_timeout."
        ),
        epilog=(
            "example: HARNESS_TOKEN=... harness agent --controller http://10.0.0.5:8089 --name a1\n"
            "exit codes: 0 stopped by Ctrl-C/SIGTERM; 2 bad input (a bad flag, or the controller\n"
            "refused the agent: 'controller refused the agent: unauthorized' for a wrong or missing\n"
            "token). An unreachable controller is retried until it answers."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    agent.add_argument(
        "--controller",
        required=True,
        metavar="URL",
        help="the controller's panel address, e.g. http://10.0.0.5:8089",
    )
    agent.add_argument("--token", metavar="TOKEN", help="the controller's token (default $HARNESS_TOKEN)")
    agent.add_argument("--name", metavar="NAME", help="this agent's name (default: the host name)")
    agent.add_argument(
        "--labels", default="", metavar="A,B", help="labels a profile can select agents by (agents.labels)"
    )
    agent.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="how many workers this agent offers: its weight when users are split (default: its cores)",
    )
    agent.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="where the workers' run files go, as DIR/runs/<run_id> (default ./harness-agent)",
    )

    target = sub.add_parser(
        "target",
        help="run an embedded reference target on its own",
        description="Run an embedded reference target in the foreground until Ctrl-C.",
    )
    target.add_argument("name", help="target kind, e.g. echo")
    target.add_argument("--port", type=int, default=8080)
    target.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    target.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a service-model setting, e.g. --set concurrency=4 --set service_time=20ms",
    )
    return parser


def _db_value(text: str) -> str | Path:
    from harness.store import db_arg

    return db_arg(text)


def _db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        type=_db_value,
        metavar="PATH|URL",
        help="SQLite database file, or a shared PostgreSQL database by URL "
        "(postgresql://user:pass@host/db, needs harness[store-postgres]); "
        "default $HARNESS_DB, else ./harness-data/harness.db",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return port


def _panel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="panel address (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8089, help="panel port (default 8089; 0: any free one)")
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help="require this token in the panel (default $HARNESS_TOKEN); needed on a non-loopback --host",
    )


def _setup_logging(level: str) -> None:
    import os

    import rich
    from rich.logging import RichHandler

    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        rich.reconfigure(width=120)  # CI logs: wide enough for the summary tables
    width = None if sys.stderr.isatty() or "COLUMNS" in os.environ else 120

    from rich.console import Console

    handler = RichHandler(
        console=Console(stderr=True, width=width),
        show_path=False,
        rich_tracebacks=False,
        markup=False,
        log_time_format="%H:%M:%S",
    )
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    for noisy in ("aiohttp.access", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_BAD_INPUT
    _setup_logging(args.log_level)
    try:
        handler = globals()[f"cmd_{args.command}"]
        return int(handler(args))
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return EXIT_ABORTED


def cmd_start(args: argparse.Namespace) -> int:
    """`harness start`."""
    from rich.console import Console

    from harness.console import choose_mode
    from harness.controller import RunOptions, run
    from harness.profile import load_profile
    from harness.store import default_db_path

    overrides = list(args.overrides)
    if args.duration is not None:
        try:
            parse_duration(args.duration)
        except ValueError as exc:
            raise UsageError(f"--duration: {exc}") from None
        overrides.append(f"duration={args.duration}")
    loaded = load_profile(args.profile, overrides)
    view_mode = choose_mode(args.quiet, Console(stderr=False))
    if not args.headless:
        return _start_with_panel(args, loaded, view_mode)
    options = RunOptions(
        db_path=args.db or default_db_path(),
        report_dir=args.report_dir,
        view_mode=view_mode,
        log_level=getattr(logging, args.log_level),
    )
    if loaded.profile.agents is not None:
        # agents connect to the panel's server: serve it (no browser needed) for the run's length
        with _Panel(args) as panel:
            options.agent_hub = panel.app.extensions["harness_agents"]
            return run(loaded, options).exit_code
    result = run(loaded, options)
    return result.exit_code


def cmd_agent(args: argparse.Namespace) -> int:
    """`harness agent --controller URL`."""
    import os

    from harness.agent import run_agent

    if not args.controller.startswith(("http://", "https://")):
        raise UsageError(f"--controller: expected an http:// or https:// address, got {args.controller!r}")
    if args.processes is not None and args.processes < 1:
        raise UsageError("--processes: expected a number >= 1")
    token = args.token or os.environ.get("HARNESS_TOKEN") or None
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    return run_agent(args.controller, token, args.name, labels, args.processes, args.work_dir)


class _Panel:
    """The web panel served from a background thread of the CLI; signals only enqueue (STYLE 5)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import os

        from harness.store import default_db_path
        from web.security import check_bind

        self.token = args.token or os.environ.get("HARNESS_TOKEN") or None
        check_bind(args.host, self.token)
        from web import create_app, make_server, panel_url

        self.app = create_app(
            {"HARNESS_DB": str(args.db or default_db_path()), "TOKEN": self.token, "HOST": args.host}
        )
        self.server = make_server(self.app, args.host, args.port)
        self.url = panel_url(args.host, self.server.port)
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Panel:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, lambda signum, _frame: self.signals.put(signum))
        threading.Thread(target=self.server.serve_forever, name="panel", daemon=True).start()
        print(f"panel: {self.url}", flush=True)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.app.extensions["harness_runs"].shutdown(who="panel shutdown")
        self.server.shutdown()
        self.server.server_close()
        for sig, old in self._previous.items():
            signal.signal(sig, old)

    def next_signal(self, timeout: float | None = None) -> str | None:
        """The name of the next signal received, or None after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            try:
                # short waits: the main thread must get back to the interpreter to run signal handlers
                return signal.Signals(self.signals.get(timeout=max(0.0, wait))).name
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return None


def _start_with_panel(args: argparse.Namespace, loaded: Any, view_mode: str) -> int:
    """`harness start` with the panel: the run goes through the panel's RunManager, so the page shows
    it; after the run the panel keeps serving until Ctrl-C; the exit code is the run's."""
    with _Panel(args) as panel:
        manager = panel.app.extensions["harness_runs"]
        manager.log_level = getattr(logging, args.log_level)
        run_id = manager.start(loaded, who="cli", report_dir=args.report_dir, view_mode=view_mode)
        record = manager.get(run_id)
        controller = record.controller
        while not controller.done.is_set():
            name = panel.next_signal(timeout=0.5)
            if name is not None:
                controller.stop(who=name)  # the first: graceful; a second: at once
        if record.thread is not None:
            record.thread.join()
        exit_code = record.exit_code if record.exit_code is not None else EXIT_ABORTED
        if controller.error:
            print(f"harness: error: {controller.error}", file=sys.stderr, flush=True)
        print(
            f"run {run_id} {controller.status} (exit code {exit_code}); the panel keeps serving at "
            f"{panel.url} — Ctrl-C to exit",
            flush=True,
        )
        panel.next_signal()
    return exit_code


def cmd_serve(args: argparse.Namespace) -> int:
    """`harness serve`: the panel until Ctrl-C (a run still active is stopped gracefully first)."""
    with _Panel(args) as panel:
        name = panel.next_signal()
        log.info("%s: stopping the panel", name)
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    """`harness profiles`."""
    import yaml

    from harness.profile import builtin_profiles
    from harness.simulator import registered_simulators
    from harness.targets import TARGETS

    profiles = {}
    for name, path in sorted(builtin_profiles().items()):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            data = {}
        profiles[name] = {"description": str(data.get("description", "")).strip(), "path": str(path)}
    simulators = registered_simulators()
    targets = {name: kind.description for name, kind in TARGETS.items()}
    if args.json:
        print(json.dumps({"profiles": profiles, "simulators": simulators, "targets": targets}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("profile", "description", title="built-in profiles", title_justify="left")
    for name, info in profiles.items():
        table.add_row(name, info["description"].splitlines()[0] if info["description"] else "")
    console.print(table)
    console.print("simulators: " + ", ".join(f"{n} ({v})" for n, v in sorted(simulators.items())))
    console.print("embedded targets: " + ", ".join(sorted(targets)))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """`harness validate`."""
    from harness.profile import load_profile

    loaded = load_profile(args.profile, args.overrides)
    profile = loaded.profile
    groups = ", ".join(
        f"{name} ({g.simulator}, {g.mode}, {g.processes} proc)" for name, g in profile.groups.items()
    )
    print(
        f"{loaded.source}: ok — profile {profile.name!r}, {format_duration(profile.duration)}, "
        f"groups: {groups}"
    )
    return 0


def _open_store(db: str | Path | None) -> Store:
    """An existing database, with runs left by dead controllers marked aborted."""
    from harness.store import Store, db_exists, default_db_path, is_db_url

    path = db or default_db_path()
    if not (db_exists(path) if is_db_url(path) else Path(path).exists()):
        raise UsageError(f"no database at {path}: run `harness start` first or pass --db")
    store = Store(path)
    store.recover_aborted()
    return store


def cmd_runs(args: argparse.Namespace) -> int:
    """`harness runs`."""
    store = _open_store(args.db)
    if args.mark_baseline:
        run = store.get_run(args.mark_baseline)
        if run is None:
            store.close()
            raise UsageError(f"no run matches {args.mark_baseline!r} (see `harness runs`)")
        store.set_baseline(run.profile, run.id)
        store.close()
        print(f"run {run.id} is now the baseline of profile {run.profile!r}")
        if run.status != "passed":
            print(f"note: that run's status is {run.status}")
        return 0
    rows = store.list_runs(args.limit)
    baselines = store.baselines()
    store.close()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        **r.model_dump(exclude={"profile_json", "summary_json"}),
                        "baseline": baselines.get(r.profile) == r.id,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    import rich
    from rich.table import Table

    table = Table(
        "run", "profile", "status", "started", "duration", "requests", "p95 ms", "errors", "baseline"
    )
    for r in rows:
        summary: dict[str, Any] = json.loads(r.summary_json) if r.summary_json else {}
        totals = summary.get("totals", {})
        ended = r.ended_at or time.time()
        table.add_row(
            r.id,
            r.profile,
            r.status,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at)),
            format_duration(ended - r.started_at),
            str(totals.get("requests", "")),
            f"{totals['p95_ms']:.1f}" if "p95_ms" in totals else "",
            f"{totals['error_rate'] * 100:.2f}%" if "error_rate" in totals else "",
            "★" if baselines.get(r.profile) == r.id else "",
        )
    rich.get_console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """`harness show RUN`."""
    from harness.console import print_summary
    from harness.report import summarize

    store = _open_store(args.db)
    run = store.get_run(args.run_id)
    if run is None:
        raise UsageError(f"no run matches {args.run_id!r} (see `harness runs`)")
    stored = json.loads(run.summary_json) if run.summary_json else {}
    summary = summarize(store, run, stored.get("thresholds"))
    summary["reason"] = run.reason
    store.close()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary)
    return 0


def _percent(value: str, flag: str) -> float:
    """A non-negative number of percent (or percentage points): `20%`, `20`, `5pp`."""
    text = value.strip().lower().removesuffix("%").removesuffix("pp").strip()
    try:
        number = float(text)
    except ValueError:
        raise UsageError(f"{flag}: expected a percentage such as 20% or 5, got {value!r}") from None
    if not number >= 0 or number == float("inf"):
        raise UsageError(f"{flag}: expected a percentage >= 0, got {value!r}")
    return number


def _duration(value: str, flag: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _window(value: str, flag: str) -> int:
    seconds = _duration(value, flag)
    if seconds < 1 or not float(seconds).is_integer():
        raise UsageError(f"{flag}: expected a whole number of seconds >= 1, such as 10s or 1m, got {value!r}")
    return int(seconds)


def cmd_compare(args: argparse.Namespace) -> int:
    """`harness compare RUN [--baseline RUN_OR_SUMMARY_JSON]`: exit 1 on a regression."""
    from harness.compare import Limits, compare_runs, looks_like_file, print_comparison

    limits = Limits(
        p95_pct=_percent(args.p95, "--p95"),
        p99_pct=_percent(args.p99, "--p99"),
        error_rate_pp=_percent(args.error_rate, "--error-rate"),
        zero_floor_ms=_duration(args.zero_floor, "--zero-floor") * 1000,
    )
    refs = [args.run_id] + ([args.baseline] if args.baseline else [])
    needs_db = args.baseline is None or not all(looks_like_file(r) for r in refs)
    store = _open_store(args.db) if needs_db else None
    try:
        result = compare_runs(store, args.run_id, args.baseline, limits)
    finally:
        if store is not None:
            store.close()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print_comparison(result)
    return 1 if result["regression"] else 0


def cmd_timeline(args: argparse.Namespace) -> int:
    """`harness timeline RUN`: the per-window table and the degradation point."""
    from harness.report.csv import resolve_run
    from harness.timeline import analyze_timeline, describe

    window = _window(args.window, "--window")
    max_failure_pct = _percent(args.max_failure_pct, "--max-failure-pct")
    max_p95_ms = _duration(args.max_p95, "--max-p95") * 1000
    store = _open_store(args.db)
    try:
        run = resolve_run(store, args.run_id)
        result = analyze_timeline(store, run.id, window, max_failure_pct, max_p95_ms)
    finally:
        store.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    import rich
    from rich.table import Table

    console = rich.get_console()
    table = Table(
        "time (s)", "users", "reqs", "fails", "fail %", "p50 ms", "p95 ms", "timeouts",
        title=f"run {result['run_id']}: {window}s windows", title_justify="left",
    )  # fmt: skip
    for col in table.columns:
        col.justify = "right"
    degradation = result["degradation"]
    for row in result["rows"]:
        bad = row["failure_pct"] > max_failure_pct or row["p95_ms"] > max_p95_ms
        first = degradation is not None and row["t"] == degradation["t"]
        table.add_row(
            f"{row['t']}",
            f"{row['users']}",
            f"{row['requests']}",
            f"{row['failures']}",
            f"{row['failure_pct']:.1f}",
            f"{row['p50_ms']:,.1f}",
            f"{row['p95_ms']:,.1f}",
            f"{row['timeouts']}",
            style="bold red" if first else "red" if bad else None,
        )
    console.print(table)
    if not result["rows"]:
        console.print("no requests were recorded in this run")
    for line in describe(result):
        console.print(line, style="bold red" if degradation else "green", highlight=False)
    if not result["timeouts_exact"]:
        console.print(
            "note: timeouts spanning several windows are spread over them by each window's failures",
            style="dim",
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`harness report RUN --format html|csv|json|junit [--out PATH]`."""
    from harness.compare import run_summary

    store = _open_store(args.db)
    try:
        side = run_summary(store, args.run_id)
        run_id, summary = side["run_id"], side["summary"]
        run = store.get_run(run_id)
        assert run is not None
        stored = json.loads(run.summary_json) if run.summary_json else {}
        for key in ("report_dir", "exit_code"):
            if key in stored:
                summary.setdefault(key, stored[key])
        folder = store.path.parent / "runs" / run_id
        if stored.get("report_dir"):
            folder = Path(stored["report_dir"])
        names = {"html": "report.html", "json": "summary.json", "junit": "junit.xml"}

        def target(default_name: str) -> Path:
            out: Path | None = args.out
            if out is None:
                return folder / default_name
            return out if out.suffix and not out.is_dir() else out / default_name

        written: list[Path] = []
        if args.format == "csv":
            from harness.report.csv import write_csv_reports

            written = write_csv_reports(store, run_id, args.out if args.out is not None else folder)
        elif args.format == "json":
            path = target(names["json"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
            written = [path]
        elif args.format == "junit":
            from harness.report.junit import write_junit

            written = [write_junit(summary, target(names["junit"]))]
        else:
            try:
                from harness.report.html import write_html
            except ModuleNotFoundError as exc:
                if exc.name != "harness.report.html":
                    raise
                raise UsageError(
                    "the HTML report is not part of this version yet: use --format json, csv or junit"
                ) from None
            from harness.timeline import analyze_timeline, auto_window

            window = (
                auto_window(float(summary.get("duration_s") or 0))
                if args.window == "auto"
                else _window(args.window, "--window")
            )
            timeline = analyze_timeline(store, run_id, window)
            path = target(names["html"])
            path.parent.mkdir(parents=True, exist_ok=True)
            result = write_html(store, run_id, path, summary=summary, timeline=timeline)
            written = [Path(result) if isinstance(result, str | Path) else path]
    finally:
        store.close()
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_genie(args: argparse.Namespace) -> int:
    """`harness genie export`: a space's conversations to YAML, with a progress bar."""
    from harness.errors import MissingExtraError

    try:
        from simulators.genie import conversations as conv
        from simulators.genie.client import workspace_client
    except ModuleNotFoundError as exc:
        raise MissingExtraError("genie", exc.name or "databricks-sdk", "genie") from None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if args.max_conversations is not None and args.max_conversations < 1:
        raise UsageError("--max-conversations: expected a number >= 1")
    try:
        from_ms = conv.parse_when(args.from_) if args.from_ else None
        to_ms = conv.parse_when(args.to) if args.to else None
    except ValueError as exc:
        raise UsageError(f"--from/--to: {exc}") from None
    client = workspace_client(args.host, None, args.databricks_profile, args.retry_timeout, connections=4)
    host = client.config.host
    stderr = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    ) as progress:
        task = progress.add_task(
            f"exporting space {args.space_id}", total=args.max_conversations, detail="listing"
        )

        def advance(listed: int, exported: int, messages: int) -> None:
            progress.update(
                task,
                completed=exported if args.max_conversations else None,
                detail=f"{exported} conversations, {messages} messages ({listed} listed)",
            )

        try:
            document = conv.export_conversations(
                client,
                args.space_id,
                include_all=args.include_all,
                from_ms=from_ms,
                to_ms=to_ms,
                max_conversations=args.max_conversations,
                on_progress=advance,
            )
        except Exception as exc:
            raise UsageError(conv.explain_error(exc, host, args.space_id, args.include_all)) from None
    conv.write_conversations(document, args.output)
    print(
        f"exported {document['total_conversations']} conversations, {document['total_messages']} messages "
        f"from space {args.space_id} to {args.output}"
    )
    return 0


def cmd_target(args: argparse.Namespace) -> int:
    """`harness target NAME`."""
    import yaml

    from harness.targets.runner import run_foreground

    config: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected key=value")
        config[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the target will be reachable from other machines", args.host)
    return run_foreground(args.name, config, args.host, args.port)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
