"""The `llm-speaker` simulator against the real `llm_engine` target: the exact webhook bodies, the
chunk order, the drift-free schedule (measured on the server, within 100 ms) and its checks."""

from __future__ import annotations

import asyncio
import itertools
import re
from typing import Any

from harness.metrics import Metrics
from harness.simulator import StopUser, User
from simulators.llm_engine import SpeakerOptions, SpeakerSimulator
from simulators.llm_engine.event import DATA, prepare_event, read_lines
from tests.llmtools import Seen, engine, make_ctx, merged
from tests.test_llm_engine_simulator import LOG

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_builtin_transcript_has_150_chunks() -> None:
    chunks = read_lines(DATA / "transcript.txt")
    assert len(chunks) == 150 and len(set(chunks)) == 150


async def speak(
    url: str, users: int, chunks: int, interval: float, tmp: Any, **options: Any
) -> tuple[list[dict[str, Any]], list[str]]:
    transcript = tmp / "talk.txt"
    transcript.write_text("\n".join(f"chunk number {i} of the talk" for i in range(chunks)) + "\n")
    opts = SpeakerOptions.model_validate(
        {"conversations": 2, "chunk_interval": interval, "transcript": str(transcript), **options}
    )
    prepared = await asyncio.to_thread(prepare_event, opts, {"llm": url}, "t1", LOG)
    metrics = Metrics()
    sim = SpeakerSimulator(make_ctx(opts, url, metrics, prepared))
    await sim.setup()

    async def run(user: User) -> None:
        try:
            await sim.start_user(user)
            while True:
                await sim.iteration(user)
        except StopUser:
            pass

    await asyncio.gather(*(run(User(i)) for i in range(users)))
    await sim.teardown()
    return [metrics.drain(everything=True)], prepared["conversations"]


def test_speaker_bodies_order_and_schedule(tmp_path: Any) -> None:
    async def main() -> None:
        async with engine() as (url, seen):
            drained, conversations = await speak(url, 3, 6, 0.3, tmp_path)
            hooks = [s for s in seen if s.path == "/v1/webhooks/recall"]
            assert len(hooks) == 12  # the third speaker has no conversation
            for conversation in conversations:
                mine = [s for s in hooks if s.query["conversationId"] == conversation]
                assert len(mine) == 6
                for i, s in enumerate(mine):
                    check_body(s, conversation, f"chunk number {i} of the talk")
                gaps = [b.t - a.t for a, b in itertools.pairwise(mine)]
                assert all(abs(g - 0.3) < 0.1 for g in gaps), gaps
                # Drift-free: the last chunk is due 5 intervals after the first.
                assert abs(mine[-1].t - mine[0].t - 1.5) < 0.1
            stats = merged(drained)
            assert stats["transcript"]["count"] == 12 and stats["transcript"]["failures"] == 0
            points = [p for d in drained for p in d["datapoints"]]
            assert len(points) == 12 and {p["entity"] for p in points} == {
                f"conversation-{c}" for c in conversations
            }

    asyncio.run(main())


def check_body(s: Seen, conversation: str, text: str) -> None:
    assert s.method == "POST" and s.content_type == "application/json"
    assert s.query == {"token": "recall-token", "conversationId": conversation}
    body = s.json
    data = body["data"]["data"]
    participant_id = data["participant"].pop("id")
    assert (
        participant_id.startswith(f"Speaker-{conversation}-") and participant_id.rsplit("-", 1)[1].isdigit()
    )
    stamp = data["words"][0]["end_timestamp"].pop("absolute")
    assert ISO.match(stamp), stamp
    assert body == {
        "event": "transcript.data",
        "data": {
            "bot": {"id": "loadtest"},
            "data": {
                "participant": {"name": f"Speaker-{conversation}"},
                "words": [{"text": text, "end_timestamp": {}}],
            },
        },
    }


def test_speaker_bad_token_fails_the_chunk(tmp_path: Any) -> None:
    async def main() -> None:
        async with engine() as (url, _seen):
            drained, _ = await speak(url, 1, 2, 0.05, tmp_path, webhook_token="wrong")
            stats = merged(drained)
            assert stats["transcript"]["failures"] == 2
            assert stats["transcript"]["errors"] == {"HTTP 401": 2}

    asyncio.run(main())
