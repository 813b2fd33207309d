"""The `genie` simulator end to end: `harness genie export` and replays through the real databricks-sdk
against the embedded `genie` target, with no cache, the in-memory cache and a real PostgreSQL (pgvector)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.targets.runner import EmbeddedTarget
from simulators.genie.replayer import GenieOptions, GenieSimulator, assign_mode
from tests.clitools import harness
from tests.test_run import rows, start

pytestmark = pytest.mark.slow

FAST = {
    "phases": {
        "SUBMITTED": "60ms",
        "FETCHING_METADATA": "20ms",
        "FILTERING_CONTEXT": "20ms",
        "ASKING_AI": "250ms",
        "PENDING_WAREHOUSE": "20ms",
        "EXECUTING_QUERY": "150ms",
    },
    "query_result_time": "10ms",
    "statement_time": "20ms",
    "embedding_time": "2ms",
    "failed_rate": 0.0,
    "text_only_rate": 0.0,
    "seed": 3,
}
QUICK = {"poll_interval": "50ms", "message_wait": "20ms"}


@pytest.fixture(scope="module")
def genie_target() -> Iterator[EmbeddedTarget]:
    """One embedded genie target shared by the export tests (the CLI runs in a subprocess)."""
    with EmbeddedTarget("genie", "genie", {**FAST, "denied_tokens": ["denied"], "token": "good"}) as target:
        yield target


def export(target: EmbeddedTarget, out: Path, *args: str, token: str = "good") -> Any:
    assert target.url
    env = {**os.environ, "DATABRICKS_TOKEN": token}
    env.pop("DATABRICKS_CONFIG_PROFILE", None)
    return harness(
        "genie",
        "export",
        "--host",
        target.url,
        "--retry-timeout",
        "3",
        "-o",
        str(out),
        *args,
        env=env,
        timeout=60,
    )


def profile(group: dict[str, Any], target: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    base = {"simulator": "genie", "users": 2, "think_time": "50ms", "options": {**QUICK}}
    group = dict(group)
    options = {**base["options"], **group.pop("options", {})}
    return {
        "name": "genie-test",
        "duration": "12s",
        "stop_grace": "5s",
        "seed": 5,
        "targets": {"genie": {"embedded": True, "kind": "genie", **FAST, **(target or {})}},
        "groups": {"genie": {**base, **group, "options": options}},
        **top,
    }


def endpoint(summary: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in summary["endpoints"] if e["group"] == "genie" and e["name"] == name)


# -- export -------------------------------------------------------------------------------------------


def test_export_writes_the_seed_layout_then_the_replayer_runs_it(
    genie_target: EmbeddedTarget, tmp_path: Path
):
    out = tmp_path / "conversations.yaml"
    proc = export(genie_target, out, "--space-id", "demo-space", "--include-all")
    assert proc.returncode == 0, proc.stderr
    assert "exported" in proc.stdout
    doc = yaml.safe_load(out.read_text())
    assert doc["space_id"] == "demo-space"
    assert doc["total_conversations"] == len(doc["conversations"]) > 10
    assert doc["total_messages"] == sum(len(c["messages"]) for c in doc["conversations"])
    for conversation in doc["conversations"]:
        assert set(conversation) == {"id", "title", "created_timestamp", "messages"}
        stamps = [m["timestamp"] for m in conversation["messages"]]
        assert stamps == sorted(stamps)
        assert all(m["content"].strip() and m["message_id"] for m in conversation["messages"])
    # only the caller's conversations without --include-all; --max-conversations caps them
    mine = tmp_path / "mine.yaml"
    assert export(genie_target, mine, "--space-id", "demo-space").returncode == 0
    assert 0 < yaml.safe_load(mine.read_text())["total_conversations"] < doc["total_conversations"]
    capped = tmp_path / "capped.yaml"
    assert export(
        genie_target, capped, "--space-id", "demo-space", "--include-all", "--max-conversations", "3"
    )
    assert yaml.safe_load(capped.read_text())["total_conversations"] == 3
    # a time filter keeps only recent conversations and records itself
    recent = tmp_path / "recent.yaml"
    assert (
        export(genie_target, recent, "--space-id", "demo-space", "--include-all", "--from", "7d").returncode
        == 0
    )
    recent_doc = yaml.safe_load(recent.read_text())
    assert recent_doc["filter"]["from_timestamp"] is not None
    assert all(
        c["created_timestamp"] >= recent_doc["filter"]["from_timestamp"] for c in recent_doc["conversations"]
    )
    assert recent_doc["total_conversations"] < doc["total_conversations"]

    # ... and the replayer runs the file (its own embedded target, same seed: the same space)
    proc, summary, _ = start(tmp_path, profile({"options": {"conversations": str(out)}}))
    assert proc.returncode == 0, proc.stderr
    live = endpoint(summary, "GENIE_LIVE")
    assert live["requests"] > 3 and live["failures"] == 0
    names = {e["name"] for e in summary["endpoints"] if e["group"] == "genie"}
    assert any(n.startswith("message_1_of_") for n in names)
    assert {"time_to_first_status", "executing_query", "query_result"} <= names
    # phases are kept out of the totals: the group counts each message once
    assert summary["group_totals"]["genie"]["requests"] == live["requests"]


@pytest.mark.parametrize(
    ("token", "args", "expected"),
    [
        ("wrong", ["--space-id", "demo-space"], "401"),
        ("denied", ["--space-id", "demo-space"], "403"),
        ("good", ["--space-id", "no-such-space"], "404"),
        ("good", ["--space-id", "demo-space", "--from", "last tuesday"], "--from/--to"),
    ],
)
def test_export_errors_are_one_line(
    genie_target: EmbeddedTarget, tmp_path: Path, token: str, args: list[str], expected: str
) -> None:
    proc = export(genie_target, tmp_path / "x.yaml", *args, token=token)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("harness: error:") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_export_unreachable_host_fails_in_seconds(tmp_path: Path) -> None:
    env = {**os.environ, "DATABRICKS_TOKEN": "x"}
    proc = harness(
        "genie", "export", "--host", "http://127.0.0.1:9", "--retry-timeout", "2", "--space-id", "s",
        "-o", str(tmp_path / "x.yaml"), env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "harness: error:" in proc.stderr and "Traceback" not in proc.stderr


# -- replay -------------------------------------------------------------------------------------------


def test_failed_answers_are_failures_with_their_reason(tmp_path: Path) -> None:
    proc, summary, _ = start(
        tmp_path, profile({"options": {"space_id": "demo-space"}}, {"failed_rate": 1.0}), "--duration", "6s"
    )
    assert proc.returncode == 0, proc.stderr  # no thresholds: failures are recorded, not judged
    live = endpoint(summary, "GENIE_LIVE")
    assert live["requests"] > 0 and live["failures"] == live["requests"]
    reasons = [e["message"] for e in summary["errors"] if e["name"] == "GENIE_LIVE"]
    assert reasons and all(r.startswith("FAILED: ") for r in reasons), reasons
    assert summary["totals"]["error_rate"] == 1.0


def test_conversations_continue_in_the_live_one_never_the_exported_one(tmp_path: Path) -> None:
    proc, _, db = start(
        tmp_path,
        profile({"users": 2, "options": {"space_id": "demo-space", "export": {"include_all": True}}}),
        "--duration", "8s",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    points = [json.loads(v) for (v,) in rows(db, "SELECT values_json FROM datapoint")]
    multi = [p for p in points if not p["position"].startswith("message_1_of_")]
    assert multi, "no follow-up was asked"
    assert all(p["ok"] for p in points), [p["error"] for p in points if not p["ok"]]
    by_position: dict[str, set[str]] = {}
    for p in points:
        by_position.setdefault(p["position"], set()).add(p["live_conversation"])
    # every follow-up went to a conversation this run started with its first message
    firsts = {c for pos, ids in by_position.items() if pos.startswith("message_1_of_") for c in ids}
    assert all(p["live_conversation"] in firsts for p in multi)


def test_single_question_mode_is_chosen_by_weight() -> None:
    modes = {"conversation": 3.0, "single_question": 1.0}
    chosen = [assign_mode(i, modes) for i in range(8)]
    assert chosen.count("single_question") == 2 and chosen[:4].count("single_question") == 1
    assert {assign_mode(i, {"conversation": 1.0}) for i in range(5)} == {"conversation"}


def test_single_question_users_ask_random_messages(tmp_path: Path) -> None:
    proc, summary, _ = start(
        tmp_path,
        profile({"options": {"space_id": "demo-space", "modes": {"single_question": 1}}}),
        "--duration", "6s",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = {e["name"] for e in summary["endpoints"] if e["group"] == "genie"}
    assert "random_message" in names and not any(n.startswith("message_") for n in names)


def test_throttling_is_counted_and_inside_the_latency(tmp_path: Path) -> None:
    proc, summary, _ = start(
        tmp_path,
        profile(
            {"users": 3, "options": {"space_id": "demo-space"}},
            {"questions_per_minute": 4, "questions_window": "3s"},
        ),
        "--duration", "10s",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert summary["counters"]["genie"].get("throttled", 0) >= 1, summary["counters"]
    live = endpoint(summary, "GENIE_LIVE")
    assert live["requests"] >= 1 and live["max_ms"] >= 900  # a Retry-After wait of at least a second


# -- caches ---------------------------------------------------------------------------------------------


def cached(backend: str, **semantic: Any) -> dict[str, Any]:
    return {
        "users": 2,
        "processes": 1,
        "options": {
            "space_id": "demo-space",
            "export": {"include_all": True},
            "sample_size": 2,
            "sample_seed": 11,
            "cache": {"warehouse_id": "demo-warehouse", "semantic": {"backend": backend, **semantic}},
        },
    }


def check_cache_table(summary: dict[str, Any]) -> dict[str, Any]:
    table = next(t for t in summary["tables"] if t["group"] == "genie" and t["title"] == "Genie cache")
    served = {row[0]: row for row in table["rows"]}
    counters = summary["counters"]["genie"]
    assert served["LRU hit"][1] == counters["cache.lru_hit"] > 0
    assert served["semantic hit"][1] == counters["cache.semantic_hit"] > 0
    assert served["live (miss)"][1] == counters["cache.miss"] > 0
    total = sum(r[1] for r in table["rows"])
    hits = counters["cache.lru_hit"] + counters["cache.semantic_hit"]
    assert table["hit_rate"] == pytest.approx(hits / total, abs=1e-4)
    return table


def test_in_memory_cache_replays_hit_lru_and_semantic_and_hits_are_faster(tmp_path: Path) -> None:
    proc, summary, _ = start(tmp_path, profile(cached("memory")), "--duration", "14s")
    assert proc.returncode == 0, proc.stderr
    check_cache_table(summary)
    live = endpoint(summary, "GENIE_LIVE")
    for hit in ("GENIE_LRU_HIT", "GENIE_SEMANTIC_HIT"):
        e = endpoint(summary, hit)
        assert e["failures"] == 0
        assert e["p50_ms"] * 2 < live["p50_ms"], (hit, e["p50_ms"], live["p50_ms"])
    names = {e["name"] for e in summary["endpoints"]}
    assert {"sql_on_warehouse", "embedding", "semantic_lookup"} <= names
    # the table is in the terminal summary too
    shown = harness("show", summary["run_id"], "--db", str(tmp_path / "h.db"))
    assert "Genie cache" in shown.stdout and "hit rate" in shown.stdout


def test_postgres_cache_is_shared_and_outlives_the_run(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    group = cached("postgres", postgres_data_dir=str(data))
    group["processes"] = 2  # two workers, one shared cache
    group["users"] = 2
    proc, summary, _ = start(tmp_path, profile(group), "--duration", "14s")
    assert proc.returncode == 0, proc.stderr
    check_cache_table(summary)
    # a second run starts with the first run's cache: its first answers can already be semantic hits
    second = tmp_path / "second"
    second.mkdir()
    group["options"]["cache"]["lru"] = None
    proc, summary, _ = start(second, profile(group), "--duration", "6s")
    assert proc.returncode == 0, proc.stderr
    assert summary["counters"]["genie"]["cache.semantic_hit"] > 0
    assert endpoint(summary, "GENIE_SEMANTIC_HIT")["failures"] == 0


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"cache": {"semantic": {"backend": "memory"}}}, "warehouse_id"),
        ({"cache": {"warehouse_id": "w", "lru": None, "semantic": None}}, "cache"),
        ({"modes": {"conversation": 0}}, "modes"),
        ({"message_wait": "soon"}, "message_wait"),
        ({"export": {"from": "yesterday-ish"}}, "from"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path: Path, options: dict[str, Any], field: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile({"options": options})))
    proc = harness("validate", str(path))
    assert proc.returncode == 2 and field in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_missing_conversations_file_is_a_clear_error(tmp_path: Path) -> None:
    proc, _, _ = start(tmp_path, profile({"options": {"conversations": str(tmp_path / "nope.yaml")}}))
    assert proc.returncode != 0 and "nope.yaml" in proc.stderr and "harness genie export" in proc.stderr


def test_options_defaults_follow_the_seed() -> None:
    opts = GenieOptions.model_validate({})
    assert opts.poll_interval == 0.5 and opts.poll_timeout == 250
    assert opts.message_wait.mean() == pytest.approx((4 + 15) / 2)
    assert GenieSimulator.threads >= 32
    cache = GenieOptions.model_validate({"cache": {"warehouse_id": "w"}}).cache
    assert cache is not None and cache.lru is not None and cache.semantic is not None
    assert (cache.lru.capacity, cache.semantic.capacity) == (100, 1000)
    assert (cache.semantic.similarity_threshold, cache.semantic.context_similarity_threshold) == (0.85, 0.80)


def test_local_embedding_model_serves_the_semantic_cache(tmp_path: Path) -> None:
    group = cached("memory")
    group["options"]["cache"]["embeddings"] = {"model": "local"}
    proc, summary, _ = start(tmp_path, profile(group), "--duration", "16s")
    assert proc.returncode == 0, proc.stderr
    check_cache_table(summary)


def test_builtin_cached_memory_profile_runs_scaled_down(tmp_path: Path) -> None:
    proc, summary, _ = start(
        tmp_path,
        "genie-cached-memory",
        "--duration", "20s",
        "--set", "groups.genie.users=3",
        "--set", "groups.genie.spawn_rate=10",
        "--set", "groups.genie.think_time=100ms",
        "--set", "groups.genie.options.message_wait=50ms",
        "--set", "groups.genie.options.sample_size=2",
        "--set", "groups.genie.options.poll_interval=100ms",
        "--set", "targets.genie.phases.ASKING_AI=300ms",
        "--set", "targets.genie.failed_rate=0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert summary["status"] == "passed" and all(t["ok"] for t in summary["thresholds"])
    check_cache_table(summary)
