"""The simulator API: every extension point a simulator family implements, in one place.

A simulator is a class registered under the entry-point group `harness.simulators` (or named in a
profile as `package.module:Class`). A worker process creates one instance per worker for its group
and drives many virtual users through it:

    prepare_run()           once per run and group, in the controller (create shared fixtures)
    setup()                 once per worker, before any user (open sessions, load data)
    start_user(user)        once per virtual user (log in, create a wallet, join a room)
    iteration(user)         repeatedly: one unit of work; think time follows in the closed model
    stop_user(user)         when the user is removed (scale down, iterations done, stop)
    teardown()              once per worker at the end

Everything is asyncio. A simulator whose client blocks (Selenium, some SDKs) calls
`await self.ctx.run_blocking(fn, *args)`, or subclasses `BlockingSimulator`, whose hooks are plain
functions run in the worker's thread pool. An exception raised by a hook fails that user's
iteration (recorded as an error), never the worker; `StopUser` ends one user cleanly.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.errors import MissingExtraError, ProfileError, UsageError
from harness.metrics import Metrics

if TYPE_CHECKING:
    from harness.profile import Group, Profile

ENTRY_POINT_GROUP = "harness.simulators"
T = TypeVar("T")


class NoOptions(BaseModel):
    """A simulator without options."""

    model_config = ConfigDict(extra="forbid")


class StopUser(Exception):
    """Raised by a simulator to end one virtual user cleanly (not an error)."""


class User:
    """One virtual user. Kept small: a worker may hold 100,000 of them."""

    __slots__ = ("_stopping", "data", "id", "iterations")

    def __init__(self, user_id: int) -> None:
        self.id = user_id
        """Unique within the worker."""
        self.iterations = 0
        """Iterations this user has started."""
        self.data: dict[str, Any] | None = None
        """The simulator's per-user state; create it in `start_user`."""
        self._stopping = False

    @property
    def stopping(self) -> bool:
        """True once the user has been asked to stop; long iterations should check it."""
        return self._stopping


@dataclass
class SimulatorContext:
    """What a simulator gets from its worker."""

    run_id: str
    group: str
    worker_index: int
    """This worker's index within its group (0-based)."""
    workers: int
    """How many workers the group has."""
    options: BaseModel
    """The group's `options`, validated with the simulator's `Options` model."""
    targets: dict[str, str]
    """Resolved base URLs of the profile's targets, by name."""
    metrics: Metrics
    log: logging.Logger
    rng: random.Random
    """Seeded from the profile's seed, the group and the worker index."""
    run_dir: Path
    """A folder for files this run produces (reports, downloads, browser profiles)."""
    executor: ThreadPoolExecutor | None = field(default=None, repr=False)
    prepared: Any = None
    """What the simulator's `prepare_run` returned for this group (None if it has none)."""

    def global_user(self, user: User) -> int:
        """A user's index across all of the group's workers: 0, 1, 2, … with no two users alike."""
        return user.id * self.workers + self.worker_index

    def target_url(self, name: str | None = None) -> str:
        """A target's base URL; without a name, the only target (UsageError if ambiguous)."""
        if name is not None:
            if name not in self.targets:
                raise UsageError(
                    f"group {self.group!r}: no target named {name!r}; have {sorted(self.targets)}"
                )
            return self.targets[name]
        if len(self.targets) == 1:
            return next(iter(self.targets.values()))
        raise UsageError(f"group {self.group!r}: name the target to use, one of {sorted(self.targets)}")

    async def run_blocking(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call in the worker's thread pool, keeping the metrics context."""
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        return await loop.run_in_executor(self.executor, call)


class Simulator:
    """Base class of every simulator family."""

    name: ClassVar[str] = ""
    """The name profiles use (`simulator: http`)."""
    description: ClassVar[str] = ""
    """One line for `harness profiles --simulators`."""
    Options: ClassVar[type[BaseModel]] = NoOptions
    """The pydantic model of the group's `options`."""
    extra: ClassVar[str | None] = None
    """The `pip install 'harness[extra]'` that provides this family's dependencies."""
    threads: ClassVar[int] = 8
    """Size of the worker's thread pool for blocking calls."""

    @classmethod
    def check_profile(cls, options: Any, profile: Profile) -> None:
        """Cross-check the validated options against the whole profile; raise ValueError to reject."""

    @classmethod
    def prepare_run(cls, options: Any, targets: dict[str, str], run_id: str, log: logging.Logger) -> Any:
        """Once per run and group, in the controller before the group's workers start (blocking calls are
        fine: register an account, create conversations). Return JSON-serialisable data that every worker
        gets as `ctx.prepared`; raise to abort the run with the reason."""
        return None

    @classmethod
    def finish_run(cls, prepared: Any, run_id: str, log: logging.Logger) -> list[dict[str, Any]]:
        """Once per run and group, in the controller after the group's workers have stopped (also when the
        run aborts): release what `prepare_run` set up (stop agents it launched) and return data points,
        `{"entity", "values"}`, about the system's own side (its counters, record counts) to keep with the
        run. Errors are logged, never raised into the run."""
        return []

    @classmethod
    def summary_tables(
        cls, group: str, endpoints: list[dict[str, Any]], counters: dict[str, float]
    ) -> list[dict[str, Any]]:
        """Tables for the end of a run (a cache's hit rates, …) from the group's `endpoints` rows of the
        summary and its counter totals: each `{"title", "columns": [..], "rows": [[..]], "note"?}`.
        They go into `summary.json` (`tables`), the terminal summary and the HTML report."""
        return []

    def __init__(self, ctx: SimulatorContext) -> None:
        self.ctx = ctx
        self.options: Any = ctx.options
        self.metrics = ctx.metrics
        self.log = ctx.log

    async def setup(self) -> None:
        """Prepare shared state once per worker."""

    async def start_user(self, user: User) -> None:
        """Prepare one virtual user."""

    async def iteration(self, user: User) -> None:
        """Do one unit of work for `user`."""
        raise NotImplementedError(f"{type(self).__name__}.iteration")

    async def stop_user(self, user: User) -> None:
        """Release one virtual user."""

    async def teardown(self) -> None:
        """Release shared state once per worker."""


class BlockingSimulator(Simulator):
    """A simulator whose hooks are blocking functions, run in the worker's thread pool."""

    async def setup(self) -> None:
        await self.ctx.run_blocking(self.setup_blocking)

    async def start_user(self, user: User) -> None:
        await self.ctx.run_blocking(self.start_user_blocking, user)

    async def iteration(self, user: User) -> None:
        await self.ctx.run_blocking(self.iteration_blocking, user)

    async def stop_user(self, user: User) -> None:
        await self.ctx.run_blocking(self.stop_user_blocking, user)

    async def teardown(self) -> None:
        await self.ctx.run_blocking(self.teardown_blocking)

    def setup_blocking(self) -> None:
        """Prepare shared state once per worker (in a thread)."""

    def start_user_blocking(self, user: User) -> None:
        """Prepare one virtual user (in a thread)."""

    def iteration_blocking(self, user: User) -> None:
        """One unit of work (in a thread)."""
        raise NotImplementedError(f"{type(self).__name__}.iteration_blocking")

    def stop_user_blocking(self, user: User) -> None:
        """Release one virtual user (in a thread)."""

    def teardown_blocking(self) -> None:
        """Release shared state (in a thread)."""


def registered_simulators() -> dict[str, str]:
    """Simulator names registered through entry points, with their `module:attr`."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def check_target_choice(
    profile: Profile, target: str | None, explicit: str | None, explicit_name: str
) -> None:
    """For a simulator's `check_profile`: `target` names one of the profile's targets (or the only one
    is used), unless an explicit URL option (`explicit_name`, e.g. `base_url`) is given instead."""
    if explicit is not None:
        if target is not None:
            raise ValueError(f"give 'target' or '{explicit_name}', not both")
        return
    names = sorted(profile.targets)
    if target is not None and target not in profile.targets:
        raise ValueError(f"target {target!r} is not in the profile's targets {names}")
    if target is None and len(names) != 1:
        raise ValueError(f"name the target ('target: NAME', one of {names}) or give '{explicit_name}'")


def check_weights(value: dict[str, float], known: tuple[str, ...], what: str = "kind") -> dict[str, float]:
    """For an options validator: weights over `known` names, all >= 0 and at least one > 0."""
    unknown = set(value) - set(known)
    if unknown:
        raise ValueError(f"unknown {what}(s) {sorted(unknown)}; use {', '.join(known)}")
    if any(w < 0 for w in value.values()) or not any(w > 0 for w in value.values()):
        raise ValueError("weights must be >= 0 with at least one > 0")
    return value


def load_simulator(name: str) -> type[Simulator]:
    """The simulator class for a registered name or a `module:Class` reference.

    UsageError if unknown; MissingExtraError if its optional dependencies are not installed.
    """
    registered = registered_simulators()
    spec = registered.get(name) or (name if ":" in name else None)
    if spec is None:
        raise UsageError(f"unknown simulator {name!r}; registered: {', '.join(sorted(registered)) or 'none'}")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"simulator {name!r}: expected a registered name or 'package.module:Class'")
    try:
        module = __import__(module_name, fromlist=[attr])
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing and not module_name.startswith(missing) and missing not in ("simulators", "harness"):
            raise MissingExtraError(name, missing, name) from None
        raise UsageError(f"simulator {name!r}: cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Simulator)):
        raise UsageError(f"simulator {name!r}: {spec} is not a harness.simulator.Simulator subclass")
    return cls


def validate_group_options(source: str, group_name: str, group: Group, profile: Profile) -> BaseModel:
    """Validate a group's `options` with its simulator's model; ProfileError names the field."""
    try:
        cls = load_simulator(group.simulator)
    except UsageError as exc:
        if isinstance(exc, MissingExtraError):
            raise
        raise ProfileError(source, f"groups.{group_name}.simulator", str(exc)) from None
    try:
        options = cls.Options.model_validate(group.options)
        cls.check_profile(options, profile)
        return options
    except ValueError as exc:
        if not isinstance(exc, ValidationError):
            raise ProfileError(source, f"groups.{group_name}.options", str(exc)) from None
        err = exc.errors()[0]
        path = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown option (check the spelling)"
        elif err["type"] == "missing":
            message = "required option is missing"
        field_path = f"groups.{group_name}.options" + (f".{path}" if path else "")
        raise ProfileError(source, field_path, message) from None


SimulatorFactory = Callable[[SimulatorContext], Simulator]
