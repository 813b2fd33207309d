"""The web control panel: a Flask app factory, the `api` and `ui` blueprints, Flask-SocketIO handlers.

Serve it with `harness serve` (or the panel of `harness start`), or in production with gunicorn:

    gunicorn --worker-class gthread -w 1 --threads 100 -b 127.0.0.1:8089 'web:create_app()'

Configuration comes from `create_app(config)`, else from the environment: HARNESS_DB, HARNESS_TOKEN,
HARNESS_SECRET_KEY and HARNESS_MESSAGE_QUEUE (a Redis URL when more than one server process serves the
panel: every process then shows and controls every process's active run, see `web.cluster`).
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler

from harness.store import Store, db_arg, default_db_path
from web.extensions import socketio

log = logging.getLogger(__name__)

MAX_PROFILE_BYTES = 64 * 1024
"""The largest profile YAML the panel accepts (a bigger one is 413)."""


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Create the panel app.

    Config keys: HARNESS_DB (database path or URL, see harness.store; default `$HARNESS_DB`, else
    ./harness-data/harness.db),
    TOKEN (None: no authentication; required on a non-loopback address; default `$HARNESS_TOKEN`),
    HOST (the address it will be bound to, checked with `security.check_bind` when given),
    MAX_PROFILE_BYTES (64 KiB), SECRET_KEY (random per process unless given or `$HARNESS_SECRET_KEY`),
    MESSAGE_QUEUE (a Redis URL for a multi-process deployment; default `$HARNESS_MESSAGE_QUEUE`).
    """
    from web import agents, api, events, ui  # noqa: F401  (events, agents register Socket.IO handlers)
    from web.cluster import Cluster, cluster_url
    from web.runs import KEEP_TICKS, RunManager
    from web.security import check_bind

    app = Flask(__name__, static_folder=None)
    app.config.from_mapping(
        HARNESS_DB=str(default_db_path()),
        TOKEN=os.environ.get("HARNESS_TOKEN") or None,
        HOST=None,
        MAX_PROFILE_BYTES=MAX_PROFILE_BYTES,
        SECRET_KEY=os.environ.get("HARNESS_SECRET_KEY") or secrets.token_hex(32),
        MESSAGE_QUEUE=os.environ.get("HARNESS_MESSAGE_QUEUE") or None,
        SESSION_COOKIE_NAME="harness_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
    )
    if config:
        app.config.update(config)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # a body a little above the profile limit is refused before it is read (the API says 413 itself)
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_PROFILE_BYTES"]) * 4 + 16 * 1024
    if app.config["HOST"] is not None:
        check_bind(str(app.config["HOST"]), app.config["TOKEN"])

    options: dict[str, Any] = {"async_mode": "threading", "message_queue": app.config["MESSAGE_QUEUE"]}
    if not app.config["MESSAGE_QUEUE"]:
        options["client_manager"] = None  # forget a queue an earlier app in this process was given
    socketio.init_app(app, **options)
    server = socketio.server

    db_path = db_arg(str(app.config["HARNESS_DB"]))
    store = Store(db_path)
    for run_id in store.recover_aborted():
        log.warning("run %s was left running by a controller that died: marked aborted", run_id)
    app.extensions["harness_store"] = store

    def emit(event: str, data: Any, to: str | None = None) -> None:
        server.emit(event, data, to=to, namespace="/")

    hub = agents.AgentHub(server, bind_host=app.config["HOST"])
    app.extensions["harness_agents"] = hub
    url = cluster_url(app.config["MESSAGE_QUEUE"])
    cluster = Cluster(url, keep_ticks=KEEP_TICKS) if url else None
    if cluster is not None:
        cluster.check()
    manager = RunManager(db_path, emit, socketio.start_background_task, agent_hub=hub, cluster=cluster)
    app.extensions["harness_runs"] = manager
    # a server that exits (gunicorn's SIGTERM, Ctrl-C) stops its run gracefully rather than leaving
    # worker processes behind and the run marked aborted only on the next start
    atexit.register(manager.shutdown, "panel shutdown", 20.0)

    app.register_blueprint(api.bp)
    app.register_blueprint(ui.bp)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        code = exc.code or 500
        if code == 413:
            message = f"request too large: a profile may be at most {app.config['MAX_PROFILE_BYTES']} bytes"
        else:
            message = exc.description or exc.name
        return jsonify(error=message), code

    return app


class _RequestHandler(WSGIRequestHandler):
    """werkzeug's handler, but a connection that ended inside a request is closed, not read on.

    A WebSocket served through werkzeug (simple-websocket) ends by raising ConnectionError from the
    app; werkzeug then kept the HTTP/1.1 connection open and parsed the peer's last WebSocket frames
    (its close frame, after a refused agent or a closed panel tab) as a new request: `code 400, message
    Bad request syntax` and `Bad HTTP/0.9 request type` lines in the terminal.
    """

    def connection_dropped(self, error: BaseException, environ: Any = None) -> None:
        self.close_connection = True


def make_server(app: Flask, host: str, port: int) -> BaseWSGIServer:
    """A threaded werkzeug server for `app` (the panel of `harness serve` and `harness start`).

    Flask-SocketIO's threading mode serves WebSocket through it with simple-websocket; gunicorn
    (gthread) is the production server. UsageError when the address cannot be bound.
    """
    from werkzeug.serving import make_server as werkzeug_server

    from harness.errors import UsageError

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in the terminal
    # bind here: werkzeug prints and exits on a busy port; we want one UsageError line (exit 2)
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"cannot serve the panel on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        return werkzeug_server(
            host, port, app, threaded=True, fd=sock.fileno(), request_handler=_RequestHandler
        )
    except OSError as exc:
        raise UsageError(
            f"cannot serve the panel on {host}:{port}: {exc.strerror or exc} (choose another --port)"
        ) from None
    finally:
        sock.close()  # werkzeug works on its own duplicate of the descriptor


def panel_url(host: str, port: int) -> str:
    """The address to open in a browser."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


__all__ = ["MAX_PROFILE_BYTES", "create_app", "make_server", "panel_url", "socketio"]
