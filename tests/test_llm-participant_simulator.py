"""The `llm-participant` simulator against the real `llm_engine` target: the exact chat-message body,
round-robin over conversations, and timeouts and server errors counted apart from latency."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from harness.metrics import Metrics
from harness.simulator import User
from simulators.llm_engine import ParticipantOptions, ParticipantSimulator
from simulators.llm_engine.event import DATA, prepare_event, read_lines
from tests.llmtools import counters, engine, make_ctx, merged
from tests.test_llm_engine_simulator import LOG

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
QUESTIONS = read_lines(DATA / "questions.txt")


def test_question_bank_is_the_seeds() -> None:
    assert len(QUESTIONS) == 6
    assert "I stepped out for am minute, what did I miss?" in QUESTIONS


async def ask(url: str, users: int, rounds: int, **options: Any) -> tuple[list[dict[str, Any]], list[str]]:
    opts = ParticipantOptions.model_validate({"conversations": 2, **options})
    prepared = await asyncio.to_thread(prepare_event, opts, {"llm": url}, "t1", LOG, find=True)
    metrics = Metrics()
    sim = ParticipantSimulator(make_ctx(opts, url, metrics, prepared))
    await sim.setup()

    async def run(user: User) -> None:
        await sim.start_user(user)
        for _ in range(rounds):
            await sim.iteration(user)

    await asyncio.gather(*(run(User(i)) for i in range(users)))
    await sim.teardown()
    return [metrics.drain(everything=True)], prepared["conversations"]


def test_participant_bodies_and_round_robin() -> None:
    async def main() -> None:
        async with engine(answer_time=0.01, answer_time_per_kword=0) as (url, seen):
            drained, conversations = await ask(url, 4, 2)
            hooks = [s for s in seen if s.path == "/v1/webhooks/recall"]
            assert len(hooks) == 8
            for s in hooks:
                body = s.json
                participant = body["data"]["data"]["participant"]
                name = participant["name"]
                index = int(name.removeprefix("user")) - 1
                assert s.query == {"token": "recall-token", "conversationId": conversations[index % 2]}
                assert participant.pop("id").startswith(f"{name}-")
                message = body["data"]["data"]["data"]
                assert ISO.match(message.pop("timestamp"))
                assert message["text"] in QUESTIONS
                assert body == {
                    "event": "participant_events.chat_message",
                    "data": {
                        "bot": {"id": "loadtest"},
                        "data": {
                            "participant": {"name": name},
                            "data": {"text": message["text"], "to": "only_bot"},
                        },
                    },
                }
            assert {s.json["data"]["data"]["participant"]["name"] for s in hooks} == {
                f"user{i}" for i in range(1, 5)
            }
            stats = merged(drained)
            assert stats["user_message"]["count"] == 8 and stats["user_message"]["failures"] == 0
            totals = counters(drained)
            assert "timeout" not in totals and "server_error" not in totals
            assert totals[f"conversation_messages.{conversations[0]}"] == 4

    asyncio.run(main())


def test_participant_counts_timeouts_and_server_errors() -> None:
    async def main() -> None:
        async with engine(answer_time=0.2, answer_time_per_kword=0) as (url, _seen):
            drained, _conversations = await ask(url, 2, 1, timeout_after=0.05)
            assert counters(drained)["timeout"] == 2
            assert merged(drained)["user_message"]["failures"] == 2
        async with engine(error_rate=1.0) as (url, _seen):
            opts = {"conversation_ids": ["a", "b"]}
            drained, _ = await ask(url, 2, 1, **opts)
            totals = counters(drained)
            assert totals["server_error"] == 2 and totals["conversation_errors.a"] == 1
            assert "timeout" not in totals

    asyncio.run(main())
