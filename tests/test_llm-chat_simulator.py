"""The `llm-chat` simulator against the real `llm_engine` target's streaming chat completions:
TTFT, inter-token latency and TPOT match the target's configured token timing within 10%, and the
conversation carries its history."""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from harness.metrics import Metrics, decode_histogram
from harness.simulator import User
from simulators.llm_engine import ChatOptions, ChatSimulator
from tests.llmtools import counters, engine, make_ctx, merged


def median_ms(hists: list[str]) -> float:
    values: list[float] = []
    for encoded in hists:
        hist = decode_histogram(encoded)
        values.append(hist.get_value_at_percentile(50) / 1000)
    return statistics.median(values)


def test_streaming_timing_matches_the_target() -> None:
    async def main() -> tuple[list[dict[str, Any]], list[Any]]:
        async with engine(ttft=0.2, inter_token=0.02) as (url, seen):
            opts = ChatOptions.model_validate({"turns": 3, "max_tokens": 20, "goodput_tpot": 0.05})
            metrics = Metrics()
            sim = ChatSimulator(make_ctx(opts, url, metrics))
            await sim.setup()

            async def run(user: User) -> None:
                await sim.start_user(user)
                for _ in range(4):
                    await sim.iteration(user)

            await asyncio.gather(*(run(User(i)) for i in range(3)))
            await sim.teardown()
            bodies = [s.json for s in seen if s.path == "/v1/chat/completions"]
            return [metrics.drain(everything=True)], bodies

    drained, bodies = asyncio.run(main())
    stats = merged(drained)
    assert stats["chat"]["count"] == 12 and stats["chat"]["failures"] == 0
    points = [p["values"] for d in drained for p in d["datapoints"]]
    ttft = statistics.median(p["ttft_ms"] for p in points)
    tpot = statistics.median(p["tpot_ms"] for p in points)
    assert abs(ttft - 200) <= 20, ttft
    assert abs(tpot - 20) <= 2, tpot
    assert stats["itl"]["count"] == 12 * 19
    assert abs(median_ms(stats["itl"]["hists"]) - 20) <= 2
    assert abs(median_ms(stats["ttft"]["hists"]) - 200) <= 20
    assert all(p["output_tokens"] == 20 for p in points)
    assert counters(drained)["output_tokens"] == 240
    assert counters(drained)["good_requests"] == 12
    # Multi-turn: system + 1, 3, 5 messages, then a new conversation.
    assert sorted({len(b["messages"]) for b in bodies}) == [2, 4, 6]
    assert all(b["stream"] is True and b["max_tokens"] == 20 for b in bodies)
    third = next(b for b in bodies if len(b["messages"]) == 6)
    assert [m["role"] for m in third["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
