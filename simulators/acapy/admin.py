"""An asyncio client of the ACA-Py admin API (aiohttp) for the calls a tenant journey needs.

One `AdminClient` per agent holds one `aiohttp.ClientSession` (created on first use, inside the running
loop; `connections` bounds its pool) and is closed with `close()` or `async with`. Base-wallet calls
(`create_wallet`, `status`, the mediator's own records) carry `X-API-Key` when the agent has an admin
API key; a sub-wallet's calls add `Authorization: Bearer <token>` from `create_wallet`.

Every call returns the parsed JSON. A non-2xx answer raises `AdminError(status, message, path)` whose text
is one line naming the route *template* (`POST /connections/{conn_id}/send-message`) and the agent's
message with ids masked, so a load test's error list deduplicates. Transport errors (aiohttp's, timeouts)
pass through unchanged. The waits poll, as the seed did: `wait_connection_active` and
`wait_invitation_connection` raise `AgentStateError` on an abandoned connection, `wait_mediation_granted`
raises `MediationDeniedError` on a denied request, and both raise `TimeoutError` after `timeout`.

Invitations are out-of-band with didexchange/1.1 by default; `protocol="connections"` uses the older
RFC 0160 `/connections/create-invitation` and `/connections/receive-invitation` the seed's multi-demo
load test called. ACA-Py removed those routes in 2025 (acapy-agent 1.7.0 answers 404); they are for
older external agents.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections import Counter
from types import TracebackType
from typing import Any, Literal

import aiohttp

DIDEXCHANGE = "https://didcomm.org/didexchange/1.1"
ACTIVE_STATES = frozenset({"active", "completed"})
"""A usable connection (RFC 0160 and RFC 23 names of the same state)."""
FAILED_STATES = frozenset({"error", "abandoned"})
RFC23_STATES = {"init": "start", "active": "completed", "error": "abandoned"}
"""RFC 0160 connection state names and their RFC 23 equivalents (ACA-Py answers either, by endpoint)."""
KEY_DERIVATIONS = ("ARGON2I_MOD", "RAW")
"""Sub-wallet key derivations that work.

ACA-Py 1.7.0 hands `wallet_key_derivation` to askar as is: askar takes "RAW" but refuses "ARGON2I_MOD" and
"ARGON2I_INT" ("Invalid store key method"), so ARGON2I_MOD is asked for by leaving the field out (askar's
default, kdf:argon2i:mod). With one shared sub-wallet store the field is ignored.
"""
Protocol = Literal["oob", "connections"]
FORWARDS = "ForwardHandler.handle"
"""The `handler_counts` key of the messages a mediator forwarded (agents started with `--timing`)."""
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.IGNORECASE)
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_PAGE = 1000


def short_message(text: str, limit: int = 200) -> str:
    """One line from an error body: its JSON `message`/`error` or first non-empty line, ids masked."""
    message = text.strip()
    try:
        body = json.loads(message)
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = str(body.get("message") or body.get("error") or body.get("reason") or message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    line = _UUID.sub("<id>", lines[0] if lines else "(empty answer)")
    return line if len(line) <= limit else line[: limit - 1] + "…"


class AdminError(Exception):
    """A non-2xx answer of an ACA-Py admin API (status 0: nothing answered)."""

    def __init__(
        self, status: int, message: str, path: str, *, method: str = "", route: str | None = None
    ) -> None:
        self.status = status
        self.message = message
        self.path = path
        """The path called, with its ids."""
        self.method = method
        self.route = route or path
        """The path template (`/connections/{conn_id}`), used in the text."""
        where = f"{method} {self.route}" if method else self.route
        super().__init__(f"HTTP {status} {where}: {message}" if status else f"{where}: {message}")


class AgentStateError(Exception):
    """A record that reached a failure state: an abandoned connection, a denied mediation."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


class MediationDeniedError(AgentStateError):
    """The mediator denied a mediation request."""


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58, as askar's raw keys use."""
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, digit = divmod(number, 58)
        out.append(_B58[digit])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def raw_wallet_key() -> str:
    """A random askar RAW store key: 32 random bytes, base58 (what `Store.generate_raw_key()` returns)."""
    return b58encode(secrets.token_bytes(32))


def handler_counts(status: dict[str, Any]) -> dict[str, int]:
    """Calls per handler from a `/status` answer (`timing.count`; empty unless the agent runs `--timing`).

    `FORWARDS` counts forwarded messages on a mediator, `BasicMessageHandler.handle` received basic
    messages, `Dispatcher.handle_v1_message` every inbound message. `conductor.task_done` is no substitute:
    it also rises by one for every admin request, `/status` included.
    """
    counts = (status.get("timing") or {}).get("count") or {}
    return {str(k): int(v) for k, v in counts.items()}


def _query(params: dict[str, Any] | None) -> dict[str, str] | None:
    if not params:
        return None
    out = {}
    for key, value in params.items():
        if value is None:
            continue
        out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


class AdminClient:
    """An ACA-Py admin API client: one agent, one shared aiohttp session."""

    def __init__(
        self,
        admin_url: str,
        *,
        api_key: str | None = None,
        connections: int = 100,
        timeout: float = 30.0,
    ) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.api_key = api_key
        self.connection_limit = connections
        """The session's connection pool size."""
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session (idempotent)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.connection_limit, limit_per_host=self.connection_limit
                ),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                raise_for_status=False,
            )
        return self._session

    def headers(self, token: str | None = None) -> dict[str, str]:
        """The headers of a call: `X-API-Key` for the agent, `Authorization: Bearer` for a sub-wallet."""
        headers = {}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        route: str | None = None,
    ) -> Any:
        """One admin call: the parsed JSON answer ({} when empty), AdminError on non-2xx."""
        async with self._session_now().request(
            method,
            self.admin_url + path,
            params=_query(params),
            json=json_body,
            headers=self.headers(token),
        ) as response:
            text = await response.text()
            if response.status >= 300:
                raise AdminError(response.status, short_message(text), path, method=method, route=route)
        if not text.strip():
            return {}
        try:
            return json.loads(text)
        except ValueError:
            return text

    # --- the agent --------------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """`GET /status`: version, label, `conductor` counters, and with `--timing` the `handler_counts`."""
        result: dict[str, Any] = await self.request("GET", "/status")
        return result

    async def ready(self) -> bool:
        """True when `GET /status/ready` answers 200."""
        try:
            await self.request("GET", "/status/ready")
        except AdminError:
            return False
        return True

    # --- sub-wallets ------------------------------------------------------------------------------------

    async def create_wallet(
        self,
        label: str,
        *,
        key_derivation: Literal["ARGON2I_MOD", "RAW"] = "ARGON2I_MOD",
        webhook_url: str | None = None,
        wallet_name: str | None = None,
        wallet_key: str | None = None,
        dispatch_type: Literal["default", "base", "both"] = "default",
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`POST /multitenancy/wallet` (managed, askar): `wallet_id`, `token` and the `wallet_key` used.

        The key is generated unless given: a base58 raw key for RAW, a random passphrase otherwise.
        """
        if key_derivation not in KEY_DERIVATIONS:
            raise ValueError(f"key_derivation must be one of {KEY_DERIVATIONS}, not {key_derivation!r}")
        key = wallet_key or (raw_wallet_key() if key_derivation == "RAW" else secrets.token_urlsafe(24))
        body: dict[str, Any] = {
            "label": label,
            "wallet_name": wallet_name or f"{label}-{secrets.token_hex(6)}",
            "wallet_key": key,
            "wallet_type": "askar",
            "key_management_mode": "managed",
            "wallet_webhook_urls": [webhook_url] if webhook_url else [],
            "wallet_dispatch_type": dispatch_type,
            **(extra or {}),
        }
        if key_derivation == "RAW":  # ARGON2I_MOD is askar's default; sent by name, askar refuses it
            body["wallet_key_derivation"] = "RAW"
        result: dict[str, Any] = await self.request("POST", "/multitenancy/wallet", json_body=body)
        result.setdefault("wallet_key", key)
        return result

    async def remove_wallet(self, wallet_id: str, wallet_key: str | None = None) -> None:
        """`DELETE /multitenancy/wallet/{wallet_id}` (the key only for unmanaged wallets)."""
        await self.request(
            "DELETE",
            f"/multitenancy/wallet/{wallet_id}",
            json_body={"wallet_key": wallet_key} if wallet_key else {},
            route="/multitenancy/wallet/{wallet_id}",
        )

    # --- connections ------------------------------------------------------------------------------------

    async def create_invitation(
        self,
        token: str | None,
        alias: str,
        mediation_id: str | None = None,
        *,
        multi_use: bool = False,
        my_label: str | None = None,
        protocol: Protocol = "oob",
    ) -> dict[str, Any]:
        """An auto-accepted invitation: OOB didexchange/1.1, or RFC 0160 with `protocol="connections"`.

        The OOB record has `invitation`, `invitation_url` and `invi_msg_id`; the RFC 0160 answer has
        `connection_id`, `invitation` and `invitation_url`.
        """
        params: dict[str, Any] = {"auto_accept": True, "multi_use": multi_use}
        body: dict[str, Any] = {}
        if mediation_id:
            body["mediation_id"] = mediation_id
        if my_label:
            body["my_label"] = my_label
        if protocol == "connections":
            params["alias"] = alias
            result: dict[str, Any] = await self.request(
                "POST", "/connections/create-invitation", token=token, params=params, json_body=body
            )
            return result
        body.update({"handshake_protocols": [DIDEXCHANGE], "alias": alias, "use_public_did": False})
        result = await self.request(
            "POST", "/out-of-band/create-invitation", token=token, params=params, json_body=body
        )
        return result

    async def receive_invitation(
        self,
        token: str | None,
        invitation: dict[str, Any],
        alias: str,
        mediation_id: str | None = None,
        *,
        use_existing_connection: bool | None = None,
        protocol: Protocol = "oob",
    ) -> dict[str, Any]:
        """Accept an invitation (auto-accept): the OOB or RFC 0160 connection record, with `connection_id`."""
        params: dict[str, Any] = {"auto_accept": True, "alias": alias, "mediation_id": mediation_id}
        path = "/out-of-band/receive-invitation"
        if protocol == "connections":
            path = "/connections/receive-invitation"
        else:
            params["use_existing_connection"] = use_existing_connection
        result: dict[str, Any] = await self.request(
            "POST", path, token=token, params=params, json_body=invitation
        )
        return result

    async def connection(self, token: str | None, connection_id: str) -> dict[str, Any]:
        """`GET /connections/{conn_id}`."""
        result: dict[str, Any] = await self.request(
            "GET", f"/connections/{connection_id}", token=token, route="/connections/{conn_id}"
        )
        return result

    async def connections(
        self,
        token: str | None = None,
        *,
        alias: str | None = None,
        state: str | None = None,
        invitation_msg_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """`GET /connections` with filters, every page."""
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            params = {
                "alias": alias,
                "state": state,
                "invitation_msg_id": invitation_msg_id,
                "limit": _PAGE,
                "offset": offset,
            }
            page = (await self.request("GET", "/connections", token=token, params=params)).get("results", [])
            out.extend(page)
            if len(page) < _PAGE:
                return out
            offset += _PAGE

    async def connection_by_alias(
        self, token: str | None, alias: str, *, active_only: bool = True
    ) -> dict[str, Any] | None:
        """The connection with this alias (an active one unless `active_only=False`), or None."""
        for record in await self.connections(token, alias=alias):
            if not active_only or record.get("state") in ACTIVE_STATES:
                return record
        return None

    async def wait_connection_active(
        self, token: str | None, connection_id: str, timeout: float = 30.0, poll: float = 0.1
    ) -> dict[str, Any]:
        """Poll a connection until it is active/completed; AgentStateError if abandoned, TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            record = await self.connection(token, connection_id)
            state = record.get("state")
            if state in ACTIVE_STATES:
                return record
            if state in FAILED_STATES:
                raise AgentStateError(f"connection {state}: {record.get('error_msg') or 'no reason'}", record)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"connection not active after {timeout:g}s (state {state})")
            await asyncio.sleep(poll)

    async def wait_invitation_connection(
        self, token: str | None, invi_msg_id: str, timeout: float = 30.0, poll: float = 0.1
    ) -> dict[str, Any]:
        """The inviter's side: poll until a connection from this invitation is active (TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            records = await self.connections(token, invitation_msg_id=invi_msg_id)
            for record in records:
                if record.get("state") in ACTIVE_STATES:
                    return record
            if records and all(r.get("state") in FAILED_STATES for r in records):
                raise AgentStateError(f"connection {records[0].get('state')}", records[0])
            if time.monotonic() >= deadline:
                states = sorted({str(r.get("state")) for r in records}) or ["none"]
                raise TimeoutError(f"invitation not accepted after {timeout:g}s (states {', '.join(states)})")
            await asyncio.sleep(poll)

    # --- mediation --------------------------------------------------------------------------------------

    async def request_mediation(self, token: str | None, connection_id: str) -> dict[str, Any]:
        """`POST /mediation/request/{conn_id}`: the mediation record (`mediation_id`, `state` request)."""
        result: dict[str, Any] = await self.request(
            "POST",
            f"/mediation/request/{connection_id}",
            token=token,
            json_body={},
            route="/mediation/request/{conn_id}",
        )
        return result

    async def mediation(self, token: str | None, mediation_id: str) -> dict[str, Any]:
        """`GET /mediation/requests/{mediation_id}`."""
        result: dict[str, Any] = await self.request(
            "GET",
            f"/mediation/requests/{mediation_id}",
            token=token,
            route="/mediation/requests/{mediation_id}",
        )
        return result

    async def mediation_requests(
        self, token: str | None = None, *, connection_id: str | None = None, state: str | None = None
    ) -> list[dict[str, Any]]:
        """`GET /mediation/requests` (client and server records of this wallet)."""
        answer = await self.request(
            "GET", "/mediation/requests", token=token, params={"conn_id": connection_id, "state": state}
        )
        results: list[dict[str, Any]] = answer.get("results", [])
        return results

    async def wait_mediation_granted(
        self, token: str | None, mediation_id: str, timeout: float = 30.0, poll: float = 0.1
    ) -> dict[str, Any]:
        """Poll a mediation request until granted; MediationDeniedError if denied, else TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            record = await self.mediation(token, mediation_id)
            state = record.get("state")
            if state == "granted":
                return record
            if state == "denied":
                terms = record.get("mediator_terms") or []
                raise MediationDeniedError(
                    "mediation denied by the mediator" + (f" (terms: {', '.join(terms)})" if terms else ""),
                    record,
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"mediation not granted after {timeout:g}s (state {state})")
            await asyncio.sleep(poll)

    async def grant_mediation(self, token: str | None, mediation_id: str) -> dict[str, Any]:
        """The mediator's side: `POST /mediation/requests/{mediation_id}/grant`."""
        result: dict[str, Any] = await self.request(
            "POST",
            f"/mediation/requests/{mediation_id}/grant",
            token=token,
            route="/mediation/requests/{mediation_id}/grant",
        )
        return result

    async def deny_mediation(self, token: str | None, mediation_id: str) -> dict[str, Any]:
        """The mediator's side: `POST /mediation/requests/{mediation_id}/deny`."""
        result: dict[str, Any] = await self.request(
            "POST",
            f"/mediation/requests/{mediation_id}/deny",
            token=token,
            json_body={},
            route="/mediation/requests/{mediation_id}/deny",
        )
        return result

    async def set_default_mediator(self, token: str | None, mediation_id: str) -> dict[str, Any]:
        """`PUT /mediation/{mediation_id}/default-mediator`: new connections route through it."""
        result: dict[str, Any] = await self.request(
            "PUT",
            f"/mediation/{mediation_id}/default-mediator",
            token=token,
            route="/mediation/{mediation_id}/default-mediator",
        )
        return result

    # --- messages ---------------------------------------------------------------------------------------

    async def send_message(self, token: str | None, connection_id: str, content: str) -> dict[str, Any]:
        """A basic message; it is not stored, the receiver sees it as a `basicmessages` webhook."""
        result: dict[str, Any] = await self.request(
            "POST",
            f"/connections/{connection_id}/send-message",
            token=token,
            json_body={"content": content},
            route="/connections/{conn_id}/send-message",
        )
        return result

    async def send_ping(self, token: str | None, connection_id: str, comment: str | None = None) -> str:
        """A trust ping (the response is auto-sent); its thread id."""
        answer = await self.request(
            "POST",
            f"/connections/{connection_id}/send-ping",
            token=token,
            json_body={"comment": comment} if comment else {},
            route="/connections/{conn_id}/send-ping",
        )
        return str(answer.get("thread_id", ""))

    # --- agent-side evidence ----------------------------------------------------------------------------

    async def records_count(
        self, kind: Literal["connections", "mediation"], token: str | None = None
    ) -> dict[str, int]:
        """How many connection or mediation records this wallet holds, by state (RFC 23 connection states)."""
        if kind == "connections":
            records = await self.connections(token)
            return dict(Counter(RFC23_STATES.get(s, s) for s in (str(r.get("state")) for r in records)))
        elif kind == "mediation":
            records = await self.mediation_requests(token)
        else:
            raise ValueError(f"kind must be 'connections' or 'mediation', not {kind!r}")
        return dict(Counter(str(r.get("state")) for r in records))

    async def connections_by_state(self, token: str | None = None) -> dict[str, int]:
        """Connection records by state (`records_count("connections")`)."""
        return await self.records_count("connections", token)

    async def mediation_by_state(self, token: str | None = None) -> dict[str, int]:
        """Mediation records by state (`records_count("mediation")`)."""
        return await self.records_count("mediation", token)


async def fetch_status(admin_url: str, api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """`GET {admin_url}/status` once, with a short-lived client (for an agent without a client of its own)."""
    async with AdminClient(admin_url, api_key=api_key, connections=1, timeout=timeout) as client:
        return await client.status()
