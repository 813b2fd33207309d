"""The real CLI on bad input: exit code 2 and one line `harness: error: ...` that says what is wrong."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from harness.store import Store


def test_start_with_unknown_profile(cli: Callable[..., Any], one_line_error: Callable[..., str]) -> None:
    proc = cli("start", "--profile", "nonexistent", "--headless")
    one_line_error(proc, "no profile named 'nonexistent'", "smoke")
    assert proc.stdout == ""


def test_start_with_missing_profile_file(
    cli: Callable[..., Any], one_line_error: Callable[..., str], tmp_path: Path
) -> None:
    one_line_error(
        cli("start", "--profile", str(tmp_path / "nope.yaml")), "profile file not found", "nope.yaml"
    )


def test_start_with_bad_duration(cli: Callable[..., Any], one_line_error: Callable[..., str]) -> None:
    one_line_error(cli("start", "--profile", "smoke", "--duration", "banana"), "--duration", "banana")


def test_start_with_schema_error_names_file_and_field(
    cli: Callable[..., Any], one_line_error: Callable[..., str], tmp_path: Path, smoke_doc: dict[str, Any]
) -> None:
    smoke_doc["groups"]["browse"]["users"] = -5
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(smoke_doc), encoding="utf-8")
    line = one_line_error(
        cli("start", "--profile", str(path), "--headless"), str(path), "groups.browse.users"
    )
    assert "greater than or equal to 0" in line


def test_start_with_bad_http_option_names_the_option(
    cli: Callable[..., Any], one_line_error: Callable[..., str], tmp_path: Path, smoke_doc: dict[str, Any]
) -> None:
    smoke_doc["groups"]["browse"]["options"]["requests"] = []
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(smoke_doc), encoding="utf-8")
    one_line_error(cli("start", "--profile", str(path), "--headless"), "groups.browse.options.requests")


def test_start_with_bad_threshold_names_it(
    cli: Callable[..., Any], one_line_error: Callable[..., str], tmp_path: Path, smoke_doc: dict[str, Any]
) -> None:
    smoke_doc["thresholds"] = ["error_rate < 1%", "p95(browse) < 5 parsecs"]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(smoke_doc), encoding="utf-8")
    one_line_error(
        cli("start", "--profile", str(path), "--headless"),
        str(path),
        "thresholds[1]",
        "cannot read the latency '5 parsecs'",
    )


def test_validate_with_old_threshold_syntax_says_the_new_one(
    cli: Callable[..., Any], one_line_error: Callable[..., str]
) -> None:
    one_line_error(
        cli("validate", "smoke", "--set", "thresholds=['p95_ms[browse] < 500']"),
        "thresholds[0]",
        "write p95(...) < 500ms",
    )


def test_start_with_invalid_yaml(
    cli: Callable[..., Any], one_line_error: Callable[..., str], tmp_path: Path
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: smoke\ngroups: [unclosed\n", encoding="utf-8")
    one_line_error(cli("start", "--profile", str(path), "--headless"), str(path), "invalid YAML", "line ")


def test_start_with_malformed_set(cli: Callable[..., Any], one_line_error: Callable[..., str]) -> None:
    one_line_error(
        cli("start", "--profile", "smoke", "--set", "noequals"), "--set", "expected dotted.key=value"
    )


def test_start_with_set_through_a_scalar(cli: Callable[..., Any], one_line_error: Callable[..., str]) -> None:
    one_line_error(cli("start", "--profile", "smoke", "--set", "name.x=1"), "--set", "name")


def test_validate_with_set_to_a_bad_value(
    cli: Callable[..., Any], one_line_error: Callable[..., str]
) -> None:
    one_line_error(
        cli("validate", "smoke", "--set", "groups.browse.users=many"), "groups.browse.users", "integer"
    )


def test_start_with_missing_variable_names_it(
    cli: Callable[..., Any], one_line_error: Callable[..., str], tmp_path: Path, smoke_doc: dict[str, Any]
) -> None:
    smoke_doc["groups"]["browse"]["options"]["headers"] = {"Authorization": "Bearer ${HARNESS_TEST_NOT_SET}"}
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(smoke_doc), encoding="utf-8")
    one_line_error(
        cli("start", "--profile", str(path), "--headless"),
        "groups.browse.options.headers.Authorization",
        "HARNESS_TEST_NOT_SET",
    )


def test_show_unknown_run(
    cli: Callable[..., Any], one_line_error: Callable[..., str], tmp_path: Path
) -> None:
    db = tmp_path / "empty.db"
    Store(db).close()
    one_line_error(cli("show", "nosuchrun", "--db", str(db)), "no run matches 'nosuchrun'")


def test_show_and_runs_without_a_database(
    cli: Callable[..., Any], one_line_error: Callable[..., str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.db"
    one_line_error(cli("runs", "--db", str(missing)), "no database at", str(missing))
    one_line_error(cli("show", "abc", "--db", str(missing)), "no database at")
    assert not missing.exists()


def test_runs_on_an_empty_database_is_fine(cli: Callable[..., Any], tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    Store(db).close()
    proc = cli("runs", "--db", str(db), "--json")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == []


def test_validate_smoke_passes(cli: Callable[..., Any]) -> None:
    proc = cli("validate", "smoke")
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "'smoke'" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_validate_with_overrides_passes(cli: Callable[..., Any]) -> None:
    proc = cli("validate", "smoke", "--set", "groups.browse.users=3", "--set", "duration=1m")
    assert proc.returncode == 0, proc.stderr
    assert "1m00s" in proc.stdout


def test_unknown_command_and_flags_are_bad_input(cli: Callable[..., Any]) -> None:
    proc = cli("frobnicate")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    proc = cli("start")  # --profile is required
    assert proc.returncode == 2
    assert "--profile" in proc.stderr
    assert cli().returncode == 2  # no command: help, bad input


def test_agent_with_bad_controller_or_processes(
    cli: Callable[..., Any], one_line_error: Callable[..., str]
) -> None:
    one_line_error(cli("agent", "--controller", "ftp://example.com"), "--controller", "http://")
    one_line_error(cli("agent", "--controller", "http://127.0.0.1:9", "--processes", "0"), "--processes")
