"""Scoped environment variables for SDKs that read their settings from the environment (MLflow, pluto).

A worker process runs one group, so setting them for the worker is safe; `restore` puts back what was
there before (in `teardown`).
"""

from __future__ import annotations

import os


def set_env(values: dict[str, str], removed: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Set `values` and remove `removed`; returns the previous values for `restore_env`."""
    saved = {k: os.environ.get(k) for k in (*values, *removed)}
    os.environ.update(values)
    for key in removed:
        os.environ.pop(key, None)
    return saved


def restore_env(saved: dict[str, str | None]) -> None:
    """Put back the variables `set_env` changed."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
