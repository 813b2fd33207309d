"""The one exception hierarchy of harness, and the exit codes it maps to.

    HarnessError                 base; `exit_code` says what the CLI returns
    ├── UsageError               bad input: a flag, a file, a value (exit 2)
    │   ├── ProfileError         a profile that does not validate; names file and field path (exit 2)
    │   └── MissingExtraError    a simulator family whose optional packages are not installed (exit 2)
    ├── TargetError              a target that never answered its health check at start (exit 2)
    ├── WorkerBootError          a worker that could not boot; stops the restart loop (exit 3)
    └── AbortedError             a run stopped by a signal or an internal failure (exit 3)

User-facing errors carry what was wrong and how to fix it; a traceback means a bug in harness.
"""

from __future__ import annotations

EXIT_PASSED = 0
EXIT_THRESHOLDS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ABORTED = 3


class HarnessError(Exception):
    """Base of every error harness raises on purpose."""

    exit_code = EXIT_ABORTED


class UsageError(HarnessError):
    """Bad input from the user: a flag, a file or a value."""

    exit_code = EXIT_BAD_INPUT


class ProfileError(UsageError):
    """A profile that does not load or validate."""

    def __init__(self, source: str, field: str | None, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        where = f"{source}: {field}: " if field else f"{source}: "
        super().__init__(where + message)


class MissingExtraError(UsageError):
    """A simulator family whose optional dependencies are not installed."""

    def __init__(self, family: str, module: str, extra: str) -> None:
        super().__init__(
            f"simulator {family!r} needs the Python package {module!r}: pip install 'harness[{extra}]'"
        )


class TargetError(HarnessError):
    """A target that did not become healthy at start."""

    exit_code = EXIT_BAD_INPUT


class WorkerBootError(HarnessError):
    """A worker process that failed before its first heartbeat."""

    exit_code = EXIT_ABORTED


class AbortedError(HarnessError):
    """A run that was aborted."""

    exit_code = EXIT_ABORTED
