"""The terminal output of a headless run: a live display, periodic plain lines, and the final summary.

`LiveView` listens to the collector's once-a-second `tick` (see `harness.collector.Collector._tick`)
and shows it in one of three modes: `live` (a `rich.live.Live` display on a terminal), `lines` (a
compact plain line every few seconds, for CI logs) or `quiet`. `print_summary` prints the table of
a finished run from its `summary.json` dict.
"""

from __future__ import annotations

import datetime as _dt
import logging
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import IO, Any, Literal

from rich import box, get_console
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from harness.metrics import counts_as_request

__all__ = [
    "CPU_LIMIT",
    "LAG_LIMIT_MS",
    "LINES_EVERY",
    "SATURATED",
    "LiveView",
    "Mode",
    "choose_mode",
    "fmt_count",
    "fmt_duration",
    "fmt_ms",
    "fmt_pct",
    "fmt_rps",
    "print_summary",
    "saturation",
]

Mode = Literal["live", "lines", "quiet"]

LINES_EVERY = 5.0
"""Seconds between two lines in `lines` mode."""
MAX_ENDPOINT_ROWS = 15
"""Endpoint rows shown live before the rest is summed up as "+N more"."""
MAX_LIVE_ERRORS = 5
"""Distinct recent error messages shown live."""
MAX_SUMMARY_ERRORS = 5
"""Errors listed in the final summary."""
CPU_LIMIT = 80.0
"""A worker's CPU percent above which the load generator counts as saturated."""
LAG_LIMIT_MS = 50.0
"""A worker's event-loop lag above which the load generator counts as saturated."""
CPU_SEVERE = 95.0
"""CPU percent at which the saturation warning turns red."""
LAG_SEVERE_MS = 200.0
"""Loop lag at which the saturation warning turns red."""
SATURATED = "load generator saturated: results may be tainted"
"""The warning shown when the harness itself is over its limits."""

_DASH = "-"
_BOX = box.Box("    \n    \n ── \n    \n ── \n    \n    \n    \n")
"""Like `box.SIMPLE_HEAD`, with a rule under the head and above a table's last section (the totals)."""


# -- format helpers ----------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    """`value` as a float, or None when it is missing or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fmt_ms(value: Any) -> str:
    """Milliseconds: one decimal under 100 ms, an integer above; "-" when missing."""
    v = _num(value)
    if v is None:
        return _DASH
    return f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def fmt_rps(value: Any) -> str:
    """A rate per second with one decimal; "-" when missing."""
    v = _num(value)
    return _DASH if v is None else f"{v:.1f}"


def fmt_pct(fraction: Any, digits: int = 2) -> str:
    """A fraction (0.004) as a percentage ("0.40%"); "-" when missing."""
    v = _num(fraction)
    return _DASH if v is None else f"{v * 100:.{digits}f}%"


def fmt_count(value: Any) -> str:
    """A whole count; "-" when missing."""
    v = _num(value)
    return _DASH if v is None else str(round(v))


def fmt_duration(seconds: Any) -> str:
    """Seconds as "35s", "2m05s" or "1h02m"; "-" when missing."""
    v = _num(seconds)
    if v is None:
        return _DASH
    s = max(0, round(v))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fmt_target(value: Any) -> str:
    v = _num(value)
    if v is None:
        return _DASH
    return str(round(v)) if v == round(v) else f"{v:.1f}"


def _fmt_time(value: Any) -> str:
    """An epoch (seconds) or an ISO string as a local "YYYY-mm-dd HH:MM:SS"."""
    if value is None or value == "":
        return _DASH
    v = _num(value)
    if v is not None:
        return _dt.datetime.fromtimestamp(v).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _epoch(value: Any) -> float | None:
    v = _num(value)
    if v is not None:
        return v
    if isinstance(value, str):
        try:
            return _dt.datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def saturation(health: Mapping[str, Any] | None) -> str | None:
    """None when the harness is within its limits, else the style of the warning: "yellow" or "red"."""
    health = health or {}
    cpu = _num(health.get("cpu_max")) or 0.0
    lag = _num(health.get("loop_lag_max_ms")) or 0.0
    dropped = _num(health.get("dropped")) or 0.0
    if dropped > 0 or cpu >= CPU_SEVERE or lag >= LAG_SEVERE_MS:
        return "red"
    if cpu > CPU_LIMIT or lag > LAG_LIMIT_MS:
        return "yellow"
    return None


def choose_mode(quiet: bool, console: Console | None = None) -> Mode:
    """ "quiet" when asked, "live" on a (non-dumb) terminal, else "lines"."""
    if quiet:
        return "quiet"
    console = console if console is not None else get_console()
    if console.is_terminal and not console.is_dumb_terminal:
        return "live"
    return "lines"


# -- the live view -----------------------------------------------------------------------------
class _ConsoleWriter:
    """A text stream that prints whole lines through a console (above a live display)."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._buffer: list[str] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        """Print every completed line; keep the rest for the next write."""
        with self._lock:
            lines: list[str] = []
            rest = text
            while rest:
                line, newline, rest = rest.partition("\n")
                if newline:
                    lines.append("".join(self._buffer) + line)
                    self._buffer.clear()
                else:
                    self._buffer.append(line)
            if lines:
                self._console.print(Text.from_ansi("\n".join(lines)), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        """Print what is left of an unfinished line."""
        with self._lock:
            if self._buffer:
                self._console.print(Text.from_ansi("".join(self._buffer)), soft_wrap=True)
                self._buffer.clear()


def _console_handlers() -> Iterable[logging.StreamHandler[Any]]:
    """The root logger's stream handlers (not files), looking inside multiprocessing-logging's wrappers."""
    for handler in logging.getLogger().handlers:
        for h in (handler, getattr(handler, "sub_handler", None)):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                yield h


class LiveView:
    """The terminal view of a running run, fed by the collector's ticks."""

    def __init__(
        self,
        run_id: str,
        profile: str,
        duration: float,
        mode: Mode,
        console: Console | None = None,
    ) -> None:
        if mode not in ("live", "lines", "quiet"):
            raise ValueError(f"unknown console mode {mode!r}; expected live, lines or quiet")
        self.run_id = run_id
        self.profile = profile
        self.duration = float(duration or 0.0)
        self.mode: Mode = mode
        self.console = console if console is not None else get_console()
        self._tick: dict[str, Any] | None = None
        self._lock = threading.RLock()
        self._live: Live | None = None
        self._started = False
        self._stopped = False
        self._last_bucket = 0
        self._swapped: list[tuple[logging.StreamHandler[Any], IO[str]]] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start showing the run (a live display in `live` mode; nothing to do otherwise)."""
        with self._lock:
            if self._started or self._stopped:
                return
            self._started = True
            if self.mode != "live":
                return
            std_streams = [s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s]
            self._live = Live(
                console=self.console,
                get_renderable=self.render,
                auto_refresh=False,
                transient=False,
                redirect_stdout=True,
                redirect_stderr=True,
            )
            self._live.start(refresh=True)
            self._redirect_logging(std_streams)

    def update(self, tick: Mapping[str, Any]) -> None:
        """Take a new tick (from the collector thread) and show it."""
        with self._lock:
            if self._stopped or self.mode == "quiet":
                return
            self._tick = dict(tick)
            if self.mode == "live":
                if self._live is not None:
                    self._live.refresh()
                return
            elapsed = _num(tick.get("elapsed")) or 0.0
            bucket = int(elapsed // LINES_EVERY)
            if bucket <= self._last_bucket:
                return
            self._last_bucket = bucket
            self.console.print(Text(self.line(tick)), soft_wrap=True)

    def stop(self) -> None:
        """Stop the display, leaving its last state on screen; later ticks are ignored."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            live, self._live = self._live, None
            if live is not None:
                live.stop()
                if not self.console.is_terminal:
                    self.console.line()  # the final render of a non-terminal ends without one
            self._restore_logging()

    def __enter__(self) -> LiveView:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _redirect_logging(self, std_streams: list[Any]) -> None:
        """Send the root logger's terminal handlers through the console, so lines appear above the display."""
        writer = _ConsoleWriter(self.console)
        for handler in _console_handlers():
            if any(handler.stream is s for s in std_streams):
                old = handler.setStream(writer)
                if old is not None:
                    self._swapped.append((handler, old))

    def _restore_logging(self) -> None:
        for handler, old in reversed(self._swapped):
            handler.setStream(old)
        self._swapped.clear()

    # -- rendering ---------------------------------------------------------------------------
    def line(self, tick: Mapping[str, Any]) -> str:
        """The compact one-line state of a tick, as printed in `lines` mode."""
        elapsed = _num(tick.get("elapsed")) or 0.0
        duration = _num(tick.get("duration")) or self.duration
        clock = f"[{int(elapsed):4d}s/{duration:.0f}s]" if duration > 0 else f"[{int(elapsed):4d}s]"
        groups = tick.get("groups") or {}
        users = sum(int(_num(g.get("users")) or 0) for g in groups.values())
        totals = tick.get("totals") or {}
        health = tick.get("health") or {}
        p95 = _worst_p95(tick.get("endpoints") or [])
        cpu = _num(health.get("cpu_max")) or 0.0
        lag = _num(health.get("loop_lag_max_ms")) or 0.0
        parts = [
            f"{clock} users {users}",
            f"{fmt_rps(totals.get('rps', 0.0))} rps",
            f"p95 {fmt_ms(p95)} ms",
            f"err {fmt_pct(totals.get('error_rate', 0.0))}",
            f"cpu {cpu:.0f}% lag {lag:.0f} ms",
        ]
        dropped = int(_num(health.get("dropped")) or 0)
        if dropped:
            parts.append(f"dropped {dropped}")
        if saturation(health):
            parts.append(SATURATED)
        return " | ".join(parts)

    def render(self) -> RenderableType:
        """The live display for the latest tick."""
        tick = self._tick  # one atomic read: no lock, as rendering happens under rich's own locks
        parts: list[RenderableType] = [self._header(tick)]
        if tick is None:
            parts.append(Text("waiting for the first second of data...", style="dim"))
            return Group(*parts)
        groups = tick.get("groups") or {}
        if groups:
            parts.append(self._groups_table(groups))
        endpoints = tick.get("endpoints") or []
        if endpoints:
            parts.append(self._endpoints_table(endpoints, len(groups), len(tick.get("errors") or [])))
        errors = self._errors(tick.get("errors") or [])
        if errors is not None:
            parts.append(errors)
        parts.append(self._health(tick.get("health") or {}))
        return Group(*parts)

    def _header(self, tick: Mapping[str, Any] | None) -> RenderableType:
        elapsed = _num((tick or {}).get("elapsed")) or 0.0
        duration = _num((tick or {}).get("duration")) or self.duration
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        title = Text.assemble(
            ("run ", "dim"), (self.run_id, "bold"), ("  profile ", "dim"), (self.profile, "bold")
        )
        if duration > 0:
            bar = ProgressBar(total=duration, completed=min(elapsed, duration), width=30)
            left = max(0.0, duration - elapsed)
            timing = Text(f"{fmt_duration(elapsed)} / {fmt_duration(duration)}  {fmt_duration(left)} left")
        else:
            bar = ProgressBar(total=None, width=30)
            timing = Text(f"{fmt_duration(elapsed)} elapsed")
        grid.add_row(title, bar, timing)
        return grid

    def _groups_table(self, groups: Mapping[str, Mapping[str, Any]]) -> Table:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        table.add_column("group", no_wrap=True)
        table.add_column("model")
        table.add_column("users", justify="right", no_wrap=True)
        for header in ("rps", "errors/s", "requests", "failures"):
            table.add_column(header, justify="right")
        table.add_column("state")
        for name in sorted(groups):
            g = groups[name] or {}
            mode = g.get("mode", "closed")
            users = int(_num(g.get("users")) or 0)
            target = g.get("target")
            if mode == "open":
                load = f"{fmt_rps(target)}/s ({users} busy)" if target is not None else f"{users} busy"
            else:
                load = f"{users}/{_fmt_target(target)}" if target is not None else str(users)
            failures = int(_num(g.get("failures")) or 0)
            state = str(g.get("state") or _DASH)
            table.add_row(
                str(name),
                str(mode),
                load,
                fmt_rps(g.get("rps", 0.0)),
                Text(
                    fmt_rps(g.get("errors_per_s", 0.0)),
                    style="red" if (_num(g.get("errors_per_s")) or 0) else "",
                ),
                fmt_count(g.get("requests", 0)),
                Text(str(failures), style="red" if failures else ""),
                Text(state, style={"running": "green", "waiting": "yellow", "done": "dim"}.get(state, "")),
            )
        return table

    def _endpoints_table(self, endpoints: list[Mapping[str, Any]], n_groups: int, n_errors: int) -> Table:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        table.add_column("group", no_wrap=True)
        table.add_column("name", no_wrap=True, overflow="ellipsis", max_width=48)
        for header in ("rps", "p50 ms", "p95 ms", "p99 ms", "requests", "failures", "err %"):
            table.add_column(header, justify="right")
        rows = sorted(endpoints, key=lambda e: (str(e.get("group", "")), str(e.get("name", ""))))
        # keep the health line on a short terminal: fewer rows rather than a cropped display
        spare = self.console.size.height - (12 + n_groups + min(n_errors, MAX_LIVE_ERRORS))
        limit = max(3, min(MAX_ENDPOINT_ROWS, spare))
        shown = rows if len(rows) <= limit else rows[: limit - 1]
        for e in shown:
            requests = int(_num(e.get("requests")) or 0)
            failures = int(_num(e.get("failures")) or 0)
            table.add_row(
                str(e.get("group", "")),
                str(e.get("name", "")),
                fmt_rps(e.get("rps", 0.0)),
                fmt_ms(e.get("p50_ms")),
                fmt_ms(e.get("p95_ms")),
                fmt_ms(e.get("p99_ms")),
                str(requests),
                Text(str(failures), style="red" if failures else ""),
                _err_cell(failures, requests),
            )
        if len(shown) < len(rows):
            table.add_row("", Text(f"+{len(rows) - len(shown)} more", style="dim"))
        return table

    def _errors(self, errors: list[Mapping[str, Any]]) -> RenderableType | None:
        seen: dict[str, Mapping[str, Any]] = {}
        for e in reversed(errors):  # newest last in the tick: keep the newest of each message
            message = str(e.get("message", ""))
            if message not in seen:
                seen[message] = e
            if len(seen) >= MAX_LIVE_ERRORS:
                break
        if not seen:
            return None
        lines = [Text("recent errors", style="bold red")]
        for message, e in seen.items():
            where = "/".join(str(x) for x in (e.get("group"), e.get("name")) if x)
            line = Text.assemble(
                ("  ", ""),
                (f"{fmt_count(e.get('count', 1)):>6}x ", "red"),
                (f"{where}: " if where else "", "dim"),
                message,
            )
            line.no_wrap = True
            line.overflow = "ellipsis"
            lines.append(line)
        return Group(*lines)

    def _health(self, health: Mapping[str, Any]) -> Text:
        return _health_text(health, live=True)


def _worst_p95(endpoints: Iterable[Mapping[str, Any]]) -> float | None:
    """The highest p95 among requests with traffic in the live window (error and phase rows left out)."""
    values = [
        v
        for e in endpoints
        if (_num(e.get("rps")) or 0) > 0 and counts_as_request(str(e.get("kind") or "request"))
        for v in [_num(e.get("p95_ms"))]
        if v is not None
    ]
    return max(values) if values else None


def _err_cell(failures: float, requests: float) -> Text:
    if not requests:
        return Text(_DASH)
    rate = failures / requests
    return Text(fmt_pct(rate), style="red" if rate >= 0.05 else "yellow" if rate > 0 else "")


def _health_text(health: Mapping[str, Any], live: bool) -> Text:
    """The harness-health line; yellow or red with the saturation warning when over the limits."""
    style = saturation(health)
    parts = []
    if live:
        parts.append(f"{fmt_count(health.get('workers', 0))} workers")
    parts.append(f"cpu max {_num(health.get('cpu_max')) or 0.0:.0f}%")
    parts.append(f"loop lag max {fmt_ms(health.get('loop_lag_max_ms', 0.0))} ms")
    if live:
        parts.append(f"rss {_num(health.get('rss_mb')) or 0.0:.0f} MB")
    parts.append(f"dropped {fmt_count(health.get('dropped', 0))}")
    text = Text("harness: " + " | ".join(parts), style=style or "dim")
    if style:
        text.append(f"\n{SATURATED}", style=f"bold {style}")
    return text


# -- the final summary ---------------------------------------------------------------------------
_MARKS = {False: {True: "✓", False: "✗"}, True: {True: "ok", False: "FAIL"}}
"""Threshold marks by `ascii_only`, then by `ok`."""
_STATUS_STYLE = {"passed": "bold green", "failed": "bold red", "aborted": "bold yellow"}


def print_summary(summary: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the final tables of a run from its `summary.json` dict."""
    console = console if console is not None else get_console()
    ascii_only = not console.encoding.startswith("utf")
    if ascii_only:  # e.g. a CI log in the C locale: no character may fail to encode
        summary = _encodable(summary, console.encoding)
    run_id = str(summary.get("run_id") or _DASH)
    started, ended = summary.get("started_at"), summary.get("ended_at")
    head = Text.assemble(("run ", "dim"), (run_id, "bold"))
    if summary.get("profile"):
        head.append("  profile ", style="dim")
        head.append(str(summary["profile"]), style="bold")
    if started:
        head.append(f"  {_fmt_time(started)}", style="dim")
        t0, t1 = _epoch(started), _epoch(ended)
        if t0 is not None and t1 is not None:
            head.append(f" - {_fmt_time(ended)} ({fmt_duration(t1 - t0)})", style="dim")
    console.print(head)
    groups = summary.get("groups") or {}
    if groups:
        console.print(_groups_line(groups))
    console.print(_summary_endpoints(summary.get("endpoints") or [], summary.get("totals") or {}))
    for extra in summary.get("tables") or []:
        console.print(_summary_table(extra))
    thresholds = summary.get("thresholds") or []
    if thresholds:
        console.print(_summary_thresholds(thresholds, ascii_only))
    errors = summary.get("errors") or []
    if errors:
        console.print(_summary_errors(errors))
    health = summary.get("health") or {}
    if health:
        console.print(_health_text(health, live=False))
    for warning in health.get("warnings") or []:
        console.print(Text(f"warning: {warning}", style="yellow"))
    status = str(summary.get("status") or "unknown").lower()
    last = Text(status.upper(), style=_STATUS_STYLE.get(status, "bold"))
    last.append(f"  run {run_id}")
    if summary.get("report_dir"):
        last.append(f"  report: {summary['report_dir']}")
    console.print(last)


def _groups_line(groups: Mapping[str, Mapping[str, Any]]) -> Text:
    parts = []
    for name in sorted(groups):
        g = groups[name] or {}
        detail = ", ".join(
            x
            for x in (
                str(g["simulator"]) if g.get("simulator") else "",
                (
                    f"max {fmt_rps(g['users_max'])}/s"
                    if g.get("model") == "open"
                    else f"max {fmt_count(g['users_max'])} users"
                )
                if g.get("users_max") is not None
                else "",
            )
            if x
        )
        parts.append(f"{name} ({detail})" if detail else str(name))
    return Text("groups: " + ", ".join(parts), style="dim")


def _summary_endpoints(endpoints: list[Mapping[str, Any]], totals: Mapping[str, Any]) -> Table:
    table = Table(box=_BOX, pad_edge=False, show_edge=False)
    table.add_column("group", no_wrap=True)
    table.add_column("name", overflow="fold")
    for header in ("requests", "failures", "err %", "rps", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "max ms"):
        table.add_column(header, justify="right")
    for e in sorted(endpoints, key=lambda e: (str(e.get("group", "")), str(e.get("name", "")))):
        requests = int(_num(e.get("requests")) or 0)
        failures = int(_num(e.get("failures")) or 0)
        table.add_row(
            str(e.get("group", "")),
            str(e.get("name", "")),
            str(requests),
            Text(str(failures), style="red" if failures else ""),
            _err_cell(failures, requests),
            fmt_rps(e.get("rps")),
            *(fmt_ms(e.get(k)) for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")),
        )
    if endpoints:
        table.add_section()
    requests = int(_num(totals.get("requests")) or 0)
    failures = int(_num(totals.get("failures")) or 0)
    rate = _num(totals.get("error_rate"))
    if rate is None and requests:
        rate = failures / requests
    table.add_row(
        Text("total", style="bold"),
        "",
        Text(str(requests), style="bold"),
        Text(str(failures), style="bold red" if failures else "bold"),
        Text(fmt_pct(rate), style="bold"),
        Text(fmt_rps(totals.get("rps")), style="bold"),
        *(
            Text(fmt_ms(totals.get(k)), style="bold")
            for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")
        ),
    )
    return table


def _encodable(value: Any, encoding: str) -> Any:
    """`value` with every string made encodable in `encoding` (unencodable characters become "?")."""
    if isinstance(value, str):
        try:
            return value.encode(encoding, "replace").decode(encoding)
        except LookupError:
            return value.encode("ascii", "replace").decode("ascii")
    if isinstance(value, Mapping):
        return {k: _encodable(v, encoding) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v, encoding) for v in value]
    return value


def _summary_thresholds(thresholds: list[Mapping[str, Any]], ascii_only: bool = False) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("", no_wrap=True)
    table.add_column("threshold")
    table.add_column("value", justify="right")
    for t in thresholds:
        ok = bool(t.get("ok"))
        value = _num(t.get("value"))
        expr = str(t.get("expr", ""))
        if t.get("abort"):
            expr += " (abort)"
        table.add_row(
            Text(_MARKS[ascii_only][ok], style="bold green" if ok else "bold red"),
            Text(expr, style="" if ok else "red"),
            "missing" if value is None else f"{value:.4g}",
        )
    return table


def _summary_table(extra: Mapping[str, Any]) -> Table:
    """A simulator's end-of-run table (`Simulator.summary_tables`): numbers right-aligned."""
    rows = [list(r) for r in extra.get("rows") or []]
    title = f"{extra.get('group')}: {extra.get('title', '')}" if extra.get("group") else extra.get("title")
    table = Table(
        title=str(title or ""),
        title_justify="left",
        caption=str(extra.get("note") or "") or None,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    for i, column in enumerate(extra.get("columns") or []):
        numeric = bool(rows) and all(isinstance(r[i], int | float) for r in rows if i < len(r))
        table.add_column(str(column), justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def _summary_errors(errors: list[Mapping[str, Any]]) -> Table:
    top = sorted(errors, key=lambda e: -(_num(e.get("count")) or 0))[:MAX_SUMMARY_ERRORS]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("count", justify="right", style="red")
    table.add_column("where", no_wrap=True)
    table.add_column("error", overflow="fold")
    for e in top:
        where = "/".join(str(x) for x in (e.get("group"), e.get("name")) if x)
        table.add_row(fmt_count(e.get("count", 0)), where, str(e.get("message", "")))
    if len(errors) > len(top):
        table.add_row("", "", Text(f"+{len(errors) - len(top)} more kinds of error", style="dim"))
    return table
