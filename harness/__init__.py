"""harness: a multi-process simulation harness with a live control panel.

The Python API (see `harness.api`), imported on first use so that `import harness` stays light for
worker processes:

    harness.open_run(run_id=None, db=None) -> RunData
    harness.list_runs(db=None) -> list[dict]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["RunData", "__version__", "list_runs", "open_run"]

if TYPE_CHECKING:
    from harness.api import RunData, list_runs, open_run


def __getattr__(name: str) -> Any:
    if name in ("RunData", "list_runs", "open_run"):
        from harness import api

        return getattr(api, name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
