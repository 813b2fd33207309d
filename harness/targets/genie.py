"""The `genie` target: a stand-in for a Databricks workspace as `databricks-sdk` calls it.

Three APIs, every route under `Authorization: Bearer <token>` (401 `UNAUTHENTICATED` without a
valid one; `denied_tokens` get 403 `PERMISSION_DENIED` on the space), errors as Databricks JSON
`{"error_code", "message"}` so that the SDK raises its typed errors:

- Genie conversations (`B` = `/api/2.0/genie/spaces/{space_id}`): `GET /api/2.0/genie/spaces`,
  `GET B`, `POST B/start-conversation`, `POST B/conversations/{cid}/messages` (403 in someone
  else's conversation), `GET B/conversations/{cid}/messages/{mid}`, the query result of a query
  attachment (`GET …/attachments/{aid}/query-result`, `POST …/attachments/{aid}/execute-query` and
  the deprecated per-message forms), `GET B/conversations` (paged, newest first; `include_all`
  lists every user's, else only the caller's), `GET B/conversations/{cid}/messages` (paged,
  oldest first) and `DELETE B/conversations/{cid}`.
- SQL statement execution: `POST /api/2.0/sql/statements` (waits up to `wait_timeout` for the
  result, then `CONTINUE`s in the background or `CANCEL`s), `GET /api/2.0/sql/statements/{id}`,
  `POST …/{id}/cancel`, `GET …/{id}/result/chunks/0`.
- An embeddings serving endpoint: `POST /serving-endpoints/{name}/invocations` with `{"input"}`,
  answered with deterministic feature-hashing vectors (`embed_text`).

And `GET /.well-known/databricks-config` (the SDK's start-up probe) and `GET /_stats` (the service
model's counters with the Genie counters under `genie`).

A question moves through SUBMITTED, FETCHING_METADATA, FILTERING_CONTEXT, ASKING_AI,
PENDING_WAREHOUSE and EXECUTING_QUERY for sampled durations (`phases`), then ends COMPLETED (with
a text, a query and a suggested-questions attachment, or only text at `text_only_rate`), FAILED
(`failed_rate`) or CANCELLED (`cancelled_rate`). Each GET computes the status from the time elapsed
since the question was asked: nothing runs in the background. The SQL of a question depends only on
its normalised text (`question_sql`), and a result only on its SQL (`result_for_sql`), so a cached
query re-run on the warehouse returns what Genie showed. `questions_per_minute` caps questions
workspace-wide over a sliding window with 429 `RESOURCE_EXHAUSTED` and `Retry-After`.

At start-up the space holds `conversations` seeded conversations drawn from a bank of retail
analytics questions with their follow-ups (`genie_data`), spread over the last `history_days`,
some owned by the caller and some by colleagues, deterministic for a `seed`: what an exporter
reads and a replay sends again.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import hashlib
import itertools
import json
import math
import random
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web
from pydantic import Field, field_validator, model_validator

from harness.distributions import Distribution
from harness.durations import Duration
from harness.targets import genie_data as data
from harness.targets.service import SERVICE_MODEL, ServiceModel, ServiceModelConfig, instrument

PHASES: tuple[str, ...] = (
    "SUBMITTED",
    "FETCHING_METADATA",
    "FILTERING_CONTEXT",
    "ASKING_AI",
    "PENDING_WAREHOUSE",
    "EXECUTING_QUERY",
)
"""The in-progress statuses of a message, in the order it goes through them."""

_AI_PHASES = PHASES[:4]
"""What a message that needs no warehouse goes through: a text-only, failed or cancelled one."""

DEFAULT_PHASES: dict[str, Any] = {
    "SUBMITTED": "300ms",
    "FETCHING_METADATA": "200ms",
    "FILTERING_CONTEXT": "100ms",
    "ASKING_AI": {"type": "lognormal", "median": "1s", "p99": "3s"},
    "PENDING_WAREHOUSE": "100ms",
    "EXECUTING_QUERY": "500ms",
}

MAX_PAGE_SIZE = 100
MAX_EMBEDDING_INPUTS = 2048
_OPEN_PATHS = frozenset({"/health", "/_stats", "/.well-known/databricks-config"})
_WAIT_TIMEOUT = re.compile(r"^(\d+)s$")


class GenieConfig(ServiceModelConfig):
    """The configuration of the `genie` target."""

    concurrency: int = Field(default=64, ge=1)
    """How many requests are served at once (a statement waiting for its result holds its worker)."""

    queue_limit: int = Field(default=1024, ge=0)
    """How many requests may wait for a free worker; any beyond this get 503 at once."""

    service_time: Distribution = Field(default=0.005, validate_default=True)
    """The time every request costs (the API gateway), before what its route does."""

    seed: int | None = 0
    """Seeds the seeded history (its ids included) and every sampled time and outcome; none means
    random. Fixed by default, so that a restarted target serves the same history. Ids of what the API
    creates are random whatever the seed, so that they never repeat across restarts."""

    workspace_id: str = "1234567890123456"
    """What `/.well-known/databricks-config` reports; the SDK then sends it in every request."""

    space_id: str = Field(default="demo-space", min_length=1)
    """The one Genie space; any other space id is 404 `RESOURCE_DOES_NOT_EXIST`."""

    space_title: str = "Retail sales analytics"
    """The space's title."""

    space_description: str = (
        "Ask questions about orders, revenue, customers, products and stores of the retail business."
    )
    """The space's description (`databricks_ai_bridge`'s `Genie` reads it at start)."""

    token: str | None = Field(default=None, min_length=1)
    """The bearer token accepted; none accepts any non-empty token. Anything else is 401."""

    denied_tokens: list[str] = Field(default_factory=list)
    """Tokens that authenticate but may not use the space: 403 `PERMISSION_DENIED` on Genie routes."""

    caller: str = Field(default="me@example.com", min_length=1)
    """The user an accepted token belongs to: owns what it creates and some seeded conversations."""

    phases: dict[str, Distribution] = Field(
        default_factory=lambda: dict(DEFAULT_PHASES), validate_default=True
    )
    """How long a question spends in each in-progress status, by status name; the ones not given keep
    their defaults (0.3 s, 0.2 s, 0.1 s, lognormal median 1 s / p99 3 s for ASKING_AI, 0.1 s, 0.5 s)."""

    failed_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    """The fraction of questions that end FAILED (with an `error`) after ASKING_AI."""

    cancelled_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """The fraction of questions that end CANCELLED after ASKING_AI."""

    text_only_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    """The fraction of completed questions answered with text only: no query, no warehouse phases."""

    query_result_time: Distribution = Field(default=0.05, validate_default=True)
    """How long fetching a query attachment's result takes."""

    questions_per_minute: int | None = Field(default=None, ge=1)
    """The workspace-wide limit on questions (start-conversation and create-message) in any
    `questions_window`; beyond it 429 `RESOURCE_EXHAUSTED` with `Retry-After`. None: no limit."""

    questions_window: Duration = Field(default=60.0, gt=0)
    """The sliding window `questions_per_minute` counts over: a minute, as Databricks counts. Set it
    shorter only to exercise throttling quickly (the limit then holds per window)."""

    conversations: int = Field(default=40, ge=0, le=10_000)
    """How many conversations the space holds at start-up, from the built-in question bank."""

    history_days: float = Field(default=30.0, gt=0)
    """How many days back the seeded conversations are spread over."""

    own_share: float = Field(default=0.5, ge=0.0, le=1.0)
    """The fraction of seeded conversations that belong to `caller`; colleagues own the rest."""

    max_conversations: int = Field(default=100_000, ge=1)
    """How many conversations created through the API are kept; beyond it the oldest are forgotten."""

    max_messages: int = Field(default=200_000, ge=1)
    """How many messages created through the API are kept (in any conversation, seeded ones too);
    beyond it the oldest are forgotten, so that a long run cannot grow memory without bound."""

    warehouses: list[str] = Field(default_factory=lambda: ["demo-warehouse"], min_length=1)
    """The SQL warehouse ids statements may run on (the first is the space's); others are 404."""

    statement_time: Distribution = Field(default=0.15, validate_default=True)
    """How long a SQL statement (or a re-executed Genie query) runs on the warehouse."""

    statement_error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """The fraction of statements that end FAILED with `status.error`."""

    max_statements: int = Field(default=10_000, ge=1)
    """How many statements are kept for `GET /api/2.0/sql/statements/{id}`; the oldest are forgotten."""

    embedding_endpoints: list[str] = Field(default_factory=lambda: ["databricks-gte-large-en"])
    """The serving endpoints that answer embedding requests; others are 404."""

    embedding_dim: int = Field(default=1024, ge=8, le=8192)
    """The length of each embedding vector."""

    embedding_time: Distribution = Field(default=0.01, validate_default=True)
    """How long one embeddings call takes, however many inputs it has."""

    @field_validator("phases", mode="before")
    @classmethod
    def _known_phases(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value  # pydantic reports the wrong type
        given = {str(name).upper(): spec for name, spec in value.items()}
        unknown = sorted(set(given) - set(PHASES))
        if unknown:
            raise ValueError(f"unknown phase {unknown[0]!r}; the phases are {', '.join(PHASES)}")
        return {**DEFAULT_PHASES, **given}

    @model_validator(mode="after")
    def _outcomes(self) -> GenieConfig:
        if self.failed_rate + self.cancelled_rate > 1:
            raise ValueError("failed_rate + cancelled_rate must be at most 1")
        return self


# --- text: normalising, SQL, results, embeddings --------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")
_SPACES = re.compile(r"\s+")
_ALIAS = re.compile(r"\bAS\s+([A-Za-z_]\w*)", re.IGNORECASE)
_LIMIT = re.compile(r"\bLIMIT\s+(\d+)", re.IGNORECASE)
_FROM = re.compile(r"\bFROM\b", re.IGNORECASE)
_BY_WORDS = re.compile(r"\b(?:by|per|each|across)\s+(\w+(?:\s+\w+)?)")
_TOP_N = re.compile(r"\btop\s+(\d+)\b")
_SELECT_NUMBER = re.compile(r"^\s*SELECT\s+(-?\d+)\s*;?\s*$", re.IGNORECASE)
_SQL_TYPES = frozenset(
    {
        "DOUBLE",
        "FLOAT",
        "INT",
        "INTEGER",
        "BIGINT",
        "LONG",
        "STRING",
        "DATE",
        "TIMESTAMP",
        "DECIMAL",
        "BOOLEAN",
    }
)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_SQL_START = frozenset({"select", "with", "show", "describe", "desc", "explain", "values", "use", "set"})
_DIMENSIONS = {d.alias: d for d in data.DIMENSIONS}
_MEASURES = {m.alias: m for m in data.MEASURES}
_TIME_DIMENSIONS = frozenset({"month", "week", "day", "quarter"})
_COLUMN_TYPES = {"day": "DATE", "week": "DATE"}
_CACHE_SIZE = 4096

Result = tuple[list[tuple[str, str]], list[list[str]]]
"""A statement's result: its columns (name, type) and rows (strings, as JSON_ARRAY has them)."""


def _digest(text: str, size: int = 8) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def normalise_question(text: str) -> str:
    """The question as a cache would key it: lower case, single spaces, no trailing punctuation."""
    return _SPACES.sub(" ", text.lower()).strip().rstrip("?.!").strip()


def _has(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


@dataclass(frozen=True)
class _Shape:
    dimension: data.Dimension
    measure: data.Measure
    period: data.Period
    limit: int


def _shape(norm: str) -> _Shape:
    """What a normalised question asks for: the measure, grouped by what, over which period."""
    pick = int.from_bytes(_digest(norm, 4), "big")
    period = next((p for p in data.PERIODS if any(_has(norm, ph) for ph in p.phrases)), data.DEFAULT_PERIOD)
    rest = norm
    for p in data.PERIODS:  # "last month" names a period, not a monthly breakdown
        for phrase in p.phrases:
            rest = re.sub(rf"\b{re.escape(phrase)}\b", " ", rest)
    dimension = None
    by = _BY_WORDS.search(rest)
    if by is not None:  # "by product category": the words after "by" name the breakdown
        dimension = next((d for d in data.DIMENSIONS if any(_has(by.group(1), k) for k in d.keywords)), None)
    if dimension is None:
        dimension = next((d for d in data.DIMENSIONS if any(_has(rest, k) for k in d.keywords)), None)
    if dimension is None:
        dimension = _DIMENSIONS[data.DEFAULT_DIMENSIONS[pick % len(data.DEFAULT_DIMENSIONS)]]
    measure = next((m for m in data.MEASURES if any(_has(rest, k) for k in m.keywords)), None)
    if measure is None:
        measure = _MEASURES[data.DEFAULT_MEASURES[(pick >> 8) % len(data.DEFAULT_MEASURES)]]
    top = _TOP_N.search(rest)
    return _Shape(dimension, measure, period, int(top.group(1)) if top else 100)


def question_sql(question: str) -> str:
    """The SQL Genie writes for `question`: the same for every question that normalises the same."""
    norm = normalise_question(question)
    shape = _shape(norm)
    dim, measure = shape.dimension, shape.measure
    order = dim.alias if dim.alias in _TIME_DIMENSIONS else f"{measure.alias} DESC"
    return (
        f"-- genie:{_digest(norm, 4).hex()}\n"
        f"SELECT\n  {dim.expr} AS {dim.alias},\n  {measure.expr} AS {measure.alias}\n"
        f"FROM {data.TABLES}\n"
        f"WHERE {shape.period.where}\n"
        f"GROUP BY 1\nORDER BY {order}\nLIMIT {shape.limit}"
    )


def _calendar(alias: str, today: date) -> list[str]:
    """The last complete months, weeks, days or quarters before `today`, oldest first."""
    if alias == "month":
        first = today.replace(day=1)
        months = []
        for _ in range(12):
            first = (first - timedelta(days=1)).replace(day=1)
            months.append(first.strftime("%Y-%m"))
        return months[::-1]
    if alias == "week":
        monday = today - timedelta(days=today.weekday())
        return [(monday - timedelta(weeks=n)).isoformat() for n in range(8, 0, -1)]
    if alias == "day":
        return [(today - timedelta(days=n)).isoformat() for n in range(7, 0, -1)]
    quarter = (today.month - 1) // 3
    year = today.year
    quarters = []
    for _ in range(4):
        quarter -= 1
        if quarter < 0:
            quarter, year = 3, year - 1
        quarters.append(f"{year}-Q{quarter + 1}")
    return quarters[::-1]


def _format(measure: data.Measure, value: float) -> str:
    if measure.type_name == "LONG":
        return str(int(value))
    return f"{value:.4f}" if measure.high <= 1 else f"{value:.2f}"


def result_for_sql(sql: str, today: date | None = None) -> Result:
    """The columns (name, type) and rows (as strings, as JSON_ARRAY has them) a statement returns.

    Deterministic in the statement's text (and the calendar, for monthly or weekly breakdowns): a
    query Genie wrote returns the same rows through Genie's query result and on the warehouse.
    """
    text = _SPACES.sub(" ", sql).strip()
    number = _SELECT_NUMBER.match(text)
    if number is not None:
        return [(number.group(1), "INT")], [[number.group(1)]]
    rng = random.Random(int.from_bytes(_digest(text.lower()), "big"))
    head = _FROM.split(text, maxsplit=1)[0]
    aliases = [a for a in _ALIAS.findall(head) if a.upper() not in _SQL_TYPES]
    if not aliases:
        return [("result", "LONG")], [[str(rng.randrange(1, 100_000))]]
    columns = []
    for alias in aliases:
        measure = _MEASURES.get(alias.lower())
        type_name = measure.type_name if measure else _COLUMN_TYPES.get(alias.lower(), "STRING")
        columns.append((alias, type_name))
    dimension = next((_DIMENSIONS[a.lower()] for a in aliases if a.lower() in _DIMENSIONS), None)
    if dimension is None:
        keys = ["1"]
    elif dimension.values:
        keys = list(dimension.values)
    else:
        keys = _calendar(dimension.alias, today or datetime.now(UTC).date())
    rows = []
    for key in keys:
        row = []
        for alias, _ in columns:
            measure = _MEASURES.get(alias.lower())
            if dimension is not None and alias.lower() == dimension.alias:
                row.append(key)
            elif measure is not None:
                row.append(_format(measure, rng.uniform(measure.low, measure.high)))
            else:
                row.append(f"{alias}-{rng.randrange(1000):03d}")
        rows.append(row)
    first_measure = next((i for i, (a, _) in enumerate(columns) if a.lower() in _MEASURES), None)
    if dimension is not None and dimension.alias not in _TIME_DIMENSIONS and first_measure is not None:
        rows.sort(key=lambda r: -float(r[first_measure]))
    limit = _LIMIT.search(text)
    if limit is not None:
        rows = rows[: int(limit.group(1))]
    return columns, rows


def embed_text(text: str, dim: int = 1024) -> list[float]:
    """A deterministic embedding: signed feature hashing of lower-cased words and character 3-grams.

    Words weigh 1 and the 3-grams of each word (with `<` `>` marking its ends) 0.5 each, hashed with
    BLAKE2b into `dim` buckets with a sign, then L2-normalised. Identical text gives identical vectors,
    a paraphrase sharing most words a high cosine, unrelated text a low one; no text gives zeros.
    """
    vector = [0.0] * dim
    words = _WORD.findall(text.lower())
    features = [(f"w:{w}", 1.0) for w in words]
    for word in words:
        marked = f"<{word}>"
        features.extend((f"c:{marked[i : i + 3]}", 0.5) for i in range(len(marked) - 2))
    for feature, weight in features:
        h = int.from_bytes(_digest(feature), "big")
        vector[h % dim] += weight if h >> 63 else -weight
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else vector


def _token_count(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


# --- state ----------------------------------------------------------------------------------------


def user_id(name: str) -> int:
    """The numeric user id (int64, as the SDK reads `user_id`) of a user name."""
    return int.from_bytes(_digest(name, 6), "big")


def _derived_id(message_id: str, kind: str) -> str:
    return "01f0" + _digest(f"{message_id}:{kind}", 14).hex()


def _uuid(hex32: str) -> str:
    return f"{hex32[:8]}-{hex32[8:12]}-{hex32[12:16]}-{hex32[16:20]}-{hex32[20:32]}"


@dataclass(slots=True, eq=False)
class Message:
    """One question in a conversation; its status follows from the time since it was asked."""

    id: str
    seq: int
    conversation_id: str
    content: str
    user_id: int
    created_ms: int
    started: float
    """`time.monotonic()` when asked (seeded messages: 0, long done)."""
    schedule: tuple[tuple[str, float], ...]
    """Each in-progress status and how long after `started` it ends."""
    outcome: str
    text_only: bool
    error: tuple[str, str] | None = None

    def status(self, now: float) -> tuple[str, float]:
        """The status at monotonic time `now`, and how many seconds after `started` it began."""
        elapsed = now - self.started
        begun = 0.0
        for status, ends in self.schedule:
            if elapsed < ends:
                return status, begun
            begun = ends
        return self.outcome, begun

    @property
    def text_id(self) -> str:
        return _derived_id(self.id, "text")

    @property
    def query_id(self) -> str:
        return _derived_id(self.id, "query")

    @property
    def suggestions_id(self) -> str:
        return _derived_id(self.id, "suggested")

    @property
    def statement_id(self) -> str:
        return _uuid(_derived_id(self.id, "statement"))

    @property
    def has_query(self) -> bool:
        return self.outcome == "COMPLETED" and not self.text_only and bool(self.content.strip())


@dataclass(slots=True, eq=False)
class Conversation:
    id: str
    seq: int
    title: str
    owner: str
    created_ms: int
    seeded: bool
    messages: dict[str, Message] = field(default_factory=dict)
    order: list[Message] = field(default_factory=list)
    """The messages by `seq`, oldest first."""

    def add(self, message: Message) -> None:
        self.messages[message.id] = message
        self.order.append(message)

    def remove(self, message: Message) -> None:
        del self.messages[message.id]
        del self.order[bisect.bisect_left(self.order, message.seq, key=lambda m: m.seq)]


@dataclass(slots=True, eq=False)
class Statement:
    id: str
    sql: str
    started: float
    duration: float
    error: tuple[str, str, str] | None
    row_limit: int | None
    canceled: bool = False

    def state(self, now: float) -> str:
        if self.canceled:
            return "CANCELED"
        # Not `now - started >= duration`: rounding could leave state(started + duration) RUNNING.
        if now >= self.started + self.duration:
            return "FAILED" if self.error else "SUCCEEDED"
        elapsed = now - self.started
        # Queued for the warehouse for the first quarter of its time, then running.
        return "PENDING" if elapsed < self.duration / 4 else "RUNNING"


class GenieState:
    """Everything one `genie` app holds: the space's conversations, statements and counters."""

    def __init__(self, config: GenieConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.caller_id = user_id(config.caller)
        self.denied = frozenset(config.denied_tokens)
        self.started_at = datetime.now(UTC)
        self.conversations: dict[str, Conversation] = {}
        self.order: list[Conversation] = []
        """Every conversation by `seq`, which is also the order of their creation times."""
        self.statements: OrderedDict[str, Statement] = OrderedDict()
        self._seq = itertools.count(1)
        self._api_conversations: deque[str] = deque()
        self._api_messages: deque[Message] = deque()
        self._questions: deque[float] = deque()
        self.seeded_conversations = 0
        self._answers: OrderedDict[tuple[str, date], Answer] = OrderedDict()
        self._results: OrderedDict[tuple[str, date], Result] = OrderedDict()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "questions",
                "throttled",
                "text_only",
                "query_results",
                "queries_executed",
                "statements",
                "statements_failed",
                "statements_canceled",
                "embedding_calls",
                "embedded_texts",
                "unauthenticated",
                "permission_denied",
                "deleted_conversations",
                "evicted_conversations",
                "evicted_messages",
            ),
            0,
        )
        self.outcomes: dict[str, int] = {"COMPLETED": 0, "FAILED": 0, "CANCELLED": 0}
        _seed_history(self, int(time.time() * 1000))

    # -- answers and results, cached: every poll of a completed message shows them

    def answer(self, question: str) -> Answer:
        """`answer_for(question)`, from a bounded cache (keyed by the date too: monthly rows follow it)."""
        key = (question, datetime.now(UTC).date())
        answer = self._answers.get(key)
        if answer is None:
            answer = answer_for(question, self.result(question_sql(question)))
            self._answers[key] = answer
            if len(self._answers) > _CACHE_SIZE:
                self._answers.popitem(last=False)
        else:
            self._answers.move_to_end(key)
        return answer

    def result(self, sql: str) -> Result:
        """`result_for_sql(sql)`, from a bounded cache."""
        today = datetime.now(UTC).date()
        key = (sql, today)
        result = self._results.get(key)
        if result is None:
            result = result_for_sql(sql, today)
            self._results[key] = result
            if len(self._results) > _CACHE_SIZE:
                self._results.popitem(last=False)
        else:
            self._results.move_to_end(key)
        return result

    # -- auth

    def accepts(self, token: str) -> bool:
        if token in self.denied:
            return True
        return token != "" if self.config.token is None else token == self.config.token

    # -- conversations and messages

    def add_conversation(
        self, title: str, owner: str, created_ms: int, seeded: bool, cid: str
    ) -> Conversation:
        conversation = Conversation(cid, next(self._seq), title[:200], owner, created_ms, seeded)
        self.conversations[cid] = conversation
        self.order.append(conversation)
        if not seeded:
            self._api_conversations.append(cid)
            while len(self._api_conversations) > self.config.max_conversations:
                old = self.conversations.get(self._api_conversations.popleft())
                if old is not None:
                    self.drop_conversation(old)
                    self.counters["evicted_conversations"] += 1
        return conversation

    def drop_conversation(self, conversation: Conversation) -> None:
        del self.conversations[conversation.id]
        del self.order[bisect.bisect_left(self.order, conversation.seq, key=lambda c: c.seq)]

    def new_id(self) -> str:
        """A fresh id for what the API creates: unique across restarts, unlike the seeded ones."""
        return "01f0" + secrets.token_hex(14)

    def ask(self, conversation: Conversation, content: str) -> Message:
        """A new question in `conversation`, its outcome and phase times sampled now."""
        config, rng = self.config, self.rng
        draw = rng.random()
        if draw < config.failed_rate:
            outcome = "FAILED"
        elif draw < config.failed_rate + config.cancelled_rate:
            outcome = "CANCELLED"
        else:
            outcome = "COMPLETED"
        text_only = outcome == "COMPLETED" and rng.random() < config.text_only_rate
        phases = PHASES if outcome == "COMPLETED" and not text_only else _AI_PHASES
        schedule = []
        ends = 0.0
        for phase in phases:
            ends += max(0.0, config.phases[phase].sample(rng))
            schedule.append((phase, ends))
        message = Message(
            id=self.new_id(),
            seq=next(self._seq),
            conversation_id=conversation.id,
            content=content,
            user_id=self.caller_id,
            created_ms=int(time.time() * 1000),
            started=time.monotonic(),
            schedule=tuple(schedule),
            outcome=outcome,
            text_only=text_only,
            error=rng.choice(data.MESSAGE_ERRORS) if outcome == "FAILED" else None,
        )
        conversation.add(message)
        self.counters["questions"] += 1
        self.outcomes[outcome] += 1
        self.counters["text_only"] += text_only
        self._api_messages.append(message)
        while len(self._api_messages) > self.config.max_messages:
            old = self._api_messages.popleft()
            owner = self.conversations.get(old.conversation_id)
            if owner is None or old.id not in owner.messages:
                continue
            owner.remove(old)
            self.counters["evicted_messages"] += 1
            if not owner.messages and not owner.seeded:
                self.drop_conversation(owner)
        return message

    def throttle(self) -> int | None:
        """Count a question against `questions_per_minute`; the seconds to wait if over it, else None."""
        limit = self.config.questions_per_minute
        if limit is None:
            return None
        now = time.monotonic()
        window = self.config.questions_window
        while self._questions and self._questions[0] <= now - window:
            self._questions.popleft()
        if len(self._questions) >= limit:
            self.counters["throttled"] += 1
            return max(1, math.ceil(self._questions[0] + window - now))
        self._questions.append(now)
        return None

    # -- statements

    def add_statement(self, sql: str, row_limit: int | None, duration: float) -> Statement:
        error = None
        words = _COMMENTS.sub(" ", sql).split(None, 1)
        word = words[0][:40] if words else ""
        if word.lower().lstrip("(") not in _SQL_START:
            error = (
                "BAD_REQUEST",
                f"[PARSE_SYNTAX_ERROR] Syntax error at or near '{word}'. SQLSTATE: 42601",
                "42601",
            )
        elif self.rng.random() < self.config.statement_error_rate:
            error = self.rng.choice(data.STATEMENT_ERRORS)
        statement = Statement(
            id=_uuid(self.new_id()),
            sql=sql,
            started=time.monotonic(),
            duration=duration,
            error=error,
            row_limit=row_limit,
        )
        self.statements[statement.id] = statement
        self.counters["statements"] += 1
        self.counters["statements_failed"] += error is not None
        while len(self.statements) > self.config.max_statements:
            self.statements.popitem(last=False)
        return statement

    def stats(self) -> dict[str, Any]:
        return {
            "space_id": self.config.space_id,
            "conversations": len(self.conversations),
            "seeded_conversations": self.seeded_conversations,
            "messages_by_status": dict(self.outcomes),
            **self.counters,
            "statements_kept": len(self.statements),
        }


def _seed_history(state: GenieState, now_ms: int) -> None:
    """The space's conversations at start-up: deterministic from the seed, spread over history_days."""
    config = state.config
    count = config.conversations
    rng = random.Random(None if config.seed is None else f"genie-history:{config.seed}")
    mine = round(count * config.own_share)
    owners = [config.caller] * mine + [rng.choice(data.COLLEAGUES) for _ in range(count - mine)]
    rng.shuffle(owners)
    # Popular questions come back: the first threads are drawn most often.
    weights = [1 / (rank + 1) ** 0.8 for rank in range(len(data.THREADS))]
    history = config.history_days * 86_400
    plans = []
    for owner in owners:
        thread = rng.choices(data.THREADS, weights)[0]
        first = thread.question
        if thread.paraphrases and rng.random() < 0.35:
            first = rng.choice(thread.paraphrases)
        if rng.random() < 0.15:
            first = first.lower().rstrip("?")  # typed casually: the same question once normalised
        n = rng.choices((1, 2, 3, 4, 5), (30, 25, 20, 15, 10))[0]
        own = sorted(rng.sample(range(len(thread.follow_ups)), min(n - 1, len(thread.follow_ups))))
        follow_ups = [thread.follow_ups[i] for i in own]
        follow_ups += rng.sample(data.GENERIC_FOLLOW_UPS, n - 1 - len(follow_ups))
        contents = [first] + ["" if rng.random() < 0.05 else f for f in follow_ups]
        gaps = [rng.uniform(20, 600) for _ in follow_ups]
        ago = rng.uniform(sum(gaps), max(sum(gaps), history))
        ids = [f"01f0{rng.getrandbits(112):028x}" for _ in range(n + 1)]
        plans.append(
            (ago, owner, contents, gaps, ids, [rng.random() < config.text_only_rate for _ in contents])
        )
    if count >= 10 and not any("" in plan[2] for plan in plans):
        # The exporter must drop messages without content: make sure there is one.
        longest = max(plans, key=lambda plan: len(plan[2]))
        if len(longest[2]) > 1:
            longest[2][-1] = ""
    plans.sort(key=lambda plan: -plan[0])
    for ago, owner, contents, gaps, ids, text_only in plans:
        created = now_ms - int(ago * 1000)
        conversation = state.add_conversation(contents[0], owner, created, seeded=True, cid=ids[0])
        at = created
        for i, content in enumerate(contents):
            if i:
                at += int(gaps[i - 1] * 1000)
            conversation.add(
                Message(
                    id=ids[i + 1],
                    seq=next(state._seq),
                    conversation_id=conversation.id,
                    content=content,
                    user_id=user_id(owner),
                    created_ms=at,
                    started=0.0,
                    schedule=(),
                    outcome="COMPLETED",
                    text_only=text_only[i] or not content.strip(),
                )
            )
    state.seeded_conversations = len(plans)


STATE = web.AppKey("genie_state", GenieState)


# --- views ----------------------------------------------------------------------------------------


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error_code": code, "message": message}, status=status, headers=headers)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _space_view(state: GenieState) -> dict[str, Any]:
    config = state.config
    created = state.started_at - timedelta(days=config.history_days)
    return {
        "space_id": config.space_id,
        "title": config.space_title,
        "description": config.space_description,
        "warehouse_id": config.warehouses[0],
        "create_time": _iso(created),
        "update_time": _iso(created),
    }


def _conversation_view(state: GenieState, conversation: Conversation) -> dict[str, Any]:
    updated = conversation.order[-1].created_ms if conversation.order else conversation.created_ms
    return {
        "id": conversation.id,
        "conversation_id": conversation.id,
        "space_id": state.config.space_id,
        "title": conversation.title,
        "created_timestamp": conversation.created_ms,
        "last_updated_timestamp": updated,
        "user_id": user_id(conversation.owner),
    }


@dataclass(frozen=True, slots=True)
class Answer:
    """What Genie answers to one question: its SQL and result, and the texts around them."""

    sql: str
    columns: list[tuple[str, str]]
    rows: list[list[str]]
    title: str
    description: str
    text: str
    """The answer of a COMPLETED message with a query."""
    clarification: str
    """The answer of a text-only message."""
    suggestions: list[str]


def answer_for(question: str, result: Result | None = None) -> Answer:
    """Genie's answer to `question`; `result`, the rows of its SQL, when already known."""
    norm = normalise_question(question)
    shape = _shape(norm)
    dim, measure, period = shape.dimension, shape.measure, shape.period
    sql = question_sql(question)
    columns, rows = result or result_for_sql(sql)
    heading = f"{measure.label.capitalize()} by {dim.label} {period.label}"
    if not rows:
        text = f"There is no {measure.label} {period.label}."
    elif dim.alias in _TIME_DIMENSIONS:
        text = f"{heading}: {rows[-1][1]} in {rows[-1][0]}, against {rows[0][1]} in {rows[0][0]}."
    else:
        plural = dim.label + ("es" if dim.label.endswith("s") else "s")
        text = f"{heading}: {rows[0][0]} leads with {rows[0][1]}, across {len(rows)} {plural}."
    pick = int.from_bytes(_digest(norm, 4), "big")
    pool = data.GENERIC_FOLLOW_UPS
    return Answer(
        sql=sql,
        columns=columns,
        rows=rows,
        title=f"{measure.label.capitalize()} by {dim.label}",
        description=f"You want {measure.label} by {dim.label} {period.label}, "
        "from the orders of the retail star schema.",
        text=text,
        clarification=f"I can answer this from the orders data as {measure.label} by {dim.label} "
        f"{period.label}. Do you mean all channels, or online orders only?",
        suggestions=[pool[(pick + k * 3) % len(pool)] for k in range(2)],
    )


def _attachments(message: Message, status: str, answer: Answer) -> list[dict[str, Any]]:
    text_id = message.text_id
    if not message.content.strip():
        return [{"attachment_id": text_id, "text": {"id": text_id, "content": data.EMPTY_ANSWER}}]
    suggested = {
        "attachment_id": message.suggestions_id,
        "suggested_questions": {"questions": answer.suggestions},
    }
    if not message.has_query:
        return [
            {"attachment_id": text_id, "text": {"id": text_id, "content": answer.clarification}},
            suggested,
        ]
    query = {
        "attachment_id": message.query_id,
        "query": {
            "id": message.query_id,
            "title": answer.title,
            "description": answer.description,
            "query": answer.sql,
            "statement_id": message.statement_id,
            "query_result_metadata": {"row_count": len(answer.rows), "is_truncated": False},
            "last_updated_timestamp": message.created_ms,
        },
    }
    if status == "EXECUTING_QUERY":
        return [query]
    return [{"attachment_id": text_id, "text": {"id": text_id, "content": answer.text}}, query, suggested]


def _message_view(state: GenieState, message: Message, now: float) -> dict[str, Any]:
    status, begun = message.status(now)
    view: dict[str, Any] = {
        "id": message.id,
        "message_id": message.id,
        "conversation_id": message.conversation_id,
        "space_id": state.config.space_id,
        "content": message.content,
        "status": status,
        "created_timestamp": message.created_ms,
        "last_updated_timestamp": message.created_ms + int(begun * 1000),
        "user_id": message.user_id,
    }
    if status == "COMPLETED" or (status == "EXECUTING_QUERY" and message.has_query):
        view["attachments"] = _attachments(message, status, state.answer(message.content))
    elif status == "FAILED" and message.error is not None:
        view["error"] = {"error": message.error[0], "type": message.error[1]}
    return view


def _statement_view(
    statement_id: str,
    state: str,
    result: Result | None = None,
    error: tuple[str, str, str] | None = None,
    row_limit: int | None = None,
) -> dict[str, Any]:
    """A StatementResponse; `result` (columns and rows) is needed when `state` is SUCCEEDED."""
    status: dict[str, Any] = {"state": state}
    view: dict[str, Any] = {"statement_id": statement_id, "status": status}
    if state == "FAILED" and error is not None:
        status["error"] = {"error_code": error[0], "message": error[1]}
        status["sql_state"] = error[2]
    if state != "SUCCEEDED" or result is None:
        return view
    columns, rows = result
    truncated = row_limit is not None and len(rows) > row_limit
    if row_limit is not None:
        rows = rows[:row_limit]
    view["manifest"] = {
        "format": "JSON_ARRAY",
        "schema": {
            "column_count": len(columns),
            "columns": [
                {"name": name, "position": i, "type_name": type_name, "type_text": type_name}
                for i, (name, type_name) in enumerate(columns)
            ],
        },
        "total_row_count": len(rows),
        "total_chunk_count": 1,
        "truncated": truncated,
        "chunks": [{"chunk_index": 0, "row_offset": 0, "row_count": len(rows)}],
    }
    view["result"] = {"chunk_index": 0, "row_offset": 0, "row_count": len(rows), "data_array": rows}
    return view


def _statement_body(state: GenieState, statement: Statement, current: str) -> dict[str, Any]:
    """`statement` as a StatementResponse in its `current` state."""
    result = state.result(statement.sql) if current == "SUCCEEDED" else None
    return _statement_view(statement.id, current, result, statement.error, statement.row_limit)


# --- request helpers ------------------------------------------------------------------------------


def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return _error(400, "MALFORMED_REQUEST", "Could not parse the request body as JSON.")
    if not isinstance(body, dict):
        return _error(400, "MALFORMED_REQUEST", "The request body must be a JSON object.")
    return body


def _space_check(request: web.Request) -> web.Response | None:
    """404 for another space, 403 for a denied token; None when the caller may use the space."""
    state = request.app[STATE]
    space_id = request.match_info["space_id"]
    if space_id != state.config.space_id:
        return _error(404, "RESOURCE_DOES_NOT_EXIST", f"Genie space {space_id} does not exist.")
    if _bearer(request) in state.denied:
        state.counters["permission_denied"] += 1
        return _error(
            403, "PERMISSION_DENIED", f"You do not have permission to access Genie space {space_id}."
        )
    return None


def _find_conversation(request: web.Request) -> Conversation | web.Response:
    denied = _space_check(request)
    if denied is not None:
        return denied
    conversation_id = request.match_info["conversation_id"]
    conversation = request.app[STATE].conversations.get(conversation_id)
    if conversation is None:
        return _error(404, "RESOURCE_DOES_NOT_EXIST", f"Conversation {conversation_id} does not exist.")
    return conversation


def _find_message(request: web.Request) -> Message | web.Response:
    conversation = _find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    message_id = request.match_info["message_id"]
    message = conversation.messages.get(message_id)
    if message is None:
        return _error(
            404,
            "RESOURCE_DOES_NOT_EXIST",
            f"Message {message_id} does not exist in conversation {conversation.id}.",
        )
    return message


def _own(request: web.Request, conversation: Conversation) -> web.Response | None:
    state = request.app[STATE]
    if conversation.owner == state.config.caller:
        return None
    state.counters["permission_denied"] += 1
    return _error(
        403,
        "PERMISSION_DENIED",
        f"User {state.config.caller} does not have permission to modify conversation {conversation.id}: "
        "it belongs to another user.",
    )


def _content(body: dict[str, Any]) -> str | web.Response:
    content = body.get("content")
    if not isinstance(content, str) or not content.strip():
        return _error(400, "INVALID_PARAMETER_VALUE", "Message content must be a non-empty string.")
    return content


def _throttled(state: GenieState) -> web.Response | None:
    wait = state.throttle()
    if wait is None:
        return None
    config = state.config
    return _error(
        429,
        "RESOURCE_EXHAUSTED",
        f"This workspace has reached its limit of {config.questions_per_minute} Genie questions per "
        f"{config.questions_window:g} s; try again in {wait} s.",
        headers={"Retry-After": str(wait)},
    )


def _page_size(request: web.Request) -> int | web.Response:
    raw = request.query.get("page_size")
    if raw is None or raw == "":
        return MAX_PAGE_SIZE
    try:
        size = int(raw)
    except ValueError:
        size = -1
    if size < 0:
        return _error(
            400, "INVALID_PARAMETER_VALUE", f"page_size must be a non-negative integer, got {raw!r}."
        )
    return min(size or MAX_PAGE_SIZE, MAX_PAGE_SIZE)


def _encode_token(kind: str, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{seq}".encode()).decode().rstrip("=")


def _decode_token(request: web.Request, kind: str) -> int | web.Response | None:
    raw = request.query.get("page_token")
    if not raw:
        return None
    try:
        prefix, _, seq = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode().partition(":")
        if prefix == kind:
            return int(seq)
    except ValueError:
        pass
    return _error(400, "INVALID_PARAMETER_VALUE", f"Invalid page_token {raw!r}.")


# --- Genie routes ---------------------------------------------------------------------------------


async def _well_known(request: web.Request) -> web.Response:
    return web.json_response({"workspace_id": request.app[STATE].config.workspace_id})


async def _list_spaces(request: web.Request) -> web.Response:
    state = request.app[STATE]
    spaces = [] if _bearer(request) in state.denied else [_space_view(state)]
    return web.json_response({"spaces": spaces})


async def _get_space(request: web.Request) -> web.Response:
    return _space_check(request) or web.json_response(_space_view(request.app[STATE]))


async def _start_conversation(request: web.Request) -> web.Response:
    state = request.app[STATE]
    denied = _space_check(request)
    if denied is not None:
        return denied
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    content = _content(body)
    if isinstance(content, web.Response):
        return content
    throttled = _throttled(state)
    if throttled is not None:
        return throttled
    conversation = state.add_conversation(
        content, state.config.caller, int(time.time() * 1000), seeded=False, cid=state.new_id()
    )
    message = state.ask(conversation, content)
    now = time.monotonic()
    return web.json_response(
        {
            "conversation_id": conversation.id,
            "message_id": message.id,
            "conversation": _conversation_view(state, conversation),
            "message": _message_view(state, message, now),
        }
    )


async def _create_message(request: web.Request) -> web.Response:
    state = request.app[STATE]
    conversation = _find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    refused = _own(request, conversation)
    if refused is not None:
        return refused
    content = _content(body)
    if isinstance(content, web.Response):
        return content
    throttled = _throttled(state)
    if throttled is not None:
        return throttled
    message = state.ask(conversation, content)
    return web.json_response(_message_view(state, message, time.monotonic()))


async def _get_message(request: web.Request) -> web.Response:
    message = _find_message(request)
    if isinstance(message, web.Response):
        return message
    return web.json_response(_message_view(request.app[STATE], message, time.monotonic()))


async def _list_conversations(request: web.Request) -> web.Response:
    state = request.app[STATE]
    denied = _space_check(request)
    if denied is not None:
        return denied
    raw = request.query.get("include_all", "false").lower()
    if raw not in ("true", "false"):
        return _error(400, "INVALID_PARAMETER_VALUE", f"include_all must be true or false, got {raw!r}.")
    include_all = raw == "true"
    size = _page_size(request)
    if isinstance(size, web.Response):
        return size
    cursor = _decode_token(request, "c")
    if isinstance(cursor, web.Response):
        return cursor
    order = state.order
    i = len(order) if cursor is None else bisect.bisect_left(order, cursor, key=lambda c: c.seq)
    page: list[Conversation] = []
    more = False
    caller = state.config.caller
    while i > 0:  # newest first
        i -= 1
        conversation = order[i]
        if include_all or conversation.owner == caller:
            if len(page) == size:
                more = True
                break
            page.append(conversation)
    body: dict[str, Any] = {
        "conversations": [
            {"conversation_id": c.id, "title": c.title, "created_timestamp": c.created_ms} for c in page
        ]
    }
    if more:
        body["next_page_token"] = _encode_token("c", page[-1].seq)
    return web.json_response(body)


async def _list_messages(request: web.Request) -> web.Response:
    state = request.app[STATE]
    conversation = _find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    size = _page_size(request)
    if isinstance(size, web.Response):
        return size
    cursor = _decode_token(request, "m")
    if isinstance(cursor, web.Response):
        return cursor
    order = conversation.order
    start = 0 if cursor is None else bisect.bisect_right(order, cursor, key=lambda m: m.seq)
    page = order[start : start + size]
    now = time.monotonic()
    body: dict[str, Any] = {"messages": [_message_view(state, m, now) for m in page]}
    if start + size < len(order):
        body["next_page_token"] = _encode_token("m", page[-1].seq)
    return web.json_response(body)


async def _delete_conversation(request: web.Request) -> web.Response:
    state = request.app[STATE]
    conversation = _find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    refused = _own(request, conversation)
    if refused is not None:
        return refused
    state.drop_conversation(conversation)
    state.counters["deleted_conversations"] += 1
    return web.json_response({})


def _query_message(request: web.Request, attachment_id: str | None) -> Message | web.Response:
    """The message whose query attachment is `attachment_id` (None: its only one), if it has a result."""
    message = _find_message(request)
    if isinstance(message, web.Response):
        return message
    if not message.has_query and message.outcome == "COMPLETED":
        return _error(404, "RESOURCE_DOES_NOT_EXIST", f"Message {message.id} has no query attachment.")
    if attachment_id is not None and attachment_id != message.query_id:
        return _error(
            404,
            "RESOURCE_DOES_NOT_EXIST",
            f"Attachment {attachment_id} does not exist in message {message.id}.",
        )
    return message


async def _query_result_for(request: web.Request, attachment_id: str | None) -> web.Response:
    state = request.app[STATE]
    message = _query_message(request, attachment_id)
    if isinstance(message, web.Response):
        return message
    status, _ = message.status(time.monotonic())
    if status not in ("COMPLETED", "EXECUTING_QUERY"):
        return _error(
            400,
            "INVALID_STATE",
            f"Message {message.id} is {status}: a query result is only available once the message is "
            "EXECUTING_QUERY or COMPLETED with a query attachment.",
        )
    await asyncio.sleep(state.config.query_result_time.sample(state.rng))
    state.counters["query_results"] += 1
    status, _ = message.status(time.monotonic())
    answer = state.answer(message.content)
    view = _statement_view(
        message.statement_id,
        "SUCCEEDED" if status == "COMPLETED" else "RUNNING",
        (answer.columns, answer.rows),
    )
    return web.json_response({"statement_response": view})


async def _execute_query_for(request: web.Request, attachment_id: str | None) -> web.Response:
    state = request.app[STATE]
    message = _query_message(request, attachment_id)
    if isinstance(message, web.Response):
        return message
    status, _ = message.status(time.monotonic())
    if status != "COMPLETED":
        return _error(
            400,
            "INVALID_STATE",
            f"Message {message.id} is {status}: only the query of a COMPLETED message can be executed.",
        )
    duration = max(0.0, state.config.statement_time.sample(state.rng))
    statement = state.add_statement(state.answer(message.content).sql, None, duration)
    await asyncio.sleep(duration)
    state.counters["queries_executed"] += 1
    view = _statement_body(state, statement, statement.state(statement.started + duration))
    return web.json_response({"statement_response": view})


async def _attachment_query_result(request: web.Request) -> web.Response:
    return await _query_result_for(request, request.match_info["attachment_id"])


async def _message_query_result(request: web.Request) -> web.Response:
    return await _query_result_for(request, None)


async def _attachment_execute_query(request: web.Request) -> web.Response:
    return await _execute_query_for(request, request.match_info["attachment_id"])


async def _message_execute_query(request: web.Request) -> web.Response:
    return await _execute_query_for(request, None)


# --- SQL statement execution ----------------------------------------------------------------------


async def _execute_statement(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = state.config
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    sql = body.get("statement")
    if not isinstance(sql, str) or not sql.strip():
        return _error(400, "INVALID_PARAMETER_VALUE", "statement must be a non-empty string.")
    warehouse = body.get("warehouse_id")
    if not isinstance(warehouse, str) or not warehouse:
        return _error(400, "INVALID_PARAMETER_VALUE", "warehouse_id is required.")
    if warehouse not in config.warehouses:
        return _error(404, "RESOURCE_DOES_NOT_EXIST", f"SQL warehouse {warehouse} does not exist.")
    raw_wait = body.get("wait_timeout", "10s")
    match = _WAIT_TIMEOUT.match(raw_wait) if isinstance(raw_wait, str) else None
    wait = int(match.group(1)) if match else -1
    if wait != 0 and not 5 <= wait <= 50:
        return _error(
            400,
            "INVALID_PARAMETER_VALUE",
            f"wait_timeout must be 0s or between 5s and 50s, got {raw_wait!r}.",
        )
    on_timeout = body.get("on_wait_timeout", "CONTINUE")
    if on_timeout not in ("CONTINUE", "CANCEL"):
        return _error(
            400, "INVALID_PARAMETER_VALUE", f"on_wait_timeout must be CONTINUE or CANCEL, got {on_timeout!r}."
        )
    disposition = body.get("disposition", "INLINE")
    result_format = body.get("format", "JSON_ARRAY")
    if disposition != "INLINE" or result_format != "JSON_ARRAY":
        return _error(
            400,
            "INVALID_PARAMETER_VALUE",
            f"This workspace serves results INLINE as JSON_ARRAY only, got {disposition} {result_format}.",
        )
    row_limit = body.get("row_limit")
    if row_limit is not None and (
        isinstance(row_limit, bool) or not isinstance(row_limit, int) or row_limit < 0
    ):
        return _error(400, "INVALID_PARAMETER_VALUE", "row_limit must be a non-negative integer.")
    duration = max(0.0, config.statement_time.sample(state.rng))
    statement = state.add_statement(sql.strip(), row_limit, duration)
    if wait == 0:
        return web.json_response(_statement_body(state, statement, statement.state(statement.started)))
    if duration <= wait:
        await asyncio.sleep(duration)
        # The sleep may wake a hair early on the monotonic clock: the statement has finished.
        final = statement.state(max(time.monotonic(), statement.started + duration))
        return web.json_response(_statement_body(state, statement, final))
    await asyncio.sleep(wait)
    if on_timeout == "CANCEL" and not statement.canceled:
        statement.canceled = True
        state.counters["statements_canceled"] += 1
    return web.json_response(_statement_body(state, statement, statement.state(time.monotonic())))


def _find_statement(request: web.Request) -> Statement | web.Response:
    statement_id = request.match_info["statement_id"]
    statement = request.app[STATE].statements.get(statement_id)
    if statement is None:
        return _error(
            404, "RESOURCE_DOES_NOT_EXIST", f"Statement {statement_id} does not exist or has expired."
        )
    return statement


async def _get_statement(request: web.Request) -> web.Response:
    statement = _find_statement(request)
    if isinstance(statement, web.Response):
        return statement
    current = statement.state(time.monotonic())
    return web.json_response(_statement_body(request.app[STATE], statement, current))


async def _statement_chunk(request: web.Request) -> web.Response:
    statement = _find_statement(request)
    if isinstance(statement, web.Response):
        return statement
    if statement.state(time.monotonic()) != "SUCCEEDED":
        return _error(400, "INVALID_STATE", f"Statement {statement.id} has no result: it has not SUCCEEDED.")
    if request.match_info["chunk_index"] != "0":
        return _error(404, "RESOURCE_DOES_NOT_EXIST", f"Statement {statement.id} has a single chunk, 0.")
    view = _statement_body(request.app[STATE], statement, "SUCCEEDED")
    return web.json_response(view["result"])


async def _cancel_statement(request: web.Request) -> web.Response:
    state = request.app[STATE]
    statement = _find_statement(request)
    if isinstance(statement, web.Response):
        return statement
    if statement.state(time.monotonic()) in ("PENDING", "RUNNING"):
        statement.canceled = True
        state.counters["statements_canceled"] += 1
    return web.json_response({})


# --- embeddings -----------------------------------------------------------------------------------


async def _invocations(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = state.config
    name = request.match_info["name"]
    if name not in config.embedding_endpoints:
        return _error(404, "RESOURCE_DOES_NOT_EXIST", f"Endpoint with name '{name}' does not exist.")
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return _error(400, "BAD_REQUEST", "input must be a string or a non-empty list of strings.")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        return _error(400, "BAD_REQUEST", f"input may hold at most {MAX_EMBEDDING_INPUTS} strings.")
    await asyncio.sleep(config.embedding_time.sample(state.rng))
    state.counters["embedding_calls"] += 1
    state.counters["embedded_texts"] += len(texts)
    tokens = sum(_token_count(t) for t in texts)
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": embed_text(t, config.embedding_dim)}
                for i, t in enumerate(texts)
            ],
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers={"served-model-name": name},
    )


# --- the app --------------------------------------------------------------------------------------


@web.middleware
async def _workspace(request: web.Request, handler: Any) -> web.StreamResponse:
    """Inside the service model: the merged `/_stats`, bearer auth, Databricks-style 404 and 405."""
    state = request.app[STATE]
    if request.path == "/_stats":
        return web.json_response({**request.app[SERVICE_MODEL].stats(), "genie": state.stats()})
    if request.path not in _OPEN_PATHS:
        token = _bearer(request)
        if not token or not state.accepts(token):
            state.counters["unauthenticated"] += 1
            message = (
                "Invalid access token." if token else "Credential was not sent or was of an unsupported type."
            )
            return _error(401, "UNAUTHENTICATED", message)
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _error(404, "ENDPOINT_NOT_FOUND", f"No API found for '{request.method} {request.path}'.")
    except web.HTTPMethodNotAllowed:
        return _error(405, "ENDPOINT_NOT_FOUND", f"No API found for '{request.method} {request.path}'.")


def build_app(config: GenieConfig) -> web.Application:
    """The workspace app, with `config`'s service model in front of every route but health and stats."""
    app = web.Application()
    instrument(app, ServiceModel(config, seed=config.seed))
    app[STATE] = GenieState(config)
    app.middlewares.append(_workspace)
    router = app.router
    router.add_get("/.well-known/databricks-config", _well_known)
    spaces = "/api/2.0/genie/spaces"
    b = spaces + "/{space_id}"
    conversation = b + "/conversations/{conversation_id}"
    message = conversation + "/messages/{message_id}"
    router.add_get(spaces, _list_spaces)
    router.add_get(b, _get_space)
    router.add_post(b + "/start-conversation", _start_conversation)
    router.add_get(b + "/conversations", _list_conversations)
    router.add_delete(conversation, _delete_conversation)
    router.add_get(conversation + "/messages", _list_messages)
    router.add_post(conversation + "/messages", _create_message)
    router.add_get(message, _get_message)
    router.add_get(message + "/attachments/{attachment_id}/query-result", _attachment_query_result)
    router.add_post(message + "/attachments/{attachment_id}/execute-query", _attachment_execute_query)
    router.add_get(message + "/query-result", _message_query_result)
    router.add_get(message + "/query-result/{attachment_id}", _attachment_query_result)
    router.add_post(message + "/execute-query", _message_execute_query)
    statements = "/api/2.0/sql/statements"
    router.add_post(statements, _execute_statement)
    router.add_post(statements + "/", _execute_statement)
    router.add_get(statements + "/{statement_id}", _get_statement)
    router.add_post(statements + "/{statement_id}/cancel", _cancel_statement)
    router.add_get(statements + "/{statement_id}/result/chunks/{chunk_index}", _statement_chunk)
    router.add_post("/serving-endpoints/{name}/invocations", _invocations)
    return app
