"""A Genie client on the real `databricks-sdk`: ask a question, poll its message, fetch its query result.

It follows the seed's `databricks_ai_bridge.genie.Genie` (`seed-systems.md` §2.4) but keeps what a load
test needs to see:

- `ask()` posts the question (`start_conversation`, or `create_message` to continue a conversation),
  then polls `get_message` every `poll_interval` (0.5 s, as the seed) until a terminal status. On
  COMPLETED it takes the *last* query attachment and polls its query result while it is PENDING or
  RUNNING. FAILED, CANCELLED, QUERY_RESULT_EXPIRED, a query result that did not succeed and a poll
  timeout are failures with their reason; the seed returned them as answers, so Locust counted
  them as successes.
- Each answer carries its phases, measured on the client at poll resolution: the time to the first
  status other than SUBMITTED (queueing in Genie), the time seen in EXECUTING_QUERY and the query-result
  fetch; `throttled` counts the HTTP 429s the SDK retried on the way (it retries them silently,
  honouring Retry-After, so the wait is inside the latency and this is the only trace of it).
- `run_sql()` re-runs a cached statement through the SQL Statement Execution API on a warehouse, as
  the seed's caches do on a hit.

Every SDK call is blocking (requests), so each runs in the worker's thread pool (`run_blocking`);
the waits between polls are asyncio sleeps, so a thread is held only for the HTTP call itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from databricks.sdk import WorkspaceClient
from databricks.sdk.config import Config

from harness.errors import UsageError

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "QUERY_RESULT_EXPIRED"})
PENDING_STATEMENT = frozenset({"PENDING", "RUNNING"})

RunBlocking = Callable[..., Awaitable[Any]]


async def _to_thread(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(func, *args, **kwargs)


_calls = threading.local()


def _count_throttled(response: Any, *args: Any, **kwargs: Any) -> None:
    """A requests response hook: count the 429s the SDK is about to retry, per calling thread."""
    if response.status_code == 429:
        _calls.throttled = getattr(_calls, "throttled", 0) + 1


def workspace_client(
    host: str | None = None,
    token: str | None = None,
    profile: str | None = None,
    retry_timeout: float = 10.0,
    connections: int = 32,
) -> WorkspaceClient:
    """A `WorkspaceClient` from explicit host/token, a `.databrickscfg` profile, or the environment.

    `retry_timeout` bounds the SDK's retries (its default of 300 s makes an unreachable host hang for
    five minutes); `connections` sizes its HTTP connection pool for many concurrent users.
    """
    kwargs: dict[str, Any] = {}
    if host:
        kwargs["host"] = host
    if token:
        kwargs["token"] = token
    if profile:
        kwargs["profile"] = profile
    try:
        config = Config(
            retry_timeout_seconds=max(1, int(retry_timeout)),
            max_connection_pools=connections,
            max_connections_per_pool=connections,
            **kwargs,
        )
        client = WorkspaceClient(config=config)
    except ValueError as exc:  # the SDK's "cannot configure default credentials" and the like
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"Databricks auth: {first} (set DATABRICKS_HOST and DATABRICKS_TOKEN, a .databrickscfg "
            "profile, or host/token options)"
        ) from None
    _tune_session(client, connections)
    return client


def _tune_session(client: WorkspaceClient, connections: int) -> None:
    """Pool http:// connections as the SDK pools https:// ones, and count retried 429s."""
    import requests

    session = getattr(getattr(client.api_client, "_api_client", None), "_session", None)
    if not isinstance(session, requests.Session):
        return
    adapter = requests.adapters.HTTPAdapter(pool_connections=connections, pool_maxsize=connections)
    session.mount("http://", adapter)
    session.hooks.setdefault("response", []).append(_count_throttled)


def _counted(func: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run an SDK call in this thread; its result and the 429s retried during it."""
    _calls.throttled = 0
    try:
        return func(*args, **kwargs), _calls.throttled
    finally:
        _calls.throttled = 0


def describe_error(exc: BaseException) -> str:
    """One line for an SDK error: its type and first line of message, no request ids."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@dataclass
class GenieAnswer:
    """The outcome of one question, live or from a cache."""

    ok: bool
    error: str | None = None
    conversation_id: str | None = None
    message_id: str | None = None
    status: str | None = None
    sql: str | None = None
    description: str | None = None
    text: str | None = None
    rows: int | None = None
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds spent in each phase: `time_to_first_status`, `executing_query`, `query_result`, …"""
    throttled: int = 0
    """HTTP 429 answers the SDK retried while serving this question."""


class GenieClient:
    """Asks one Genie space questions through the SDK, from asyncio."""

    def __init__(
        self,
        client: WorkspaceClient,
        space_id: str,
        run_blocking: RunBlocking | None = None,
        poll_interval: float = 0.5,
        poll_timeout: float = 250.0,
        fetch_query_result: bool = True,
    ) -> None:
        self.client = client
        self.space_id = space_id
        self.run_blocking = run_blocking or _to_thread
        self.poll_interval = poll_interval
        self.poll_timeout = poll_timeout
        self.fetch_query_result = fetch_query_result

    async def _call(self, answer: GenieAnswer, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result, throttled = await self.run_blocking(_counted, func, *args, **kwargs)
        answer.throttled += throttled
        return result

    async def ask(self, question: str, conversation_id: str | None = None) -> GenieAnswer:
        """Ask `question` (in `conversation_id` if given) and wait for its answer; never raises."""
        answer = GenieAnswer(ok=False, conversation_id=conversation_id)
        genie = self.client.genie
        started = time.perf_counter()
        try:
            if conversation_id is None:
                waiter = await self._call(answer, genie.start_conversation, self.space_id, question)
            else:
                waiter = await self._call(
                    answer, genie.create_message, self.space_id, conversation_id, question
                )
            answer.conversation_id = waiter.conversation_id
            answer.message_id = waiter.message_id
            message = await self._poll(answer, started)
            if message is None:
                return answer
            answer.status = status = _status(message)
            if status != "COMPLETED":
                answer.error = _failure(status, message)
                return answer
            await self._read_attachments(answer, message)
        except Exception as exc:  # an HTTP or SDK error ends this question, not the user
            answer.error = describe_error(exc)
        return answer

    async def _poll(self, answer: GenieAnswer, started: float) -> Any:
        """Poll the message until a terminal status; None (with `answer.error`) on timeout."""
        assert answer.conversation_id is not None and answer.message_id is not None
        deadline = started + self.poll_timeout
        first_status: float | None = None
        executing_since: float | None = None
        status = "SUBMITTED"
        while True:
            message = await self._call(
                answer,
                self.client.genie.get_message,
                self.space_id,
                answer.conversation_id,
                answer.message_id,
            )
            now = time.perf_counter()
            status = _status(message)
            if first_status is None and status != "SUBMITTED":
                first_status = now
                answer.phases["time_to_first_status"] = now - started
            if status == "EXECUTING_QUERY" and executing_since is None:
                executing_since = now
            elif executing_since is not None and "executing_query" not in answer.phases:
                answer.phases["executing_query"] = now - executing_since
            if status in TERMINAL:
                return message
            if now + self.poll_interval > deadline:
                answer.status = status
                answer.error = f"no answer after {self.poll_timeout:g}s (last status {status})"
                return None
            await asyncio.sleep(self.poll_interval)

    async def _read_attachments(self, answer: GenieAnswer, message: Any) -> None:
        query_attachment = None
        texts = []
        for attachment in message.attachments or []:
            if attachment.query is not None:
                query_attachment = attachment  # the last query attachment wins, as in the seed
            elif attachment.text is not None and attachment.text.content:
                texts.append(attachment.text.content)
        answer.text = "\n".join(texts) or None
        if query_attachment is None:
            answer.ok = True  # a text-only answer
            return
        answer.sql = query_attachment.query.query or None
        answer.description = query_attachment.query.description
        if not (self.fetch_query_result and query_attachment.attachment_id):
            answer.ok = True
            return
        began = time.perf_counter()
        deadline = began + self.poll_timeout
        while True:
            result = await self._call(
                answer,
                self.client.genie.get_message_attachment_query_result,
                self.space_id,
                answer.conversation_id,
                answer.message_id,
                query_attachment.attachment_id,
            )
            statement = result.statement_response
            state = _state(statement)
            if state not in PENDING_STATEMENT or time.perf_counter() + self.poll_interval > deadline:
                break
            await asyncio.sleep(self.poll_interval)
        answer.phases["query_result"] = time.perf_counter() - began
        if state == "SUCCEEDED":
            answer.ok = True
            answer.rows = _row_count(statement)
        else:
            answer.error = f"query result {state or 'missing'}{_statement_error(statement)}"

    async def run_sql(self, sql: str, warehouse_id: str, wait_timeout: str = "30s") -> GenieAnswer:
        """Run `sql` on a warehouse through the Statement Execution API and wait for it; never raises."""
        answer = GenieAnswer(ok=False, sql=sql)
        api = self.client.statement_execution
        began = time.perf_counter()
        try:
            statement = await self._call(
                answer,
                api.execute_statement,
                statement=sql,
                warehouse_id=warehouse_id,
                wait_timeout=wait_timeout,
            )
            deadline = began + self.poll_timeout
            while _state(statement) in PENDING_STATEMENT and time.perf_counter() < deadline:
                await asyncio.sleep(self.poll_interval)
                statement = await self._call(answer, api.get_statement, statement.statement_id)
            state = _state(statement)
            answer.status = state
            if state == "SUCCEEDED":
                answer.ok = True
                answer.rows = _row_count(statement)
            else:
                answer.error = f"statement {state or 'missing'}{_statement_error(statement)}"
        except Exception as exc:
            answer.error = describe_error(exc)
        answer.phases["sql_on_warehouse"] = time.perf_counter() - began
        return answer


def _status(message: Any) -> str:
    status = getattr(message, "status", None)
    return str(getattr(status, "value", status) or "SUBMITTED")


def _failure(status: str, message: Any) -> str:
    error = getattr(message, "error", None)
    reason = getattr(error, "error", None) if error is not None else None
    if status == "FAILED":
        return f"FAILED: {reason}" if reason else "FAILED"
    return f"{status}: {reason}" if reason else status


def _state(statement: Any) -> str | None:
    status = getattr(statement, "status", None)
    state = getattr(status, "state", None)
    return str(getattr(state, "value", state)) if state is not None else None


def _statement_error(statement: Any) -> str:
    error = getattr(getattr(statement, "status", None), "error", None)
    message = getattr(error, "message", None) if error is not None else None
    return f": {message}" if message else ""


def _row_count(statement: Any) -> int | None:
    result = getattr(statement, "result", None)
    if result is not None and result.row_count is not None:
        return int(result.row_count)
    manifest = getattr(statement, "manifest", None)
    return (
        int(manifest.total_row_count)
        if manifest is not None and manifest.total_row_count is not None
        else None
    )
