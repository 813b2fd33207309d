"""Who may use the panel: loopback by default, a token anywhere else, CSRF and Origin checks on changes.

- `check_bind` refuses a non-loopback address without a token (the panel starts run processes and
  imports the simulators a profile names: it must not be open to a network).
- With a token configured, every API call and Socket.IO connection needs either the session cookie
  set by `POST /api/login` or `Authorization: Bearer <token>` (Socket.IO: `auth={"token": ...}`).
- A state-changing request from a browser (it has the cookie) must carry `X-CSRF-Token` equal to the
  session's token from `GET /api/session`, and an `Origin`, when sent, equal to the request's host.
  A Bearer client has no cookie a third-party page could ride on, so it is exempt.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from typing import Any
from urllib.parse import urlsplit

from flask import Request, current_app, session

from harness.errors import UsageError

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
CSRF_HEADER = "X-CSRF-Token"


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost (an empty host means every address: not loopback)."""
    if not host:
        return False
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """UsageError if `host` is not a loopback address and no token is set."""
    if not is_loopback(host) and not token:
        raise UsageError(
            f"refusing to serve the panel on {host} without a token: "
            "pass --token or set HARNESS_TOKEN (or bind 127.0.0.1)"
        )


def token_fingerprint(token: str) -> str:
    """What the session keeps to say it logged in with `token` (never the token itself)."""
    return hashlib.sha256(b"harness-panel:" + token.encode()).hexdigest()[:32]


def token_matches(given: Any, token: str | None) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    if not token or not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


def configured_token() -> str | None:
    """The app's token, or None when no authentication is required."""
    token = current_app.config.get("TOKEN")
    return str(token) if token else None


def session_authenticated(token: str | None) -> bool:
    """True if the session cookie says this browser logged in with the current token."""
    if token is None:
        return True
    mark = session.get("auth")
    return isinstance(mark, str) and hmac.compare_digest(mark, token_fingerprint(token))


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer ...` header, if there is one."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def csrf_token() -> str:
    """The session's CSRF token (created on first use)."""
    value = session.get("csrf")
    if not isinstance(value, str) or len(value) < 32:
        value = secrets.token_urlsafe(32)
        session["csrf"] = value
    return value


def origin_ok(request: Request) -> bool:
    """True if the request has no Origin header, or one whose host:port is the request's host."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return (
        bool(parts.scheme in ("http", "https") and parts.netloc)
        and parts.netloc.lower() == (request.host or "").lower()
    )


def csrf_ok(request: Request) -> bool:
    """True if a cookie-carrying request proves it came from the panel's own page."""
    expected = session.get("csrf")
    given = request.headers.get(CSRF_HEADER, "")
    if not isinstance(expected, str) or not expected or not given:
        return False
    return hmac.compare_digest(given.encode(), expected.encode()) and origin_ok(request)


def served_on_loopback(environ: dict[str, Any]) -> bool:
    """True if the server socket that received this request is bound to a loopback address.

    `harness serve` checks the bind address before it starts; under gunicorn the app cannot see
    `-b`, so each request checks the address the server reports (SERVER_NAME is the bound host
    for both werkzeug and gunicorn).
    """
    return is_loopback(str(environ.get("SERVER_NAME", "")))
