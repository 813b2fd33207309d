"""Shared helpers: the built-in smoke profile as a dict, and the real CLI run in a subprocess.

Under pytest-xdist (`scripts/test`): the tests that share a module's fixture run on one worker, the
`exclusive` ones first and alone, then the rest longest first.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE_YAML = REPO / "harness" / "profiles" / "smoke.yaml"
_SMOKE = yaml.safe_load(SMOKE_YAML.read_text(encoding="utf-8"))
DURATIONS = Path(__file__).with_name("durations.json")
"""Seconds each long test took (setup + call + teardown, serial run), to start the longest first."""
UNKNOWN_SLOW_S = 20.0
"""What a `slow` test missing from DURATIONS is taken to last; any other missing test, nothing."""
XDIST = "PYTEST_XDIST_WORKER" in os.environ
"""Whether this process is a pytest-xdist worker."""

if XDIST:
    # pytest-xdist's workers start with COLUMNS=80 and LINES=24 in their environment, which every CLI
    # they spawn inherits: its tables would be drawn 80 columns wide and its lines wrapped, unlike in a
    # serial run (where the CLI, not on a terminal, uses 120 columns).
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)


def _unit(item: pytest.Item) -> str:
    """The item's work unit under pytest-xdist: its `xdist_group`, else its module when it uses a fixture
    wider than a test (module, class, ...) that its module defines (so that the fixture starts once),
    else the item alone."""
    names = {
        str(m.args[0] if m.args else m.kwargs.get("name", "default"))
        for m in item.iter_markers("xdist_group")
    }
    if names:
        return "_".join(sorted(names))
    module = item.nodeid.split("::")[0]
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info is not None else ():
        if defs and defs[-1].scope != "function" and defs[-1].baseid == module:
            return module
    return item.nodeid


def _units_file(config: pytest.Config, controller: bool) -> Path:
    """Where the workers leave each test's unit for the controller: the folder of the workers' basetemps
    (the controller's own basetemp)."""
    base = Path(config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    return (base if controller else base.parent) / "xdist-units.json"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On pytest-xdist workers: the work units (see `_unit`) with an `exclusive` test first, then the
    others longest first; and each test's unit written down for the controller's scheduler.

    Every worker sorts the same collection the same way (stable, known durations only), and the
    scheduler (`--dist loadgroup --no-loadscope-reorder`) hands units out in that order: the exclusive
    tests run one after another while nothing else has started (later, each would wait for every running
    test to end, the other workers idle meanwhile), then the long runs start at once and the short tests
    fill the gaps at the end instead of one long test starting last. Serial runs keep file order.
    """
    if not XDIST:
        return
    known: dict[str, float] = json.loads(DURATIONS.read_text(encoding="utf-8")) if DURATIONS.exists() else {}

    def estimate(item: pytest.Item) -> float:
        if item.nodeid in known:
            return known[item.nodeid]
        return UNKNOWN_SLOW_S if item.get_closest_marker("slow") else 0.0

    unit_of = {item.nodeid: _unit(item) for item in items}
    exclusive = {item.nodeid for item in items if item.get_closest_marker("exclusive")}
    units: dict[str, tuple[bool, float, int]] = {}  # unit -> (not exclusive, -seconds, first position)
    for index, item in enumerate(items):
        shared, seconds, first = units.get(unit_of[item.nodeid], (True, 0.0, index))
        units[unit_of[item.nodeid]] = (
            shared and item.nodeid not in exclusive,
            seconds - estimate(item),
            first,
        )
    # a unit's tests stay together, its exclusive ones first (a test of it waiting for them would wait
    # for ever), else in order
    items.sort(key=lambda item: (*units[unit_of[item.nodeid]], item.nodeid not in exclusive))
    path = _units_file(config, controller=False)
    partial = path.with_name(f"{path.name}.{os.environ['PYTEST_XDIST_WORKER']}")
    partial.write_text(json.dumps(unit_of), encoding="utf-8")
    os.replace(partial, path)  # every worker writes the same; a reader never sees half of it


def pytest_collection_finish(session: pytest.Session) -> None:
    """On pytest-xdist workers: which tests of this run (after -k, -m, ...) are exclusive."""
    if XDIST:
        _EXCLUSIVE.update(item.nodeid for item in session.items if item.get_closest_marker("exclusive"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup` with the units of `_unit`. pytest-xdist's own loadgroup renames each grouped
    test `nodeid@group` to find its group, which pytest 9.2 ignores (a node's id is no longer a plain
    attribute): every test would be a unit of its own."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        units: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.units is None:  # first asked once every worker has collected (and written the file)
                self.units = json.loads(_units_file(config, controller=True).read_text(encoding="utf-8"))
            return self.units.get(nodeid, nodeid)

    return UnitScheduling(config, log)


_MEASURED: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With HARNESS_TEST_DURATIONS=1 (in a serial run, or the controller of a parallel one): add up each
    test's setup, call and teardown, for DURATIONS."""
    if os.environ.get("HARNESS_TEST_DURATIONS") == "1" and not XDIST:
        _MEASURED[report.nodeid] = _MEASURED.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """With HARNESS_TEST_DURATIONS=1: rewrite DURATIONS with the tests of this run that took a second or
    more (the others keep their figures; a parallel run's are inflated by the load, but in proportion)."""
    if not _MEASURED:
        return
    known = json.loads(DURATIONS.read_text(encoding="utf-8")) if DURATIONS.exists() else {}
    known.update({nodeid: round(seconds, 1) for nodeid, seconds in _MEASURED.items()})
    kept = {nodeid: seconds for nodeid, seconds in sorted(known.items()) if seconds >= 1.0}
    DURATIONS.write_text(json.dumps(kept, indent=1) + "\n", encoding="utf-8")


@pytest.fixture
def smoke_doc() -> dict[str, Any]:
    """A fresh, mutable copy of the built-in `smoke` profile."""
    return copy.deepcopy(_SMOKE)


CliRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(tmp_path: Path) -> CliRunner:
    """Run `python -m harness ARGS...` for real, in an empty folder with its own HARNESS_DB."""
    work = tmp_path / "cli-cwd"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    env["HARNESS_DB"] = str(tmp_path / "cli.db")

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "harness", *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("harness: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def one_line_error() -> Callable[..., str]:
    """`check(proc, *fragments)`: exit code 2 and exactly one stderr line `harness: error: ...` that
    contains every fragment, no traceback; returns that line."""
    return _assert_one_line_error


_LOCKS: list[Any] = []
_EXCLUSIVE: set[str] = set()
"""The exclusive tests of the run (every worker collects them all); emptied once they have all run."""
EXCLUSIVE_WAIT_S = 1800.0
"""The longest a test waits for the exclusive tests to be done (then it runs anyway: never a hang)."""


def _lock_files(config: pytest.Config) -> list[Any]:
    """This worker's handles on the run's two lock files, in the folder every worker's basetemp is in."""
    if not _LOCKS:
        factory = config._tmp_path_factory  # type: ignore[attr-defined]
        folder = factory.getbasetemp().parent
        _LOCKS.extend(open(folder / name, "a+b") for name in ("xdist-gate.lock", "xdist-room.lock"))  # noqa: SIM115
    return _LOCKS


@contextlib.contextmanager
def _turn(config: pytest.Config, alone: bool) -> Iterator[None]:
    """Hold the run's room shared (any test) or alone (an `exclusive` one), with writer preference: an
    exclusive test waiting at the gate keeps new tests out until it has run, so it cannot starve."""
    gate, room = _lock_files(config)
    done = Path(gate.name).with_name("xdist-exclusive-done")
    deadline = time.monotonic() + EXCLUSIVE_WAIT_S
    while _EXCLUSIVE and not alone and time.monotonic() < deadline:
        # Any other test waits until every exclusive one has run: a test that slipped in between two of
        # them would make the next one wait for it to end, every other worker idle meanwhile.
        if _EXCLUSIVE.issubset(done.read_text(encoding="utf-8").split("\n") if done.exists() else ()):
            _EXCLUSIVE.clear()
        else:
            time.sleep(0.2)
    if alone:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(room, fcntl.LOCK_EX)
    else:
        fcntl.flock(gate, fcntl.LOCK_SH)
        fcntl.flock(room, fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
    try:
        yield
    finally:
        fcntl.flock(room, fcntl.LOCK_UN)
        if alone:
            fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Under pytest-xdist, an `exclusive` test (setup, call and teardown) runs while no other test runs
    on any worker; outermost, so that waiting for its turn does not count against a test's timeout."""
    if not XDIST:
        return (yield)
    alone = item.get_closest_marker("exclusive") is not None
    try:
        with _turn(item.config, alone=alone):
            return (yield)
    finally:
        if alone:
            with open(Path(_lock_files(item.config)[0].name).with_name("xdist-exclusive-done"), "a") as done:
                done.write(item.nodeid + "\n")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Close this worker's lock files (else a ResourceWarning at exit)."""
    while _LOCKS:
        _LOCKS.pop().close()
