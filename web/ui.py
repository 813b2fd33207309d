"""The `ui` blueprint: the panel's page and its static files (vendored, offline; no CDN)."""

from __future__ import annotations

from flask import Blueprint, Response, make_response, render_template

bp = Blueprint("ui", __name__, template_folder="templates", static_folder="static", static_url_path="/static")

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
"""Only the panel's own files run; nothing is loaded from elsewhere; no page may frame the panel."""


@bp.get("/")
def index() -> Response:
    """The single-page panel."""
    response = make_response(render_template("index.html"))
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.after_app_request
def security_headers(response: Response) -> Response:
    """Headers every response carries."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response
