"""The `genie` embedded target, driven through the real `databricks-sdk`: Genie conversations and their
status lifecycle, listing and paging, auth and permission errors as the SDK's typed exceptions,
question throttling, SQL statement execution, the embeddings endpoint and the seeded history."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from aiohttp import web
from databricks.sdk import WorkspaceClient
from databricks.sdk.config import Config
from databricks.sdk.errors import (
    BadRequest,
    InvalidState,
    NotFound,
    OperationFailed,
    PermissionDenied,
    ResourceDoesNotExist,
    Unauthenticated,
)
from databricks.sdk.service.dashboards import MessageErrorType, MessageStatus
from databricks.sdk.service.sql import StatementState

from harness.errors import UsageError
from harness.targets import TARGETS, get_target
from harness.targets.genie import (
    PHASES,
    STATE,
    GenieConfig,
    GenieState,
    build_app,
    embed_text,
    normalise_question,
    question_sql,
    result_for_sql,
)
from harness.targets.runner import EmbeddedTarget

SPACE = "demo-space"
WAREHOUSE = "demo-warehouse"
EMBEDDER = "databricks-gte-large-en"
# Instant phases and no sampled failures unless a test asks for them.
INSTANT = dict.fromkeys(PHASES, 0)
FAST: dict[str, Any] = {
    "service_time": 0,
    "phases": INSTANT,
    "failed_rate": 0,
    "text_only_rate": 0,
    "query_result_time": 0,
    "statement_time": "20ms",
    "embedding_time": 0,
}


@dataclass
class Served:
    url: str
    app: web.Application

    @property
    def state(self) -> GenieState:
        return self.app[STATE]

    def stats(self) -> dict[str, Any]:
        response = requests.get(f"{self.url}/_stats", timeout=5)
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        return body


@contextmanager
def serving(**overrides: Any) -> Iterator[Served]:
    """A genie target with FAST plus `overrides`, served on 127.0.0.1 from an event loop in a thread
    (the SDK is synchronous, so it runs in the test's own thread)."""
    app = build_app(GenieConfig.model_validate({**FAST, **overrides}))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, name="genie-target", daemon=True)
    thread.start()
    try:
        yield Served(f"http://127.0.0.1:{port}", app)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextmanager
def workspace(url: str, token: str = "t", retry_timeout: int = 5) -> Iterator[WorkspaceClient]:
    """The real SDK client; `retry_timeout_seconds` only works through `Config`."""
    w = WorkspaceClient(config=Config(host=url, token=token, retry_timeout_seconds=retry_timeout))
    try:
        yield w
    finally:
        w.api_client._api_client._session.close()


@pytest.fixture(autouse=True)
def _no_databricks_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the environment may point the SDK elsewhere or through a proxy."""
    for name in list(os.environ):
        if name.startswith("DATABRICKS_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def poll(w: WorkspaceClient, cid: str, mid: str, *, until: float = 5.0) -> tuple[Any, list[str]]:
    """Poll `get_message` until a final status; the final message and every distinct status seen."""
    deadline = time.monotonic() + until
    seen: list[str] = []
    while True:
        message = w.genie.get_message(SPACE, cid, mid)
        status = message.status.value
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in ("COMPLETED", "FAILED", "CANCELLED"):
            return message, seen
        assert time.monotonic() < deadline, f"still {status} after {until}s"
        time.sleep(0.005)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# --- config and registry --------------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    kind = get_target("genie")
    assert TARGETS["genie"].config_model is GenieConfig and "Genie" in kind.description
    config = GenieConfig()
    assert (config.concurrency, config.queue_limit, config.space_id) == (64, 1024, SPACE)
    assert set(config.phases) == set(PHASES)
    mean = sum(d.mean() for d in config.phases.values())
    assert 2.0 <= mean <= 3.0
    assert config.phases["ASKING_AI"].type == "lognormal"  # the AI phase varies
    # Phases not given keep their defaults; names are case-insensitive.
    merged = kind.parse_config({"phases": {"asking_ai": "2s"}})
    assert isinstance(merged, GenieConfig)
    assert merged.phases["ASKING_AI"].mean() == 2.0 and merged.phases["SUBMITTED"].mean() == 0.3
    with pytest.raises(UsageError, match="unknown phase 'THINKING'"):
        kind.parse_config({"phases": {"THINKING": "1s"}})
    with pytest.raises(UsageError, match="failed_rate"):
        kind.parse_config({"failed_rate": 0.7, "cancelled_rate": 0.5})
    with pytest.raises(UsageError, match="conversations"):
        kind.parse_config({"conversations": 10_001})
    with pytest.raises(UsageError, match="nope"):
        kind.parse_config({"nope": 1})


# --- the question lifecycle -----------------------------------------------------------------------


def test_question_goes_through_every_phase_to_a_query_result() -> None:
    phases = dict.fromkeys(PHASES, "60ms")
    question = "What were total sales last month?"
    with serving(phases=phases) as served, workspace(served.url) as w:
        assert w.config.workspace_id == "1234567890123456"  # from /.well-known/databricks-config
        space = w.genie.get_space(SPACE)
        assert space.title and space.description and space.warehouse_id == WAREHOUSE
        assert [s.space_id for s in w.genie.list_spaces().spaces or []] == [SPACE]

        waiter = w.genie.start_conversation(SPACE, question)
        started = waiter.response
        assert started.conversation_id and started.message_id
        assert started.conversation.title == question and started.message.content == question
        assert started.message.status == MessageStatus.SUBMITTED
        message, seen = poll(w, started.conversation_id, started.message_id)
        # Every status in order (each lasts 60 ms and we poll every few ms), then COMPLETED.
        assert seen == [*PHASES, "COMPLETED"], seen
        assert message.message_id == message.id == started.message_id
        assert message.conversation_id == started.conversation_id and message.space_id == SPACE
        assert message.user_id and message.created_timestamp
        assert message.last_updated_timestamp >= message.created_timestamp + 300  # five phases of 60 ms
        assert message.error is None

        attachments = message.attachments or []
        text = [a for a in attachments if a.text]
        queries = [a for a in attachments if a.query]
        suggested = [a for a in attachments if a.suggested_questions]
        assert len(text) == len(queries) == len(suggested) == 1
        query = queries[0].query
        assert query.query == question_sql(question) and query.query.lstrip().startswith("-- genie:")
        assert "SELECT" in query.query and query.title and query.description and query.statement_id
        # The same question, however typed, gives the same SQL; another question other SQL.
        assert question_sql("  what were TOTAL sales last month ") == query.query
        assert question_sql("Which stores had the highest sales last quarter?") != query.query
        assert suggested[0].suggested_questions.questions

        result = w.genie.get_message_attachment_query_result(
            SPACE, started.conversation_id, started.message_id, queries[0].attachment_id
        ).statement_response
        assert result.status.state == StatementState.SUCCEEDED
        assert result.statement_id == query.statement_id
        columns = [c.name for c in result.manifest.schema.columns]
        assert len(columns) == 2 and result.manifest.schema.column_count == 2
        rows = result.result.data_array
        assert rows and len(rows) == query.query_result_metadata.row_count
        assert rows == result_for_sql(query.query)[1]
        # Re-running it is a new statement with the same rows.
        again = w.genie.execute_message_attachment_query(
            SPACE, started.conversation_id, started.message_id, queries[0].attachment_id
        ).statement_response
        assert again.status.state == StatementState.SUCCEEDED and again.statement_id != result.statement_id
        assert again.result.data_array == rows
        with pytest.raises(ResourceDoesNotExist):
            w.genie.get_message_attachment_query_result(
                SPACE, started.conversation_id, started.message_id, text[0].attachment_id
            )

        # A follow-up in the same conversation.
        follow = w.genie.create_message(SPACE, started.conversation_id, "Break that down by region").response
        assert follow.message_id and follow.status == MessageStatus.SUBMITTED
        done, _ = poll(w, started.conversation_id, follow.message_id)
        assert done.status == MessageStatus.COMPLETED and done.content == "Break that down by region"
        listed = w.genie.list_conversation_messages(SPACE, started.conversation_id)
        assert [m.message_id for m in listed.messages] == [started.message_id, follow.message_id]
        assert listed.next_page_token is None
        assert all(m.status == MessageStatus.COMPLETED for m in listed.messages)
        stats = served.stats()
        assert stats["served"] > 0 and stats["genie"]["questions"] == 2
        assert stats["genie"]["messages_by_status"]["COMPLETED"] == 2
        assert stats["genie"]["query_results"] == 1 and stats["genie"]["queries_executed"] == 1


def test_query_result_while_executing_and_before() -> None:
    slow = {**INSTANT, "EXECUTING_QUERY": "5s"}
    with serving(phases=slow) as served, workspace(served.url) as w:
        started = w.genie.start_conversation(SPACE, "Show monthly revenue for the last 12 months").response
        message = w.genie.get_message(SPACE, started.conversation_id, started.message_id)
        assert message.status == MessageStatus.EXECUTING_QUERY
        # While the query runs, the query attachment is there and its result is RUNNING.
        (attachment,) = message.attachments or []
        assert attachment.query is not None
        running = w.genie.get_message_attachment_query_result(
            SPACE, started.conversation_id, started.message_id, attachment.attachment_id
        ).statement_response
        assert running.status.state == StatementState.RUNNING and running.result is None
    with serving(phases={**INSTANT, "ASKING_AI": "5s"}) as served, workspace(served.url) as w:
        started = w.genie.start_conversation(SPACE, "What were total sales last month?").response
        message = w.genie.get_message(SPACE, started.conversation_id, started.message_id)
        assert message.status == MessageStatus.ASKING_AI and not message.attachments
        state = served.state
        query_id = state.conversations[started.conversation_id].messages[started.message_id].query_id
        with pytest.raises(InvalidState, match="ASKING_AI"):
            w.genie.get_message_attachment_query_result(
                SPACE, started.conversation_id, started.message_id, query_id
            )


def test_failed_cancelled_and_text_only_answers() -> None:
    with serving(failed_rate=1) as served, workspace(served.url) as w:
        started = w.genie.start_conversation(SPACE, "What is the gross margin by product category?").response
        message, seen = poll(w, started.conversation_id, started.message_id)
        assert message.status == MessageStatus.FAILED and seen[-1] == "FAILED"
        assert message.error.error and isinstance(message.error.type, MessageErrorType)
        assert not message.attachments
        query_id = served.state.conversations[started.conversation_id].messages[started.message_id].query_id
        with pytest.raises(InvalidState, match="FAILED"):
            w.genie.get_message_attachment_query_result(
                SPACE, started.conversation_id, started.message_id, query_id
            )
        # The SDK's own waiter raises on FAILED.
        with pytest.raises(OperationFailed, match="FAILED"):
            w.genie.start_conversation_and_wait(SPACE, "And by region?")
        assert served.stats()["genie"]["messages_by_status"] == {"COMPLETED": 0, "FAILED": 2, "CANCELLED": 0}
    with serving(cancelled_rate=1) as served, workspace(served.url) as w:
        started = w.genie.start_conversation(SPACE, "What were total sales last month?").response
        message, _ = poll(w, started.conversation_id, started.message_id)
        assert message.status == MessageStatus.CANCELLED and not message.attachments
    phases = dict.fromkeys(PHASES, "40ms")
    with serving(text_only_rate=1, phases=phases) as served, workspace(served.url) as w:
        started = w.genie.start_conversation(SPACE, "What were total sales last month?").response
        message, seen = poll(w, started.conversation_id, started.message_id)
        assert message.status == MessageStatus.COMPLETED
        # No query, so no warehouse phases.
        assert "ASKING_AI" in seen and "PENDING_WAREHOUSE" not in seen and "EXECUTING_QUERY" not in seen
        attachments = message.attachments or []
        assert [a.query for a in attachments] == [None, None]
        assert attachments[0].text.content and attachments[1].suggested_questions.questions
        with pytest.raises(ResourceDoesNotExist):
            w.genie.get_message_attachment_query_result(
                SPACE, started.conversation_id, started.message_id, attachments[0].attachment_id
            )
        assert served.stats()["genie"]["text_only"] == 1


# --- listing and the seeded history ---------------------------------------------------------------


def test_list_conversations_pages_and_include_all() -> None:
    with serving(conversations=30, own_share=0.5) as served, workspace(served.url) as w:
        pages: list[list[Any]] = []
        token = None
        while True:
            page = w.genie.list_conversations(SPACE, include_all=True, page_size=7, page_token=token)
            pages.append(page.conversations or [])
            token = page.next_page_token
            if token is None:
                break
        everyone = [c for page in pages for c in page]
        assert [len(p) for p in pages] == [7, 7, 7, 7, 2]
        assert len({c.conversation_id for c in everyone}) == 30
        stamps = [c.created_timestamp for c in everyone]
        assert stamps == sorted(stamps, reverse=True)  # newest first
        assert all(c.title for c in everyone)
        # Without include_all: only the caller's own, half of them.
        mine = w.genie.list_conversations(SPACE).conversations or []
        assert len(mine) == 15 and {c.conversation_id for c in mine} < {c.conversation_id for c in everyone}
        state = served.state
        assert all(state.conversations[c.conversation_id].owner == "me@example.com" for c in mine)
        # A new conversation is listed first, in both.
        started = w.genie.start_conversation(SPACE, "How many orders did we ship last week?").response
        assert w.genie.list_conversations(SPACE, page_size=1).conversations[0].conversation_id == (
            started.conversation_id
        )
        first = w.genie.list_conversations(SPACE, include_all=True, page_size=1).conversations[0]
        assert first.conversation_id == started.conversation_id
        # The default and largest page is 100.
        with serving(conversations=150) as big, workspace(big.url) as w2:
            page = w2.genie.list_conversations(SPACE, include_all=True, page_size=500)
            assert len(page.conversations) == 100 and page.next_page_token
        with pytest.raises(BadRequest):
            w.genie.list_conversations(SPACE, page_token="not-a-token")

        # Messages of a long conversation, one per page, oldest first.
        long_one = max(state.conversations.values(), key=lambda c: len(c.messages))
        assert len(long_one.messages) >= 3
        ids: list[str] = []
        token = None
        while True:
            page = w.genie.list_conversation_messages(SPACE, long_one.id, page_size=1, page_token=token)
            ids += [m.message_id for m in page.messages]
            token = page.next_page_token
            if token is None:
                break
        full = w.genie.list_conversation_messages(SPACE, long_one.id).messages
        assert ids == [m.message_id for m in full] == list(long_one.messages)
        stamps = [m.created_timestamp for m in full]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


def test_seeded_history_is_realistic_and_deterministic() -> None:
    config = GenieConfig(conversations=200, history_days=30)

    def snapshot(state: GenieState) -> list[tuple[Any, ...]]:
        return [
            (c.id, c.title, c.owner, [(m.id, m.content, m.text_only) for m in c.order]) for c in state.order
        ]

    state = GenieState(config)
    assert snapshot(state) == snapshot(GenieState(config))
    assert snapshot(state) != snapshot(GenieState(config.model_copy(update={"seed": 1})))
    assert len(state.conversations) == state.seeded_conversations == 200
    owners = [c.owner for c in state.order]
    assert owners.count("me@example.com") == 100 and len(set(owners)) > 3
    sizes = {len(c.messages) for c in state.order}
    assert sizes == {1, 2, 3, 4, 5}
    now_ms = time.time() * 1000
    for conversation in state.order:
        stamps = [m.created_ms for m in conversation.order]
        assert stamps == sorted(stamps) and stamps[0] == conversation.created_ms
        assert now_ms - 30.5 * 86_400_000 <= stamps[0] and stamps[-1] <= now_ms
        assert conversation.order[0].content  # a conversation starts with a question
    spread = [c.created_ms for c in state.order]
    assert max(spread) - min(spread) > 20 * 86_400_000  # spread over the month
    # Popular questions come back word for word, and as paraphrases.
    firsts = [normalise_question(c.order[0].content) for c in state.order]
    assert max(firsts.count(q) for q in set(firsts)) >= 10
    assert "what was our total revenue last month" in firsts or "show me total sales for last month" in firsts
    follow_ups = [m.content for c in state.order for m in c.order[1:]]
    assert "" in follow_ups and follow_ups.count("") < len(follow_ups) / 5  # a few empty ones
    assert any(f.startswith("Break that down by") for f in follow_ups)
    # Seeded messages are all COMPLETED, with attachments, query results included.
    with serving(conversations=12) as served, workspace(served.url) as w:
        queries = 0
        for summary in w.genie.list_conversations(SPACE, include_all=True).conversations:
            for message in w.genie.list_conversation_messages(SPACE, summary.conversation_id).messages:
                assert message.status == MessageStatus.COMPLETED and message.attachments
                for attachment in message.attachments:
                    if attachment.query:
                        queries += 1
                        result = w.genie.get_message_attachment_query_result(
                            SPACE, summary.conversation_id, message.message_id, attachment.attachment_id
                        )
                        assert result.statement_response.status.state == StatementState.SUCCEEDED
                        assert attachment.query.query == question_sql(message.content)
        assert queries >= 10


# --- errors ---------------------------------------------------------------------------------------


def test_auth_permissions_and_not_found_as_sdk_errors() -> None:
    with serving(token="secret", denied_tokens=["viewer"], conversations=10) as served:
        with workspace(served.url, token="wrong") as w, pytest.raises(Unauthenticated):
            w.genie.get_space(SPACE)
        bare = requests.get(f"{served.url}/api/2.0/genie/spaces/{SPACE}", timeout=5)
        assert bare.status_code == 401 and bare.json()["error_code"] == "UNAUTHENTICATED"
        assert requests.get(f"{served.url}/health", timeout=5).status_code == 200
        with workspace(served.url, token="viewer") as w:
            with pytest.raises(PermissionDenied):
                w.genie.get_space(SPACE)
            with pytest.raises(PermissionDenied):
                w.genie.start_conversation(SPACE, "What were total sales last month?")
            assert not w.genie.list_spaces().spaces
        with workspace(served.url, token="secret") as w:
            with pytest.raises(ResourceDoesNotExist):
                w.genie.get_space("someone-elses-space")
            with pytest.raises(NotFound):
                w.genie.start_conversation("someone-elses-space", "hi")
            with pytest.raises(NotFound):
                w.genie.get_message(SPACE, "no-such-conversation", "m")
            # A colleague's conversation can be read but not written to, as with the real service.
            theirs = next(c for c in served.state.order if c.owner != "me@example.com")
            assert w.genie.list_conversation_messages(SPACE, theirs.id).messages
            with pytest.raises(PermissionDenied, match="another user"):
                w.genie.create_message(SPACE, theirs.id, "Break that down by month")
            with pytest.raises(PermissionDenied):
                w.genie.delete_conversation(SPACE, theirs.id)
            with pytest.raises(BadRequest):
                w.genie.start_conversation(SPACE, "   ")
            # One's own conversation can be deleted.
            mine = w.genie.start_conversation(SPACE, "What were total sales last month?").response
            w.genie.delete_conversation(SPACE, mine.conversation_id)
            with pytest.raises(NotFound):
                w.genie.list_conversation_messages(SPACE, mine.conversation_id)
        unknown = requests.get(
            f"{served.url}/api/2.0/nothing", headers={"Authorization": "Bearer secret"}, timeout=5
        )
        assert unknown.status_code == 404 and unknown.json()["error_code"] == "ENDPOINT_NOT_FOUND"
        genie = served.stats()["genie"]
        assert genie["unauthenticated"] == 2 and genie["permission_denied"] >= 4


def test_questions_per_minute_throttles_with_retry_after() -> None:
    # A window of 1.5 s rather than a minute, so that the SDK's retry gets in quickly.
    with serving(questions_per_minute=2, questions_window="1500ms") as served:
        url = f"{served.url}/api/2.0/genie/spaces/{SPACE}/start-conversation"
        auth = {"Authorization": "Bearer t"}
        with requests.Session() as s:
            codes = [s.post(url, json={"content": f"q{i}"}, headers=auth, timeout=5) for i in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert codes[2].json()["error_code"] == "RESOURCE_EXHAUSTED"
        assert codes[2].headers["Retry-After"] == "2"  # whole seconds until the oldest leaves the window
        # The SDK retries a 429 itself, after Retry-After (+ up to 1 s of jitter), and then gets in.
        with workspace(served.url) as w:
            start = time.monotonic()
            started = w.genie.start_conversation(SPACE, "What were total sales last month?").response
            elapsed = time.monotonic() - start
        assert started.message_id
        genie = served.stats()["genie"]
        # Throttled once more (the window was still full), it waited Retry-After and succeeded.
        assert genie["throttled"] == 2 and genie["questions"] == 3 and elapsed >= 2.0


# --- SQL statement execution ----------------------------------------------------------------------


def test_statement_execution_inline_and_polled() -> None:
    sql = question_sql("Which stores had the highest sales last quarter?")
    with serving(statement_time="300ms") as served, workspace(served.url) as w:
        inline = w.statement_execution.execute_statement(statement=sql, warehouse_id=WAREHOUSE)
        assert inline.status.state == StatementState.SUCCEEDED and inline.statement_id
        assert [c.name for c in inline.manifest.schema.columns] == ["store", "net_sales"]
        assert inline.manifest.total_row_count == len(inline.result.data_array) == 10
        assert inline.result.data_array == result_for_sql(sql)[1]

        queued = w.statement_execution.execute_statement(
            statement=sql, warehouse_id=WAREHOUSE, wait_timeout="0s"
        )
        assert queued.status.state == StatementState.PENDING and queued.result is None
        seen = [queued.status.state]
        deadline = time.monotonic() + 5
        while seen[-1] != StatementState.SUCCEEDED:
            assert time.monotonic() < deadline
            time.sleep(0.01)
            got = w.statement_execution.get_statement(queued.statement_id)
            if got.status.state != seen[-1]:
                seen.append(got.status.state)
        assert seen == [StatementState.PENDING, StatementState.RUNNING, StatementState.SUCCEEDED]
        assert got.result.data_array == inline.result.data_array

        limited = w.statement_execution.execute_statement(statement=sql, warehouse_id=WAREHOUSE, row_limit=3)
        assert len(limited.result.data_array) == 3 and limited.manifest.truncated

        cancelled = w.statement_execution.execute_statement(
            statement="SELECT 1", warehouse_id=WAREHOUSE, wait_timeout="0s"
        )
        w.statement_execution.cancel_execution(cancelled.statement_id)
        assert (
            w.statement_execution.get_statement(cancelled.statement_id).status.state
            == StatementState.CANCELED
        )

        bad = w.statement_execution.execute_statement(statement="hello world", warehouse_id=WAREHOUSE)
        assert bad.status.state == StatementState.FAILED and "PARSE_SYNTAX_ERROR" in bad.status.error.message
        with pytest.raises(ResourceDoesNotExist):
            w.statement_execution.execute_statement(statement=sql, warehouse_id="other-warehouse")
        with pytest.raises(BadRequest, match="wait_timeout"):
            w.statement_execution.execute_statement(statement=sql, warehouse_id=WAREHOUSE, wait_timeout="3s")
        with pytest.raises(NotFound):
            w.statement_execution.get_statement("no-such-statement")
        genie = served.stats()["genie"]
        assert (
            genie["statements"] == 5 and genie["statements_canceled"] == 1 and genie["statements_failed"] == 1
        )
    with serving(statement_error_rate=1) as served, workspace(served.url) as w:
        failed = w.statement_execution.execute_statement(statement="SELECT 1", warehouse_id=WAREHOUSE)
        assert failed.status.state == StatementState.FAILED
        assert failed.status.error.error_code is not None and failed.status.error.message


def test_statement_longer_than_wait_timeout_continues_or_cancels() -> None:
    # The shortest wait_timeout the API allows is 5 s: both cases run side by side.
    from databricks.sdk.service.sql import ExecuteStatementRequestOnWaitTimeout as OnTimeout

    with serving(statement_time="5.3s", concurrency=4) as served:
        results: dict[str, Any] = {}

        def run(on_timeout: OnTimeout) -> None:
            with workspace(served.url) as w:
                results[on_timeout.value] = w.statement_execution.execute_statement(
                    statement="SELECT 1",
                    warehouse_id=WAREHOUSE,
                    wait_timeout="5s",
                    on_wait_timeout=on_timeout,
                )

        threads = [threading.Thread(target=run, args=(o,)) for o in (OnTimeout.CONTINUE, OnTimeout.CANCEL)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        assert results["CONTINUE"].status.state == StatementState.RUNNING
        assert results["CANCEL"].status.state == StatementState.CANCELED
        with workspace(served.url) as w:
            time.sleep(0.4)
            done = w.statement_execution.get_statement(results["CONTINUE"].statement_id)
            assert done.status.state == StatementState.SUCCEEDED and done.result.data_array == [["1"]]
            canceled = w.statement_execution.get_statement(results["CANCEL"].statement_id)
            assert canceled.status.state == StatementState.CANCELED


# --- embeddings -----------------------------------------------------------------------------------


def test_embeddings_endpoint_is_deterministic_and_meaningful() -> None:
    texts = [
        "What were total sales last month?",
        "What were total sales last month?",
        "What was our total revenue last month?",
        "Which products are running low on inventory?",
    ]
    with serving() as served, workspace(served.url) as w:
        response = w.serving_endpoints.query(name=EMBEDDER, input=texts)
        vectors = [d.embedding for d in response.data]
        assert [d.index for d in response.data] == [0, 1, 2, 3] and response.model == EMBEDDER
        assert response.usage.prompt_tokens > 0 and response.served_model_name == EMBEDDER
        assert all(len(v) == 1024 for v in vectors)
        assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0) for v in vectors)
        assert vectors[0] == vectors[1] == embed_text(texts[0], 1024)
        paraphrase, unrelated = cosine(vectors[0], vectors[2]), cosine(vectors[0], vectors[3])
        assert paraphrase > 0.45 and unrelated < 0.2 and paraphrase > unrelated + 0.3
        single = w.serving_endpoints.query(name=EMBEDDER, input="What were total sales last month?")
        assert single.data[0].embedding == vectors[0]
        with pytest.raises(ResourceDoesNotExist):
            w.serving_endpoints.query(name="some-other-endpoint", input=["x"])
        with pytest.raises(BadRequest):
            w.serving_endpoints.query(name=EMBEDDER, input=[])
        genie = served.stats()["genie"]
        assert (genie["embedding_calls"], genie["embedded_texts"]) == (2, 5)
    assert embed_text("", 16) == [0.0] * 16
    assert embed_text("sales by region", 64) != embed_text("sales by region", 128)[:64]
    assert (
        cosine(embed_text("Break that down by region", 256), embed_text("break that down by REGION", 256))
        > 0.999
    )


# --- memory bounds and the process ----------------------------------------------------------------


def test_api_created_conversations_and_messages_are_bounded() -> None:
    with serving(conversations=3, max_conversations=2, max_messages=4) as served, workspace(served.url) as w:
        ids = [w.genie.start_conversation(SPACE, f"question {i}").conversation_id for i in range(3)]
        state = served.state
        assert ids[0] not in state.conversations and ids[1] in state.conversations
        assert len(state.conversations) == 3 + 2  # the seeded ones stay
        for i in range(3):
            w.genie.create_message(SPACE, ids[2], f"follow-up {i}")
        # Four API-created messages kept: the oldest went, and with it its emptied conversation.
        assert ids[1] not in state.conversations
        assert [m.content for m in state.conversations[ids[2]].order] == [
            "question 2",
            "follow-up 0",
            "follow-up 1",
            "follow-up 2",
        ]
        genie = served.stats()["genie"]
        assert genie["evicted_conversations"] == 1 and genie["evicted_messages"] == 1


def test_embedded_target_process_answers_the_sdk() -> None:
    config = {"service_time": "1ms", "phases": INSTANT, "failed_rate": 0, "text_only_rate": 0}
    with EmbeddedTarget("genie", "genie", config) as target:
        assert target.url is not None
        with workspace(target.url) as w:
            message = w.genie.start_conversation_and_wait(SPACE, "What were total sales last month?")
            assert message.status == MessageStatus.COMPLETED
            assert any(a.query for a in message.attachments or [])
