"""The command line: `python -m harness COMMAND` (or `harness COMMAND`).

Exit codes: 0 passed, 1 thresholds failed, 2 bad input (profile, flags, unreachable target at
start), 3 aborted or internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
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
        help="no web panel: live view in the terminal (the panel is not built yet, so always)",
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

    profiles = sub.add_parser("profiles", help="list built-in profiles, simulators and targets")
    profiles.add_argument("--json", action="store_true", help="machine-readable output")

    validate = sub.add_parser("validate", help="check a profile without running it")
    validate.add_argument("profile", metavar="NAME_OR_PATH")
    validate.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    runs = sub.add_parser("runs", help="list recorded runs, newest first")
    _db_arg(runs)
    runs.add_argument("--limit", "-n", type=int, default=20)
    runs.add_argument("--json", action="store_true")

    show = sub.add_parser("show", help="the summary of one run (recomputed from the database)")
    show.add_argument("run_id", metavar="RUN", help="a run id or a unique prefix of one")
    _db_arg(show)
    show.add_argument("--json", action="store_true", help="print summary JSON")

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


def _db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        type=Path,
        metavar="PATH",
        help="SQLite database (default $HARNESS_DB, else ./harness-data/harness.db)",
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
    if not args.headless:
        log.info("the web panel is not part of this version yet: running headless")
    options = RunOptions(
        db_path=args.db or default_db_path(),
        report_dir=args.report_dir,
        view_mode=choose_mode(args.quiet, Console(stderr=False)),
        log_level=getattr(logging, args.log_level),
    )
    result = run(loaded, options)
    return result.exit_code


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


def _open_store(db: Path | None) -> Store:
    """An existing database, with runs left by dead controllers marked aborted."""
    from harness.store import Store, default_db_path

    path = db or default_db_path()
    if not Path(path).exists():
        raise UsageError(f"no database at {path}: run `harness start` first or pass --db")
    store = Store(path)
    store.recover_aborted()
    return store


def cmd_runs(args: argparse.Namespace) -> int:
    """`harness runs`."""
    store = _open_store(args.db)
    rows = store.list_runs(args.limit)
    store.close()
    if args.json:
        print(json.dumps([r.model_dump(exclude={"profile_json", "summary_json"}) for r in rows], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("run", "profile", "status", "started", "duration", "requests", "p95 ms", "errors")
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
        )
    Console().print(table)
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
