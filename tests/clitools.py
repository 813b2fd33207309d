"""Run the real CLI in a subprocess, as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def harness(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None, columns: int | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m harness ARGS` from the repository root, without the caller's HARNESS_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    extra = {"COLUMNS": str(columns)} if columns else {}
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, "PYTHONPATH": str(ROOT), **extra, **(env or {})},
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str | None = None) -> Any:
    """Poll `condition()` until it is truthy and return that value. An exception counts as not yet (a
    database not created yet, a server not up yet); the last one is named if time runs out."""
    deadline = time.monotonic() + timeout
    error: Exception | None = None
    while True:
        try:
            value = condition()
        except Exception as exc:
            value, error = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            last = f" (last error: {error!r})" if error is not None else ""
            raise AssertionError(f"timed out waiting for {what or condition}{last}")
        time.sleep(0.1)
