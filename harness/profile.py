"""Profiles: the YAML that describes a run, validated before anything starts.

Loading goes: find the file (a path, or a built-in name from `harness/profiles/`) → parse YAML →
apply `--set a.b=c` overrides → substitute `${VAR}` / `${VAR:-default}` from the environment and
`.env` → validate with pydantic → validate each group's `options` with its simulator's model.
Any failure is a `ProfileError` naming the file, the field path and what was expected.

Values that came from `${VAR}` are secrets: `LoadedProfile.raw` keeps the placeholders (that is
what the database stores) and `LoadedProfile.secrets` feeds the log redaction filter.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from dotenv import dotenv_values
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.distributions import Constant, Exponential, LogNormal, Uniform, coerce_distribution
from harness.durations import Duration
from harness.errors import ProfileError, UsageError
from harness.shapes import ConstantShape, Shape, StepsShape
from harness.thresholds import Threshold, matches, parse_threshold

_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class Pacing(BaseModel):
    """Constant pacing: start an iteration every `interval`, whatever it took (Locust constant_pacing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["pacing"]
    interval: Duration = Field(gt=0)


ThinkTime = Constant | Uniform | Exponential | LogNormal | Pacing


class TargetRef(BaseModel):
    """A system under test: an external `url`, or an `embedded` reference target started by harness."""

    model_config = ConfigDict(extra="allow")
    url: str | None = None
    """Base URL of an external target (e.g. http://127.0.0.1:8080)."""
    embedded: bool = False
    """Start an embedded reference target (see `harness target --help`)."""
    kind: str | None = None
    """Which embedded target to start; defaults to the target's name."""
    port: int = Field(default=0, ge=0, le=65535)
    """Port for an embedded target; 0 picks a free one."""
    health: str | None = None
    """A path that answers 2xx once the target is ready; checked before the run starts."""
    start_timeout: Duration = 20.0
    """How long to wait for the target's health check."""

    @model_validator(mode="after")
    def _one_source(self) -> TargetRef:
        if self.embedded and self.url:
            raise ValueError("give either 'url' or 'embedded: true', not both")
        if not self.embedded and not self.url:
            raise ValueError("give 'url' (an external target) or 'embedded: true'")
        if self.url and not re.match(r"^[a-z][a-z0-9+.-]*://", self.url):
            raise ValueError(f"url must start with a scheme such as http://, got {self.url!r}")
        return self

    def config(self) -> dict[str, Any]:
        """The embedded target's own settings (every field not defined above)."""
        return dict(self.model_extra or {})


class Group(BaseModel):
    """A set of virtual users running one simulator."""

    model_config = ConfigDict(extra="forbid")
    simulator: str
    """Registered simulator name (`harness profiles --simulators`) or `module:Class`."""
    users: int | None = Field(default=None, ge=0)
    """Closed model: how many concurrent users, each looping iteration → think time."""
    arrival_rate: float | None = Field(default=None, ge=0)
    """Open model: iterations started per second, whether or not the system keeps up."""
    model: Literal["closed", "open"] | None = None
    """Which model a shaped group uses when neither users nor arrival_rate is given."""
    shape: Shape = Field(default_factory=ConstantShape)
    """How the target changes over time (constant, stages, steps, callable)."""
    spawn_rate: float | None = Field(default=None, gt=0)
    """Closed model: users added per second at most (default: at once)."""
    arrival: Literal["uniform", "poisson"] = "uniform"
    """Open model: spacing of arrivals."""
    max_in_flight: int = Field(default=1000, ge=1)
    """Open model: iterations in flight at most; an arrival beyond this is dropped and counted."""
    processes: int = Field(default=1, ge=1, le=256)
    """Worker processes sharing this group's users or rate."""
    think_time: ThinkTime = Field(default_factory=Constant, discriminator="type")
    """Closed model: pause after each iteration (constant, uniform, exponential, lognormal, pacing)."""
    iterations: int | None = Field(default=None, ge=1)
    """Iterations per user, after which the user stops."""
    total_iterations: int | None = Field(default=None, ge=1)
    """Iterations for the whole group, after which the group stops."""
    start_delay: Duration = 0.0
    """Seconds after the run start before this group begins."""
    options: dict[str, Any] = Field(default_factory=dict)
    """The simulator's own settings."""

    @field_validator("think_time", mode="before")
    @classmethod
    def _think_time(cls, value: Any) -> Any:
        return coerce_distribution(value)

    @model_validator(mode="after")
    def _one_model(self) -> Group:
        if self.users is not None and self.arrival_rate is not None:
            raise ValueError("give 'users' (closed model) or 'arrival_rate' (open model), not both")
        if self.users is None and self.arrival_rate is None and isinstance(self.shape, ConstantShape):
            raise ValueError("give 'users' (closed model), 'arrival_rate' (open model), or a shape")
        if self.mode == "open" and isinstance(self.shape, StepsShape):
            raise ValueError("the 'steps' shape adds users: use it with 'users', not 'arrival_rate'")
        return self

    @property
    def mode(self) -> Literal["closed", "open"]:
        """`open` when the group is driven by an arrival rate."""
        if self.arrival_rate is not None:
            return "open"
        if self.users is not None:
            return "closed"
        return self.model or "closed"

    @property
    def base(self) -> float:
        """The users or rate the constant shape holds (and stages start from)."""
        value = self.arrival_rate if self.mode == "open" else self.users
        return float(value or 0)


class ThresholdSpec(BaseModel):
    """A threshold (see `harness.thresholds`), optionally aborting the run as soon as it fails.

    In a profile: an expression string, or `{expr, abort_on_fail, delay}` (`abort` is an alias).
    """

    model_config = ConfigDict(extra="forbid")
    expr: str
    """`FUNC[(SELECTOR)] OP VALUE [over DURATION]`, e.g. `p95(api.GET /json) < 500ms`, `error_rate < 1%`."""
    abort_on_fail: bool = Field(default=False, validation_alias=AliasChoices("abort_on_fail", "abort"))
    """Stop the run as soon as the threshold fails while it runs (checked every few seconds)."""
    delay: Duration = 0.0
    """Failures count toward an abort only this long after the run start (k6's delayAbortEval)."""

    @model_validator(mode="after")
    def _parses(self) -> ThresholdSpec:
        self.parsed()
        return self

    def parsed(self) -> Threshold:
        """The parsed threshold; ValueError naming the problem."""
        return parse_threshold(self.expr, self.abort_on_fail, self.delay)


def _threshold_spec(value: Any) -> Any:
    """A profile's threshold item: an expression string, or a mapping for ThresholdSpec."""
    if isinstance(value, str):
        return {"expr": value}
    if isinstance(value, dict):
        if "abort" in value and "abort_on_fail" in value:
            raise ValueError("give abort_on_fail or its alias abort, not both")
        return value
    if isinstance(value, ThresholdSpec):
        return value
    raise ValueError(
        f"expected a threshold expression such as 'p95 < 500ms' or a mapping "
        f"{{expr, abort_on_fail, delay}}, got {_kind(value)}"
    )


class Agents(BaseModel):
    """Remote agents a run needs (`harness agent` processes connected to the controller's hub).

    Each group's `processes` is the number of workers PER AGENT (and on the controller when `local`);
    a group goes only to agents that have its simulator; users or rate are split by agent capacity.
    """

    model_config = ConfigDict(extra="forbid")
    min: int = Field(default=1, ge=0)
    """Agents needed before the run starts."""
    wait: Duration = 60.0
    """How long to wait for them; not enough by then is bad input (exit 2)."""
    names: list[str] = Field(default_factory=list)
    """Only agents with one of these names (`harness agent --name`)."""
    labels: list[str] = Field(default_factory=list)
    """Only agents with at least one of these labels (`harness agent --labels`)."""
    local: bool = False
    """Also run workers on the controller's own machine."""
    on_lost: Literal["fail", "move"] = "move"
    """An agent lost mid-run: abort the run (fail), or (move) hand its workers to an agent that connected
    during the run, else give their share to the remaining workers."""
    lost_timeout: Duration = Field(default=30.0, gt=0)
    """An agent disconnected this long is lost; until then its workers are paused, not restarted."""
    joining: Literal["spare", "grow"] = "spare"
    """A matching agent that connects while the run goes: keep it as a spare for a lost agent's workers
    (spare), or (grow) give it `processes` workers of each running group at once, the users or rate
    being split over all workers again (groups with `total_iterations` keep their workers)."""

    @model_validator(mode="after")
    def _somewhere(self) -> Agents:
        if self.min == 0 and not self.local:
            raise ValueError("min: 0 leaves no workers anywhere: give min >= 1 or local: true")
        return self


class Profile(BaseModel):
    """A whole run."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=_NAME)
    description: str = ""
    duration: Duration = Field(default=60.0, gt=0)
    """How long the run lasts (shorter if every group finishes first)."""
    stop_grace: Duration = 10.0
    """On stop, how long in-flight iterations may take to finish before workers are terminated."""
    seed: int | None = None
    """Seed for every random choice (think times, arrivals, simulator choices)."""
    targets: dict[str, TargetRef] = Field(default_factory=dict)
    groups: dict[str, Group] = Field(min_length=1)
    thresholds: list[Annotated[ThresholdSpec, BeforeValidator(_threshold_spec)]] = Field(default_factory=list)
    """Pass/fail conditions: expression strings or `{expr, abort_on_fail, delay}` (see harness.thresholds)."""
    agents: Agents | None = None
    """Run the groups' workers on remote agents (see `harness agent --help`)."""

    @field_validator("targets", "groups")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not re.match(_NAME, str(key)):
                raise ValueError(f"name {key!r} may use only letters, digits, '_', '-' and '.'")
        return value

    def parsed_thresholds(self) -> list[Threshold]:
        """The thresholds, parsed (each with its abort flag and delay)."""
        return [spec.parsed() for spec in self.thresholds]


def _check_threshold_groups(profile: Profile, source: str) -> None:
    """A threshold whose group part matches no group of the profile can only be a typo."""
    for i, threshold in enumerate(profile.parsed_thresholds()):
        group = threshold.group_glob
        if group is None or (threshold.func == "count" and threshold.name_glob is None):
            continue  # the whole run, or count(NAME), which may be a counter's name in any group
        if not any(matches(group, name) for name in profile.groups):
            raise ProfileError(
                source,
                f"thresholds[{i}]",
                f"{threshold.expr!r}: no group matches {group!r} (groups: {', '.join(profile.groups)})",
            )


@dataclass
class LoadedProfile:
    """A validated profile, with where it came from and what must be kept secret."""

    profile: Profile
    source: str
    raw: dict[str, Any]
    """The profile as written (with `${VAR}` placeholders, after --set): safe to store."""
    secrets: set[str] = field(default_factory=set)
    """Values substituted from the environment; redacted from logs and reports."""
    options: dict[str, BaseModel] = field(default_factory=dict)
    """Each group's validated simulator options."""


def builtin_profiles() -> dict[str, Path]:
    """Built-in profile names and their files."""
    folder = resources.files("harness") / "profiles"
    return {
        Path(str(entry)).stem: Path(str(entry))
        for entry in folder.iterdir()
        if str(entry).endswith((".yaml", ".yml"))
    }


def find_profile(name_or_path: str) -> Path:
    """A profile file from a path or a built-in name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtins = builtin_profiles()
    if name_or_path in builtins:
        return builtins[name_or_path]
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        raise UsageError(f"profile file not found: {name_or_path}")
    raise UsageError(
        f"no profile named {name_or_path!r}: give a YAML file path or one of: {', '.join(sorted(builtins))}"
    )


def load_profile(
    name_or_path: str,
    overrides: list[str] | None = None,
    environ: dict[str, str] | None = None,
    validate_options: bool = True,
) -> LoadedProfile:
    """Load, override, substitute and validate a profile; ProfileError/UsageError on bad input."""
    path = find_profile(name_or_path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read profile {source}: {exc}") from None
    return load_profile_text(text, source, overrides, environ, path.parent, validate_options)


def load_profile_text(
    text: str,
    source: str = "<profile>",
    overrides: list[str] | None = None,
    environ: dict[str, str] | None = None,
    base_dir: Path | None = None,
    validate_options: bool = True,
) -> LoadedProfile:
    """Like `load_profile`, from YAML text."""
    secrets: set[str] = set()
    try:
        return _load_text(text, source, overrides, environ, base_dir, validate_options, secrets)
    except ProfileError as exc:
        raise _clean_error(exc, secrets) from None


def _load_text(
    text: str,
    source: str,
    overrides: list[str] | None,
    environ: dict[str, str] | None,
    base_dir: Path | None,
    validate_options: bool,
    secrets: set[str],
) -> LoadedProfile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ProfileError(source, None, f"{where}invalid YAML: {problem}") from None
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        # PyYAML's constructors fail this way on e.g. `2001-13-01`, `!!int x`, `0x_` or deep nesting.
        raise ProfileError(source, None, f"invalid YAML: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(source, None, f"expected a mapping at the top level, got {_kind(data)}")
    for item in overrides or []:
        apply_override(data, item, source)
    env = _environment(environ, base_dir)
    resolved = _substitute(data, env, secrets, source, "")
    try:
        profile = Profile.model_validate(resolved)
    except ValidationError as exc:
        raise _profile_error(source, exc) from None
    _check_threshold_groups(profile, source)
    loaded = LoadedProfile(profile, source, data, {s for s in secrets if len(s) >= 4})
    if validate_options:
        from harness.simulator import validate_group_options

        for group_name, group in profile.groups.items():
            loaded.options[group_name] = validate_group_options(source, group_name, group, profile)
    return loaded


_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _clean_error(exc: ProfileError, secrets: set[str]) -> ProfileError:
    """The error on one line (the CLI prints one), with values from the environment redacted."""

    def clean(text: str) -> str:
        for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
            text = text.replace(secret, "***")
        return _LINE_BREAKS.sub(lambda m: repr(m.group())[1:-1], text)

    return ProfileError(exc.source, clean(exc.field) if exc.field else exc.field, clean(exc.message))


def apply_override(data: dict[str, Any], item: str, source: str = "--set") -> None:
    """Apply one `dotted.key=value` (value read as YAML) to the raw profile."""
    key, sep, value_text = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError, RecursionError):
        value = value_text
    parts = key.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UsageError(f"--set {item!r}: {where}: no list item {part!r}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise UsageError(f"--set {item!r}: {'.'.join(parts[:depth])} is a {_kind(node)}, not a mapping")


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _environment(environ: dict[str, str] | None, base_dir: Path | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for folder in {Path.cwd(), *([base_dir] if base_dir else [])}:
        dotenv = folder / ".env"
        if dotenv.is_file():
            env.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
    env.update(os.environ if environ is None else environ)
    return env


def _substitute(node: Any, env: dict[str, str], secrets: set[str], source: str, path: str) -> Any:
    if isinstance(node, dict):
        return {
            k: _substitute(v, env, secrets, source, f"{path}.{k}" if path else str(k))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_substitute(v, env, secrets, source, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                secrets.add(env[name])
                return env[name]
            if default is not None:
                return default
            raise ProfileError(
                source, path, f"environment variable {name} is not set (export it or put it in .env)"
            )

        text = _VAR.sub(replace, node)
        # A whole-value placeholder may stand for a number or a boolean.
        if _VAR.fullmatch(node):
            try:
                parsed = yaml.safe_load(text)
            except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError, RecursionError):
                return text
            return parsed if isinstance(parsed, int | float | bool) else text
        return text
    return node


def _profile_error(source: str, exc: ValidationError) -> ProfileError:
    errors = exc.errors()
    first = errors[0]
    loc = first["loc"]
    path = ""
    for i, part in enumerate(loc):
        if _is_union_tag(loc, i):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "required field is missing"
    elif first["type"] == "extra_forbidden":
        message = "unknown field (check the spelling; see `harness validate --help`)"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return ProfileError(source, path or None, message + more)


_UNION_TAGS = {
    "think_time": {"constant", "uniform", "exponential", "lognormal", "pacing"},
    "shape": {"constant", "stages", "steps", "callable"},
}
_PYDANTIC_LABELS = ("function-", "tagged-union[", "nullable[", "lax-or-strict[", "json-or-python[", "chain[")


def _is_union_tag(loc: tuple[int | str, ...], i: int) -> bool:
    # pydantic puts the chosen union member or validator name in the location; not a user field.
    # Only where pydantic inserts one, so a group or target named e.g. `steps` keeps its name.
    part = loc[i]
    if not isinstance(part, str):
        return False
    if part == "[key]" or (part.startswith(_PYDANTIC_LABELS) and "[" in part):
        return True
    # groups.NAME.think_time.<tag> / groups.NAME.shape.<tag>
    return i == 3 and loc[0] == "groups" and part in _UNION_TAGS.get(str(loc[2]), ())


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
