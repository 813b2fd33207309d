"""Socket.IO handlers: authenticate the connection, `join` / `leave` a run's room.

Server → client events: `joined` {run_id, status, ticks} (the recent ticks of an active run),
`tick` (one a second per joined run: the collector's tick plus `run_id`), `run_status`
{run_id, status, profile, error?, exit_code?} to every client when a run's status changes.
"""

from __future__ import annotations

from typing import Any

from flask import request
from flask_socketio import emit, join_room, leave_room

from web.extensions import get_runs, get_store, socketio
from web.security import configured_token, served_on_loopback, session_authenticated, token_matches


@socketio.on("connect")
def on_connect(auth: Any = None) -> None:
    """Refuse a connection without the session cookie or `auth={"token": ...}` when a token is set."""
    token = configured_token()
    if token is None and not served_on_loopback(request.environ):
        raise ConnectionRefusedError("the panel is served on a non-loopback address without a token")
    if token is None or session_authenticated(token):
        return
    given = auth.get("token") if isinstance(auth, dict) else None
    if not token_matches(given, token):
        raise ConnectionRefusedError("unauthorized: log in or pass auth={'token': ...}")


def _run_id(data: Any) -> str | None:
    run_id = data.get("run_id") if isinstance(data, dict) else data
    return run_id if isinstance(run_id, str) and 0 < len(run_id) <= 100 else None


@socketio.on("join")
def on_join(data: Any) -> None:
    """Join a run's room: `joined` {run_id, status, ticks} now, then `tick` events."""
    run_id = _run_id(data)
    if run_id is None:
        emit("error", {"error": "join: expected {run_id: string}"})
        return
    manager = get_runs()
    ticks = manager.join(run_id, lambda: join_room(f"run:{run_id}"))
    record = manager.get(run_id)
    status = record.controller.status if record is not None else manager.status_of(run_id)
    if status is None:
        row = get_store().get_run(run_id)
        status = row.status if row is not None and row.id == run_id else None
    emit("joined", {"run_id": run_id, "status": status, "ticks": ticks})


@socketio.on("leave")
def on_leave(data: Any) -> None:
    """Stop receiving a run's ticks."""
    run_id = _run_id(data)
    if run_id is not None:
        leave_room(f"run:{run_id}")
