"""The Flask extensions the panel attaches with `init_app` (flaskr's `db.py` pattern)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app
from flask_socketio import SocketIO

if TYPE_CHECKING:
    from harness.store import Store
    from web.runs import RunManager

socketio = SocketIO()
"""The one Socket.IO server; `web.create_app` attaches it with `init_app(app, async_mode="threading")`."""


def get_store() -> Store:
    """The app's store (one engine per app; SQLite in WAL mode, so reads never wait for the collector)."""
    store: Store = current_app.extensions["harness_store"]
    return store


def get_runs() -> RunManager:
    """The app's run manager (the one active run and the live ticks)."""
    manager: RunManager = current_app.extensions["harness_runs"]
    return manager
