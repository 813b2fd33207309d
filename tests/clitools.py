"""Run the real CLI in a subprocess, as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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
