"""Profiles: loading, --set overrides, ${VAR} substitution, secrets, and errors that name file and field."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.distributions import Uniform
from harness.errors import ProfileError, UsageError
from harness.profile import (
    LoadedProfile,
    Pacing,
    apply_override,
    builtin_profiles,
    find_profile,
    load_profile,
    load_profile_text,
)
from harness.shapes import StagesShape, StepsShape
from simulators.http import HttpOptions

PYDANTIC_NOISE = (
    "function-after",
    "function-before",
    "tagged-union",
    "Value error,",
    "[key]",
    "ThresholdSpec",
)


@pytest.fixture(autouse=True)
def _no_dotenv_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `.env` in the folder pytest runs from must not leak into these tests."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


def write(tmp_path: Path, doc: dict[str, Any] | str, name: str = "profile.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")
    return path


# -- loading ---------------------------------------------------------------------------------------


def test_builtin_smoke_loads_with_validated_options() -> None:
    loaded = load_profile("smoke")
    assert isinstance(loaded, LoadedProfile)
    assert Path(loaded.source).name == "smoke.yaml"
    profile = loaded.profile
    assert profile.name == "smoke"
    assert profile.duration == 10.0
    assert profile.stop_grace == 3.0
    assert profile.seed == 1
    assert list(profile.groups) == ["browse"]
    browse = profile.groups["browse"]
    assert (browse.simulator, browse.users, browse.arrival_rate, browse.mode, browse.base) == (
        "http",
        10,
        None,
        "closed",
        10.0,
    )
    assert isinstance(browse.think_time, Uniform)
    assert (browse.think_time.min, browse.think_time.max) == pytest.approx((0.05, 0.15))
    echo = profile.targets["echo"]
    assert echo.embedded and echo.url is None
    assert echo.config()["concurrency"] == 16
    assert [t.expr for t in profile.parsed_thresholds()] == ["error_rate < 1%", "p95 < 500ms"]
    options = loaded.options["browse"]
    assert isinstance(options, HttpOptions)
    assert [r.url for r in options.requests] == ["/", "/json"]
    assert loaded.secrets == set()


def test_builtin_profiles_lists_smoke_and_every_builtin_validates() -> None:
    builtins = builtin_profiles()
    assert "smoke" in builtins
    for name, path in builtins.items():
        assert path.is_file()
        assert load_profile(name).profile.name  # every shipped profile must validate


def test_find_profile_by_path_and_errors(tmp_path: Path, smoke_doc: dict[str, Any]) -> None:
    path = write(tmp_path, smoke_doc, "mine.yaml")
    assert find_profile(str(path)) == path
    assert load_profile(str(path)).source == str(path)
    with pytest.raises(UsageError, match=r"no profile named 'nosuch'.*smoke"):
        find_profile("nosuch")
    with pytest.raises(UsageError, match="profile file not found"):
        find_profile(str(tmp_path / "missing.yaml"))


def test_unreadable_profile_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError, match="cannot read profile"):
        load_profile(str(path))


# -- --set ------------------------------------------------------------------------------------------


def test_set_overrides_users_and_list_items() -> None:
    loaded = load_profile(
        "smoke",
        ["groups.browse.users=3", "groups.browse.options.requests.0.url=/x", "duration=2m", "seed=42"],
    )
    browse = loaded.profile.groups["browse"]
    assert browse.users == 3
    assert loaded.options["browse"].requests[0].url == "/x"  # type: ignore[attr-defined]
    assert loaded.profile.duration == 120.0
    assert loaded.profile.seed == 42
    # the raw profile (what the database stores) has the overrides too
    assert loaded.raw["groups"]["browse"]["users"] == 3
    assert loaded.raw["groups"]["browse"]["options"]["requests"][0]["url"] == "/x"
    # and the built-in file is untouched
    assert load_profile("smoke").profile.groups["browse"].users == 10


def test_set_switches_a_group_to_the_open_model() -> None:
    loaded = load_profile("smoke", ["groups.browse.users=null", "groups.browse.arrival_rate=2.5"])
    browse = loaded.profile.groups["browse"]
    assert (browse.mode, browse.arrival_rate, browse.base) == ("open", 2.5, 2.5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", 3),
        ("2.5", 2.5),
        ("-1", -1),
        ("true", True),
        ("null", None),
        ("[1, 2]", [1, 2]),
        ("{a: 1}", {"a": 1}),
        ("hello", "hello"),
        ("", ""),
        ("30s", "30s"),
        ("a: b: c", "a: b: c"),  # not valid YAML: kept as text
        ("2001-13-01", "2001-13-01"),  # YAML date that datetime rejects: kept as text
        ("'quoted'", "quoted"),
    ],
)
def test_set_value_is_read_as_yaml(text: str, expected: Any) -> None:
    data: dict[str, Any] = {"a": {"b": 0}}
    apply_override(data, f"a.b={text}")
    assert data["a"]["b"] == expected
    assert type(data["a"]["b"]) is type(expected)


def test_set_creates_missing_mappings() -> None:
    data: dict[str, Any] = {}
    apply_override(data, "x.y.z=1")
    assert data == {"x": {"y": {"z": 1}}}


@pytest.mark.parametrize(
    ("item", "fragments"),
    [
        ("noequals", ["expected dotted.key=value"]),
        ("=3", ["expected dotted.key=value"]),
        ("name.x=1", ["'name.x=1'", "name is a string, not a mapping"]),
        ("groups.browse.users.x=1", ["groups.browse.users is a int"]),
        ("groups.browse.options.requests.9.url=/x", ["groups.browse.options.requests.9", "no list item '9'"]),
        ("groups.browse.options.requests.first.url=/x", ["requests.first", "no list item 'first'"]),
    ],
)
def test_set_bad_paths_name_the_key(item: str, fragments: list[str]) -> None:
    with pytest.raises(UsageError) as info:
        load_profile("smoke", [item])
    assert not isinstance(info.value, ProfileError) or "--set" in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_set_unknown_field_is_a_profile_error_naming_it() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("smoke", ["groups.browse.userz=3"])
    assert info.value.field == "groups.browse.userz"
    assert "unknown field" in str(info.value)


# -- ${VAR} and .env -------------------------------------------------------------------------------

ENV_PROFILE = """
name: envtest
targets:
  api: {url: "http://${HOST}:${PORT:-8080}"}
groups:
  browse:
    simulator: http
    users: ${USERS}
    options:
      target: api
      requests:
        - {url: "/items/${ITEM:-7}", headers: {Authorization: "Bearer ${TOKEN}"}}
thresholds: ["p95 < ${P95:-500}ms"]
"""


def test_variables_are_substituted_and_kept_secret() -> None:
    env = {"HOST": "example.test", "USERS": "7", "TOKEN": "s3cr3t-token-value"}
    loaded = load_profile_text(ENV_PROFILE, "env.yaml", environ=env)
    profile = loaded.profile
    assert profile.targets["api"].url == "http://example.test:8080"
    assert profile.groups["browse"].users == 7
    assert type(profile.groups["browse"].users) is int
    request = loaded.options["browse"].requests[0]  # type: ignore[attr-defined]
    assert request.url == "/items/7"
    assert request.headers == {"Authorization": "Bearer s3cr3t-token-value"}
    assert profile.parsed_thresholds()[0].limit == 500
    # raw keeps the placeholders: that is what gets stored
    raw_request = loaded.raw["groups"]["browse"]["options"]["requests"][0]
    assert raw_request["headers"]["Authorization"] == "Bearer ${TOKEN}"
    assert loaded.raw["groups"]["browse"]["users"] == "${USERS}"
    assert "s3cr3t-token-value" not in repr(loaded.raw)
    # values from the environment are secrets (too-short ones are not worth redacting)
    assert loaded.secrets == {"s3cr3t-token-value", "example.test"}


def test_whole_value_placeholders_become_numbers_or_booleans() -> None:
    text = """
name: typed
groups:
  g:
    simulator: http
    arrival_rate: ${RATE}
    max_in_flight: ${INFLIGHT:-50}
    options: {base_url: "http://127.0.0.1:1", requests: [{url: "/${RATE}"}]}
thresholds: [{expr: "p95 < 1", abort: "${ABORT}"}]
"""
    loaded = load_profile_text(text, environ={"RATE": "2.5", "ABORT": "true"})
    group = loaded.profile.groups["g"]
    assert group.arrival_rate == 2.5
    assert group.max_in_flight == 50
    assert loaded.options["g"].requests[0].url == "/2.5"  # type: ignore[attr-defined]  # not whole: text
    assert loaded.profile.parsed_thresholds()[0].abort is True


def test_environ_wins_over_dotenv_in_the_profile_folder(tmp_path: Path) -> None:
    folder = tmp_path / "profiles"
    path = write(folder, ENV_PROFILE)
    (folder / ".env").write_text("HOST=dotenv.test\nUSERS=4\nTOKEN=from-dotenv-file\n", encoding="utf-8")
    loaded = load_profile(str(path), environ={})
    assert loaded.profile.targets["api"].url == "http://dotenv.test:8080"
    assert loaded.profile.groups["browse"].users == 4
    assert "from-dotenv-file" in loaded.secrets
    loaded = load_profile(str(path), environ={"USERS": "9"})
    assert loaded.profile.groups["browse"].users == 9
    assert loaded.profile.targets["api"].url == "http://dotenv.test:8080"


def test_dotenv_in_the_working_folder_is_read(tmp_path: Path) -> None:
    Path(".env").write_text("HOST=cwd.test\nUSERS=2\nTOKEN=cwd-token-1234\n", encoding="utf-8")
    loaded = load_profile_text(ENV_PROFILE, environ={})
    assert loaded.profile.targets["api"].url == "http://cwd.test:8080"


def test_missing_variable_names_field_and_variable() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile_text(ENV_PROFILE, "env.yaml", environ={"HOST": "h", "USERS": "1"})
    err = info.value
    assert err.field == "groups.browse.options.requests[0].headers.Authorization"
    assert "TOKEN" in err.message
    assert str(err).startswith("env.yaml: groups.browse.options.requests[0].headers.Authorization: ")


def test_empty_default_is_allowed() -> None:
    text = ENV_PROFILE.replace("${TOKEN}", "${TOKEN:-}")
    loaded = load_profile_text(text, environ={"HOST": "h", "USERS": "1"})
    assert loaded.options["browse"].requests[0].headers["Authorization"] == "Bearer "  # type: ignore[attr-defined]


def test_secrets_are_redacted_from_profile_errors() -> None:
    text = ENV_PROFILE.replace("name: envtest", "name: envtest\nduration: ${DURATION}")
    env = {"HOST": "h", "USERS": "1", "TOKEN": "t", "DURATION": "hunter2-secret"}
    with pytest.raises(ProfileError) as info:
        load_profile_text(text, "env.yaml", environ=env)
    assert info.value.field == "duration"
    assert "hunter2-secret" not in str(info.value)
    assert "***" in str(info.value)


def test_placeholders_in_keys_and_unclosed_ones_are_left_alone() -> None:
    text = ENV_PROFILE.replace("name: envtest", "name: envtest\ndescription: 'cost ${ and $HOME'")
    loaded = load_profile_text(text, environ={"HOST": "h", "USERS": "1", "TOKEN": "t"})
    assert loaded.profile.description == "cost ${ and $HOME"


# -- schema errors ---------------------------------------------------------------------------------


def _group(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["groups"]["browse"]  # type: ignore[no-any-return]


def _rename_group(doc: dict[str, Any], name: str) -> dict[str, Any]:
    doc["groups"] = {name: doc["groups"].pop("browse")}
    return doc["groups"][name]  # type: ignore[no-any-return]


Mutation = Callable[[dict[str, Any]], Any]

SCHEMA_ERRORS: list[tuple[str, Mutation | str, str | None, str]] = [
    ("missing-groups", lambda d: d.pop("groups"), "groups", "required field is missing"),
    ("empty-groups", lambda d: d.update(groups={}), "groups", "at least 1 item"),
    ("groups-not-mapping", lambda d: d.update(groups=["browse"]), "groups", "valid dictionary"),
    ("users-and-rate", lambda d: _group(d).update(arrival_rate=5), "groups.browse", "not both"),
    ("neither-users-nor-rate", lambda d: _group(d).pop("users"), "groups.browse", "give 'users'"),
    ("unknown-top-field", lambda d: d.update(colour="red"), "colour", "unknown field"),
    ("unknown-group-field", lambda d: _group(d).update(userz=3), "groups.browse.userz", "unknown field"),
    (
        "negative-users",
        lambda d: _group(d).update(users=-1),
        "groups.browse.users",
        "greater than or equal to 0",
    ),
    ("fractional-users", lambda d: _group(d).update(users=1.5), "groups.browse.users", "integer"),
    ("bad-duration", lambda d: d.update(duration="5 parsecs"), "duration", "5 parsecs"),
    ("zero-duration", lambda d: d.update(duration=0), "duration", "greater than 0"),
    ("huge-int-duration", lambda d: d.update(duration=10**400), "duration", "finite"),
    ("bad-name", lambda d: d.update(name="has space"), "name", "pattern"),
    ("bad-group-name", lambda d: _rename_group(d, "bad name"), "groups", "may use only"),
    (
        "steps-with-rate",
        lambda d: _group(d).update(
            users=None,
            arrival_rate=5,
            shape={"type": "steps", "step_time": 1, "users_per_step": 1, "max_users": 3},
        ),
        "groups.browse",
        "'steps' shape",
    ),
    (
        "unknown-simulator",
        lambda d: _group(d).update(simulator="nosuch"),
        "groups.browse.simulator",
        "nosuch",
    ),
    (
        "no-requests",
        lambda d: _group(d)["options"].update(requests=[]),
        "groups.browse.options.requests",
        "at least 1",
    ),
    (
        "request-without-url",
        lambda d: _group(d)["options"].update(requests=[{"method": "GET"}]),
        "groups.browse.options.requests.0.url",
        "required option is missing",
    ),
    (
        "unknown-option",
        lambda d: _group(d)["options"].update(retries=3),
        "groups.browse.options.retries",
        "unknown",
    ),
    (
        "bad-threshold",
        lambda d: d.update(thresholds=["p95 <> 3"]),
        "thresholds[0]",
        "unknown comparison '<>'",
    ),
    (
        "unknown-function",
        lambda d: d.update(thresholds=["p95 < 1", "latency < 3"]),
        "thresholds[1]",
        "'latency < 3': unknown function 'latency'",
    ),
    (
        "old-threshold-syntax",
        lambda d: d.update(thresholds=["p95_ms[browse] < 500"]),
        "thresholds[0]",
        "unknown function 'p95_ms' (the old form; write p95(...) < 500ms)",
    ),
    (
        "threshold-bad-unit",
        lambda d: d.update(thresholds=[{"expr": "error_rate(browse) < 5ms", "abort_on_fail": True}]),
        "thresholds[0]",
        "error_rate takes a ratio (0.01) or a percentage (1%)",
    ),
    (
        "threshold-bad-delay",
        lambda d: d.update(thresholds=[{"expr": "p95 < 1s", "abort": True, "delay": "soon"}]),
        "thresholds[0].delay",
        "expected a duration",
    ),
    (
        "threshold-abort-twice",
        lambda d: d.update(thresholds=[{"expr": "p95 < 1s", "abort": True, "abort_on_fail": False}]),
        "thresholds[0]",
        "abort_on_fail or its alias abort, not both",
    ),
    (
        "threshold-number",
        lambda d: d.update(thresholds=[5]),
        "thresholds[0]",
        "expected a threshold expression",
    ),
    (
        "threshold-unknown-group",
        lambda d: d.update(thresholds=["p95 < 1s", "p95(brwse.home) < 1s"]),
        "thresholds[1]",
        "'p95(brwse.home) < 1s': no group matches 'brwse' (groups: browse)",
    ),
    (
        "threshold-glob-matches-no-group",
        lambda d: d.update(thresholds=["dropped(api*) == 0"]),
        "thresholds[0]",
        "no group matches 'api*'",
    ),
    (
        "threshold-spec-no-expr",
        lambda d: d.update(thresholds=[{"abort": True}]),
        "thresholds[0].expr",
        "required",
    ),
    (
        "uniform-max-below-min",
        lambda d: _group(d).update(think_time={"type": "uniform", "min": 2, "max": 1}),
        "groups.browse.think_time",
        "max (1.0s) must be >= min (2.0s)",
    ),
    (
        "lognormal-bad-field",
        lambda d: _group(d).update(think_time={"type": "lognormal", "median": "x", "p99": 1}),
        "groups.browse.think_time.median",
        "expected a duration",
    ),
    (
        "unknown-think-time",
        lambda d: _group(d).update(think_time={"type": "gaussian"}),
        "groups.browse.think_time",
        "gaussian",
    ),
    (
        "pacing-zero",
        lambda d: _group(d).update(think_time={"type": "pacing", "interval": 0}),
        "groups.browse.think_time.interval",
        "greater than 0",
    ),
    (
        "stage-missing-target",
        lambda d: _group(d).update(
            shape={"type": "stages", "stages": [{"duration": 5}, {"duration": "x", "target": 1}]}
        ),
        "groups.browse.shape.stages[0].target",
        "required field is missing",
    ),
    (
        "stage-bad-duration",
        lambda d: _group(d).update(
            shape={"type": "stages", "stages": [{"duration": "5 parsecs", "target": 1}]}
        ),
        "groups.browse.shape.stages[0].duration",
        "5 parsecs",
    ),
    (
        "steps-zero-step-time",
        lambda d: _group(d).update(
            shape={"type": "steps", "step_time": 0, "users_per_step": 1, "max_users": 3}
        ),
        "groups.browse.shape.step_time",
        "greater than 0",
    ),
    (
        "callable-not-importable",
        lambda d: _group(d).update(shape={"type": "callable", "function": "no_such_module_xyz:f"}),
        "groups.browse.shape.function",
        "cannot import",
    ),
    (
        "callable-relative-import",
        lambda d: _group(d).update(shape={"type": "callable", "function": ".relative:f"}),
        "groups.browse.shape.function",
        "cannot import",
    ),
    ("unknown-shape", lambda d: _group(d).update(shape={"type": "sine"}), "groups.browse.shape", "sine"),
    (
        "target-url-and-embedded",
        lambda d: d["targets"]["echo"].update(url="http://x"),
        "targets.echo",
        "not both",
    ),
    (
        "target-url-scheme",
        lambda d: d["targets"].update(api={"url": "localhost:80"}),
        "targets.api",
        "scheme",
    ),
    ("invalid-yaml", "name: [unclosed\ngroups: {}\n", None, "invalid YAML"),
    ("tab-yaml", "name: x\n\tgroups: 1\n", None, "invalid YAML"),
    ("bad-date-yaml", "name: x\nduration: 2001-13-01\n", None, "invalid YAML"),
    ("bad-int-tag-yaml", "name: x\nduration: !!int nope\n", None, "invalid YAML"),
    ("deep-yaml", "name: " + "[" * 3000 + "]" * 3000 + "\n", None, "invalid YAML"),
    ("top-level-list", "- name: x\n", None, "expected a mapping at the top level, got list"),
    ("empty-file", "", None, "got nothing"),
    ("non-string-key", lambda d: d["groups"].update({1: _group(d)}), "groups[1]", "valid string"),
]


@pytest.mark.parametrize(
    ("mutation", "field", "fragment"),
    [pytest.param(m, f, frag, id=i) for i, m, f, frag in SCHEMA_ERRORS],
)
def test_schema_errors_name_file_and_field(
    tmp_path: Path, smoke_doc: dict[str, Any], mutation: Mutation | str, field: str | None, fragment: str
) -> None:
    if isinstance(mutation, str):
        path = write(tmp_path, mutation, "broken.yaml")
    else:
        mutation(smoke_doc)
        path = write(tmp_path, smoke_doc, "broken.yaml")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    err = info.value
    text = str(err)
    assert err.source == str(path)
    assert err.field == field, text
    assert text.startswith(f"{path}: {field}: " if field else f"{path}: "), text
    assert fragment in err.message, text
    for noise in PYDANTIC_NOISE:
        assert noise not in text, text
    assert "\n" not in text


@pytest.mark.parametrize(
    "name", ["steps", "constant", "stages", "uniform", "callable", "str", "pacing", "shape"]
)
def test_group_named_like_a_union_tag_keeps_its_name(smoke_doc: dict[str, Any], name: str) -> None:
    group = _rename_group(smoke_doc, name)
    assert load_profile_text(yaml.safe_dump(smoke_doc)).profile.groups[name].users == 10
    group["users"] = -1
    with pytest.raises(ProfileError) as info:
        load_profile_text(yaml.safe_dump(smoke_doc))
    assert info.value.field == f"groups.{name}.users"
    group["users"] = 1
    group["think_time"] = {"type": "uniform", "min": 2, "max": 1}
    with pytest.raises(ProfileError) as info:
        load_profile_text(yaml.safe_dump(smoke_doc))
    assert info.value.field == f"groups.{name}.think_time"
    group["think_time"] = 0
    group["shape"] = {"type": "steps", "step_time": -1, "users_per_step": 1, "max_users": 1}
    with pytest.raises(ProfileError) as info:
        load_profile_text(yaml.safe_dump(smoke_doc))
    assert info.value.field == f"groups.{name}.shape.step_time"


@pytest.mark.parametrize("name", ["uniform", "steps", "lognormal"])
def test_target_named_like_a_union_tag_keeps_its_name(smoke_doc: dict[str, Any], name: str) -> None:
    smoke_doc["targets"][name] = smoke_doc["targets"].pop("echo")
    smoke_doc["targets"][name]["port"] = -1
    with pytest.raises(ProfileError) as info:
        load_profile_text(yaml.safe_dump(smoke_doc), validate_options=False)
    assert info.value.field == f"targets.{name}.port"


def test_group_named_with_digits_is_a_name_not_an_index(smoke_doc: dict[str, Any]) -> None:
    _rename_group(smoke_doc, "123")["users"] = -1
    with pytest.raises(ProfileError) as info:
        load_profile_text(yaml.safe_dump(smoke_doc))
    assert info.value.field == "groups.123.users"


def test_line_breaks_in_names_and_values_stay_on_one_line(smoke_doc: dict[str, Any]) -> None:
    _group(smoke_doc)["bad\nkey"] = 1
    with pytest.raises(ProfileError) as info:
        load_profile_text(yaml.safe_dump(smoke_doc))
    assert len(str(info.value).splitlines()) == 1
    assert "bad\\nkey" in str(info.value)
    del _group(smoke_doc)["bad\nkey"]
    _group(smoke_doc)["think_time"] = {"type": "a\u2028b"}
    with pytest.raises(ProfileError) as info:
        load_profile_text(yaml.safe_dump(smoke_doc))
    assert len(str(info.value).splitlines()) == 1


def test_shapes_and_think_times_parse(smoke_doc: dict[str, Any]) -> None:
    browse = _group(smoke_doc)
    browse.pop("users")
    browse["shape"] = {
        "type": "stages",
        "stages": [{"duration": "10s", "target": 5}, {"duration": "1m", "target": 0}],
    }
    browse["think_time"] = {"type": "pacing", "interval": "500ms"}
    smoke_doc["groups"]["steps"] = {
        "simulator": "http",
        "users": 1,
        "shape": {
            "type": "steps",
            "step_time": "30s",
            "users_per_step": 10,
            "max_users": 50,
            "time_limit": "5m",
        },
        "think_time": "250ms",
        "options": browse["options"],
    }
    profile = load_profile_text(yaml.safe_dump(smoke_doc)).profile
    shaped = profile.groups["browse"]
    assert isinstance(shaped.shape, StagesShape)
    assert shaped.shape.length() == 70.0
    assert (shaped.mode, shaped.base) == ("closed", 0.0)
    assert isinstance(shaped.think_time, Pacing)
    assert shaped.think_time.interval == 0.5
    steps = profile.groups["steps"]
    assert isinstance(steps.shape, StepsShape)
    assert steps.shape.length() == 300.0
    assert steps.think_time.mean() == 0.25  # type: ignore[union-attr]


def test_threshold_specs_carry_abort(smoke_doc: dict[str, Any]) -> None:
    smoke_doc["thresholds"] = [
        "p95 < 500ms",
        {"expr": "error_rate(browse) < 5%", "abort": True},
        {"expr": "p99(browse.home) < 2s over 30s", "abort_on_fail": True, "delay": "1m"},
    ]
    parsed = load_profile_text(yaml.safe_dump(smoke_doc)).profile.parsed_thresholds()
    assert [(t.func, t.group_glob, t.name_glob, t.limit, t.over, t.abort, t.delay) for t in parsed] == [
        ("p95", None, None, 500.0, None, False, 0.0),
        ("error_rate", "browse", None, 0.05, None, True, 0.0),
        ("p99", "browse", "home", 2000.0, 30.0, True, 60.0),
    ]


def test_threshold_selectors_that_need_no_group(smoke_doc: dict[str, Any]) -> None:
    # count(NAME) may be a counter in any group; counter(NAME)/gauge(NAME) name no group at all
    smoke_doc["thresholds"] = [
        "count(timeout_errors) < 50",
        "counter(server_errors) < 50",
        "gauge(queue_depth) < 10",
        "p95(b?ows*.*) < 1s",
        "count(browse.timeout) < 50",
    ]
    parsed = load_profile_text(yaml.safe_dump(smoke_doc)).profile.parsed_thresholds()
    assert [t.selector for t in parsed] == [
        "timeout_errors",
        "server_errors",
        "queue_depth",
        "b?ows*.*",
        "browse.timeout",
    ]


def test_simulator_with_empty_module_name_is_a_profile_error(smoke_doc: dict[str, Any]) -> None:
    _group(smoke_doc)["simulator"] = ":Nope"
    with pytest.raises(ProfileError):
        load_profile_text(yaml.safe_dump(smoke_doc))


# -- property: any mutation of a valid profile either loads or is a UsageError ---------------------

BASE_DOC: dict[str, Any] = {
    "name": "prop",
    "duration": "30s",
    "seed": 3,
    "targets": {"echo": {"embedded": True, "concurrency": 4}},
    "groups": {
        "browse": {
            "simulator": "http",
            "users": 5,
            "think_time": {"type": "uniform", "min": "10ms", "max": "20ms"},
            "options": {"requests": [{"name": "home", "url": "/", "weight": 2, "checks": {"status": 200}}]},
        },
        "ramp": {
            "simulator": "http",
            "arrival_rate": 2,
            "shape": {"type": "stages", "stages": [{"duration": "5s", "target": 4}]},
            "think_time": {"type": "lognormal", "median": "5ms", "p99": "50ms"},
            "options": {"base_url": "http://127.0.0.1:9", "requests": [{"url": "/x", "method": "post"}]},
        },
        "steps": {
            "simulator": "http",
            "users": 1,
            "shape": {"type": "steps", "step_time": "1s", "users_per_step": 2, "max_users": 6},
            "options": {"requests": [{"url": "/"}]},
        },
    },
    "thresholds": ["p95 < 500ms", {"expr": "error_rate(browse) < 10%", "abort": True, "delay": "5s"}],
}
assert load_profile_text(yaml.safe_dump(BASE_DOC), environ={}).profile.name == "prop"


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


PATHS = [(), *_paths(BASE_DOC)]
DICT_PATHS = [p for p in PATHS if isinstance(_get(BASE_DOC, p), dict)]
KEYS = sorted({p[-1] for p in PATHS if p and isinstance(p[-1], str)} | {"type", "url", "target", "stages"})
TRICKY_TEXT = [
    "5 parsecs",
    "-1",
    "1h30m",
    "250ms",
    "${NOPE}",
    "${NOPE:-3}",
    "${NOPE:-}",
    "no_such_module_xyz:f",
    "harness.shapes:nope",
    "harness.shapes:ShapePoint",
    ".rel:f",
    "p95 <",
    "p99(browse.home) <= 5s over 1m",
    "count(*.timeout) < 50",
    "2001-13-01",
    "1e400",
    "constant",
    "steps",
    "uniform",
    "lognormal",
    "pacing",
    "callable",
    "open",
    "closed",
    "http://127.0.0.1:1",
    "bad\nline",
    "",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(TRICKY_TEXT),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(PATHS), VALUES),
        st.tuples(st.just("delete"), st.sampled_from(PATHS), st.none()),
        st.tuples(
            st.just("extra"),
            st.sampled_from(DICT_PATHS),
            st.tuples(st.sampled_from(KEYS) | st.text(max_size=6), VALUES),
        ),
    ),
    min_size=1,
    max_size=4,
)


def mutate(doc: dict[str, Any], ops: list[tuple[str, tuple[Any, ...], Any]]) -> Any:
    """Apply ops to a deep copy of `doc`; an op whose path no longer exists is skipped."""
    root: Any = {"doc": copy.deepcopy(doc)}
    for op, path, arg in ops:
        full = ("doc", *path)
        try:
            parent = _get(root, full[:-1])
            if op == "set":
                parent[full[-1]] = arg
            elif op == "delete":
                del parent[full[-1]]
            else:
                key, value = arg
                _get(root, full)[key] = value
        except (KeyError, IndexError, TypeError):
            continue
    return root.get("doc")


def load_or_usage_error(text: str, overrides: list[str] | None = None) -> None:
    try:
        load_profile_text(text, "prop.yaml", overrides, environ={})
    except UsageError as exc:
        assert str(exc).startswith("prop.yaml: ") or "--set" in str(exc) or "simulator" in str(exc)
        assert len(str(exc).splitlines()) <= 1, str(exc)


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(ops=OPS)
def test_mutated_profiles_load_or_fail_cleanly(ops: list[tuple[str, tuple[Any, ...], Any]]) -> None:
    load_or_usage_error(yaml.safe_dump(mutate(BASE_DOC, ops)))


@PROPERTY
@given(
    cut=st.tuples(st.integers(0, 2000), st.integers(0, 60)),
    garbage=st.text(max_size=30)
    | st.sampled_from(["[", "{", ":", "- ", "\t", "&a", "*a", "!!int", "? ", "'", "%"]),
)
def test_garbled_yaml_text_loads_or_fails_cleanly(cut: tuple[int, int], garbage: str) -> None:
    text = yaml.safe_dump(BASE_DOC)
    start = cut[0] % (len(text) + 1)
    load_or_usage_error(text[:start] + garbage + text[start + cut[1] :])


@PROPERTY
@given(text=st.text(max_size=200))
def test_arbitrary_text_loads_or_fails_cleanly(text: str) -> None:
    load_or_usage_error(text)


@PROPERTY
@given(
    overrides=st.lists(
        st.tuples(
            st.sampled_from([".".join(map(str, p)) for p in PATHS if p]) | st.text(max_size=10),
            st.text(max_size=10),
        ).map(lambda kv: f"{kv[0]}={kv[1]}")
        | st.text(max_size=15),
        min_size=1,
        max_size=3,
    )
)
def test_random_overrides_load_or_fail_cleanly(overrides: list[str]) -> None:
    load_or_usage_error(yaml.safe_dump(BASE_DOC), overrides)


# -- the real CLI on generated broken profiles -----------------------------------------------------


def _broken_profiles(count: int, seed: int) -> list[str]:
    """`count` YAML texts (seeded, so fixed) that the loader rejects with a ProfileError."""
    rng = random.Random(seed)
    scalars: list[Any] = [
        None,
        True,
        -1,
        10**30,
        1.5,
        float("nan"),
        "",
        "x",
        *TRICKY_TEXT,
        [],
        {},
        [1, "a"],
        {"k": 1},
    ]
    texts = [
        "name: [unclosed",
        "- a list\n",
        "name: x\nduration: 2001-13-01\n",
        yaml.safe_dump(
            {**BASE_DOC, "groups": {"we\nird": BASE_DOC["groups"]["browse"], **BASE_DOC["groups"]}}
        ),
    ]
    while len(texts) < count:
        ops = []
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(["set", "set", "delete", "extra"])
            if kind == "extra":
                ops.append((kind, rng.choice(DICT_PATHS), (rng.choice([*KEYS, "zzz"]), rng.choice(scalars))))
            else:
                ops.append((kind, rng.choice(PATHS), rng.choice(scalars)))
        text = yaml.safe_dump(mutate(BASE_DOC, ops))
        try:
            load_profile_text(text, environ={})
        except ProfileError:
            texts.append(text)
        except Exception:  # not this test's business (the in-process properties catch it)
            continue
    return texts


def test_cli_validate_rejects_generated_broken_profiles_in_one_line(tmp_path: Path) -> None:
    paths = []
    for i, text in enumerate(_broken_profiles(20, seed=20240607)):
        path = tmp_path / f"broken-{i:02d}.yaml"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    env["HARNESS_DB"] = str(tmp_path / "h.db")

    def validate(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "harness", "validate", str(path)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        results = list(pool.map(validate, paths))
    for path, proc in zip(paths, results, strict=True):
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2, (path.name, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1, (path.name, proc.stderr)
        assert lines[0].startswith(f"harness: error: {path}: "), lines[0]
