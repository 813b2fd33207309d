"""Shared helpers: the built-in smoke profile as a dict, and the real CLI run in a subprocess."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE_YAML = REPO / "harness" / "profiles" / "smoke.yaml"
_SMOKE = yaml.safe_load(SMOKE_YAML.read_text(encoding="utf-8"))


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
