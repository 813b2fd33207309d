"""The `llm_engine` embedded target: the seed's API and status codes, its latency model, streaming timing."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from harness.errors import UsageError
from harness.targets import get_target
from harness.targets.llm_engine import LlmEngineConfig, answer_seconds, build_app
from harness.targets.runner import EmbeddedTarget

TOKEN = "secret-token"
FAST = {"service_time": 0, "webhook_token": TOKEN, "answer_time": "1ms", "answer_time_per_kword": 0}


@asynccontextmanager
async def serving(**config: Any) -> AsyncIterator[str]:
    """An llm_engine target with `config` served in this event loop on 127.0.0.1; yields its `/v1` base."""
    runner = web.AppRunner(build_app(LlmEngineConfig.model_validate(config)), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(trust_env=False)


async def setup_conversations(s: aiohttp.ClientSession, api: str, n: int = 1) -> tuple[str, list[str]]:
    """The seed's set-up: pseudonym, form-encoded register, topic, `n` zoom conversations."""
    async with s.get(f"{api}/auth/newPseudonym") as r:
        assert r.status == 200
        pseudo = await r.json()
        assert set(pseudo) == {"token", "pseudonym"}
    form = {"token": pseudo["token"], "pseudonym": pseudo["pseudonym"], "username": "lt", "password": "pw1"}
    async with s.post(f"{api}/auth/register", data=form) as r:
        assert r.status == 201
        body = await r.json()
    assert body["user"]["username"] == "lt"
    access = body["tokens"]["access"]["token"]
    assert body["tokens"]["refresh"]["token"] and body["tokens"]["access"]["expires"]
    auth = {"Authorization": f"Bearer {access}"}
    topic_body = {
        "name": "Load Test Topic",
        "votingAllowed": True,
        "conversationCreationAllowed": True,
        "private": False,
        "archivable": True,
    }
    async with s.post(f"{api}/topics", json=topic_body, headers=auth) as r:
        assert r.status == 201
        topic_id = (await r.json())["id"]
    ids = []
    for i in range(n):
        async with s.post(f"{api}/conversations", json=conversation_body(topic_id, i), headers=auth) as r:
            assert r.status == 201, await r.text()
            conv = await r.json()
        assert conv["adapters"][0]["config"]["botId"] == "loadtest"
        assert conv["agents"][0]["agentType"] == "eventAssistant"
        ids.append(conv["id"])
    return access, ids


def conversation_body(topic_id: str, i: int, url: str | None = None) -> dict[str, Any]:
    return {
        "name": "Where are all the aliens?",
        "topicId": topic_id,
        "agentTypes": [{"name": "eventAssistant"}],
        "channels": [{"name": "transcript"}],
        "enableDMs": ["agents"],
        "adapters": [
            {
                "type": "zoom",
                "config": {
                    "meetingUrl": url or f"http://fakezoom.com/loadtest-{time.time_ns()}-{i}",
                    "botName": "Load Tester",
                    "botId": "loadtest",
                },
                "dmChannels": [{"direct": True, "agent": "eventAssistant", "direction": "both"}],
                "audioChannels": [{"name": "transcript"}],
            }
        ],
    }


def transcript_event(text: str, bot: str = "loadtest") -> dict[str, Any]:
    return {
        "event": "transcript.data",
        "data": {
            "bot": {"id": bot},
            "data": {
                "participant": {"name": "Speaker", "id": "Speaker-1"},
                "words": [{"text": text, "end_timestamp": {"absolute": "2026-01-01T00:00:00Z"}}],
            },
        },
    }


def chat_event(question: str) -> dict[str, Any]:
    return {
        "event": "participant_events.chat_message",
        "data": {
            "bot": {"id": "loadtest"},
            "data": {
                "participant": {"name": "user1", "id": "user1-1"},
                "data": {"text": question, "timestamp": "2026-01-01T00:00:00Z", "to": "only_bot"},
            },
        },
    }


async def post_webhook(
    s: aiohttp.ClientSession, api: str, conv: str, body: Any, token: str | None = TOKEN
) -> tuple[int, str, float]:
    params = {"conversationId": conv}
    if token is not None:
        params["token"] = token
    start = time.perf_counter()
    async with s.post(f"{api}/webhooks/recall", params=params, json=body) as r:
        return r.status, await r.text(), time.perf_counter() - start


# --- the seed's API ----------------------------------------------------------------------------


def test_set_up_login_and_user_conversations() -> None:
    async def scenario() -> None:
        async with serving(**FAST) as api, session() as s:
            access, ids = await setup_conversations(s, api, n=3)
            # A second register with the same username is a conflict, as in the original.
            form = {"token": "t", "pseudonym": "p", "username": "lt", "password": "other"}
            async with s.post(f"{api}/auth/register", data=form) as r:
                assert r.status == 409
            async with s.post(f"{api}/auth/register", data={"username": "x"}) as r:
                assert r.status == 400
            async with s.post(f"{api}/auth/login", json={"username": "lt", "password": "pw1"}) as r:
                assert r.status == 200
                login = await r.json()
            assert login["user"]["username"] == "lt"
            async with s.post(f"{api}/auth/login", json={"username": "lt", "password": "bad"}) as r:
                assert r.status == 401
            auth = {"Authorization": f"Bearer {login['tokens']['access']['token']}"}
            async with s.get(f"{api}/conversations/userConversations", headers=auth) as r:
                assert r.status == 200
                assert [c["id"] for c in await r.json()] == ids
            for path in ("/conversations/userConversations", f"/messages/{ids[0]}"):
                async with s.get(api + path) as r:
                    assert r.status == 401
            async with s.post(f"{api}/topics", json={"name": "t"}) as r:
                assert r.status == 401
            async with s.post(f"{api}/topics", json={}, headers=auth) as r:
                assert r.status == 400
            assert access

    asyncio.run(scenario())


def test_conversation_creation_rules() -> None:
    async def scenario() -> None:
        async with serving(**FAST) as api, session() as s:
            access, _ = await setup_conversations(s, api, n=0)
            auth = {"Authorization": f"Bearer {access}"}
            async with s.post(f"{api}/topics", json={"name": "t"}, headers=auth) as r:
                topic = (await r.json())["id"]
            body = conversation_body(topic, 0, url="http://fakezoom.com/same")
            async with s.post(f"{api}/conversations", json=body, headers=auth) as r:
                assert r.status == 201
                first = await r.json()
            async with s.post(f"{api}/conversations", json=body, headers=auth) as r:
                assert r.status == 409  # the meeting URL must be unique
            async with s.post(f"{api}/conversations", json=conversation_body("nope", 1), headers=auth) as r:
                assert r.status == 404
            async with s.post(f"{api}/conversations", json=conversation_body(topic, 2)) as r:
                assert r.status == 401
            no_bot = conversation_body(topic, 3)
            del no_bot["adapters"][0]["config"]["botId"]
            async with s.post(f"{api}/conversations", json=no_bot, headers=auth) as r:
                assert r.status == 201
                second = await r.json()
            # Without a bot id of its own the conversation gets one, returned like the conversation id.
            assert second["adapters"][0]["config"]["botId"] and second["id"] != first["id"]

    asyncio.run(scenario())


def test_recall_webhook_status_codes() -> None:
    async def scenario() -> None:
        async with serving(**FAST) as api, session() as s:
            _, (conv,) = await setup_conversations(s, api)
            assert (await post_webhook(s, api, conv, transcript_event("hello")))[:2] == (200, "ok")
            assert (await post_webhook(s, api, conv, transcript_event("hi"), token=None))[0] == 401
            assert (await post_webhook(s, api, conv, transcript_event("hi"), token="wrong"))[0] == 401
            assert (await post_webhook(s, api, conv, transcript_event("hi"), token=TOKEN + "x"))[0] == 401
            assert (await post_webhook(s, api, "000000000000000000000000", transcript_event("hi")))[0] == 404
            assert (await post_webhook(s, api, conv, transcript_event("hi", bot="other")))[0] == 404
            unknown = {"event": "bot.status_change", "data": {"bot": {"id": "nobody"}}}
            assert (await post_webhook(s, api, "no-such-conversation", unknown))[:2] == (200, "ok")
            join = {"event": "participant_events.join", "data": {"bot": {"id": "loadtest"}, "data": {}}}
            assert (await post_webhook(s, api, conv, join))[:2] == (200, "ok")

    asyncio.run(scenario())


def test_chat_message_is_answered_before_ok() -> None:
    async def scenario() -> None:
        config = {**FAST, "answer_time": "100ms"}
        async with serving(**config) as api, session() as s:
            access, (conv,) = await setup_conversations(s, api)
            await post_webhook(s, api, conv, transcript_event("life is far from equilibrium"))
            status, text, elapsed = await post_webhook(s, api, conv, chat_event("What did they just say?"))
            assert (status, text) == (200, "ok") and elapsed >= 0.1
            auth = {"Authorization": f"Bearer {access}"}
            async with s.get(f"{api}/messages/{conv}", headers=auth) as r:
                messages = await r.json()
            assert messages[0]["body"] == "What did they just say?"
            assert messages[1]["fromAgent"] and "far from equilibrium" in messages[1]["body"]

    asyncio.run(scenario())


# --- the latency model -------------------------------------------------------------------------


def test_answer_latency_grows_with_transcript_length() -> None:
    async def scenario() -> None:
        config = {**FAST, "answer_time": "20ms", "answer_time_per_kword": "100ms"}
        async with serving(**config) as api, session() as s:
            _, (conv,) = await setup_conversations(s, api)
            _, _, short = await post_webhook(s, api, conv, chat_event("What is this event about?"))
            sentence = " ".join(["word"] * 100)
            for _ in range(20):  # 2000 words: +200 ms of context
                await post_webhook(s, api, conv, transcript_event(sentence))
            _, _, long = await post_webhook(s, api, conv, chat_event("What is this event about?"))
            assert short < 0.1 and 0.2 <= long < 0.4

    asyncio.run(scenario())


def test_answer_latency_grows_with_concurrent_questions() -> None:
    config = LlmEngineConfig(answer_time_per_kword="1s", batch_slowdown=0.5)
    assert answer_seconds(config, 0, 1, 0.2) == pytest.approx(0.2)
    assert answer_seconds(config, 1000, 1, 0.2) == pytest.approx(1.2)
    assert answer_seconds(config, 1000, 3, 0.2) == pytest.approx(2.4)

    async def scenario() -> None:
        # Two LLM slots, 100 ms each alone: six questions at once take three rounds, slower than one.
        config = {**FAST, "answer_time": "100ms", "llm_slots": 2, "batch_slowdown": 0.5}
        async with serving(**config) as api, session() as s:
            _, (conv,) = await setup_conversations(s, api)
            _, _, alone = await post_webhook(s, api, conv, chat_event("q"))
            results = await asyncio.gather(*(post_webhook(s, api, conv, chat_event("q")) for _ in range(6)))
        latencies = sorted(r[2] for r in results)
        assert all(r[:2] == (200, "ok") for r in results)
        assert alone < 0.14 and latencies[-1] >= 0.4  # three rounds of 150 ms

    asyncio.run(scenario())


# --- OpenAI-compatible chat completions --------------------------------------------------------


async def stream_completion(api: str, body: dict[str, Any]) -> tuple[list[float], list[Any], float]:
    """Arrival times (from the request) of each content chunk, every parsed event, and the total time."""
    arrivals: list[float] = []
    events: list[Any] = []
    async with session() as s:
        start = time.perf_counter()
        async with s.post(f"{api}/chat/completions", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            buffer = b""
            async for data in r.content.iter_any():
                now = time.perf_counter() - start
                buffer += data
                while b"\n\n" in buffer:
                    line, buffer = buffer.split(b"\n\n", 1)
                    assert line.startswith(b"data: ")
                    payload = line[len(b"data: ") :].decode()
                    event = payload if payload == "[DONE]" else json.loads(payload)
                    events.append(event)
                    if (
                        isinstance(event, dict)
                        and event["choices"]
                        and event["choices"][0]["delta"].get("content")
                    ):
                        arrivals.append(now)
        return arrivals, events, time.perf_counter() - start


def test_streaming_token_timing_matches_config() -> None:
    async def scenario() -> None:
        async with serving(service_time=0, ttft="200ms", inter_token="20ms") as api:
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": "tell me about the talk"}],
                "stream": True,
                "max_tokens": 30,
                "stream_options": {"include_usage": True},
            }
            arrivals, events, _ = await stream_completion(api, body)
        assert len(arrivals) == 30
        assert arrivals[0] == pytest.approx(0.2, rel=0.1)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert statistics.mean(gaps) == pytest.approx(0.02, rel=0.1)
        assert events[-1] == "[DONE]"
        assert events[0]["object"] == "chat.completion.chunk"
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        assert events[-2]["usage"] == {"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35}

    asyncio.run(scenario())


def test_non_streaming_completion_and_errors() -> None:
    async def scenario() -> None:
        async with serving(service_time=0, ttft="50ms", inter_token="10ms", output_tokens=6) as api:
            async with session() as s:
                start = time.perf_counter()
                body = {"messages": [{"role": "user", "content": "hi there"}]}
                async with s.post(f"{api}/chat/completions", json=body) as r:
                    assert r.status == 200
                    answer = await r.json()
                elapsed = time.perf_counter() - start
                for bad in (
                    {"messages": []},
                    {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
                ):
                    async with s.post(f"{api}/chat/completions", json=bad) as r:
                        assert r.status == 400
                        assert (await r.json())["error"]["type"] == "invalid_request_error"
            arrivals, events, _ = await stream_completion(api, {**body, "stream": True})
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert len(answer["choices"][0]["message"]["content"].split()) == 6
        assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
        assert 0.1 <= elapsed < 0.2  # 50 ms + 5 × 10 ms
        # Without include_usage there is no usage chunk: tokens, the finish chunk, then [DONE].
        assert len(arrivals) == 6 and len(events) == 8 and events[-1] == "[DONE]"

    asyncio.run(scenario())


# --- registry and process ----------------------------------------------------------------------


def test_config_is_validated() -> None:
    kind = get_target("llm_engine")
    config = kind.parse_config({"ttft": "150ms", "inter_token": "5ms", "webhook_token": "t"})
    assert isinstance(config, LlmEngineConfig)
    assert (config.ttft, config.inter_token, config.webhook_token) == (0.15, 0.005, "t")
    assert LlmEngineConfig().ttft == 0.2 and LlmEngineConfig().inter_token == 0.02
    with pytest.raises(UsageError, match="llm_slots"):
        kind.parse_config({"llm_slots": 0})
    with pytest.raises(UsageError, match="nope"):
        kind.parse_config({"nope": 1})


def test_embedded_target_on_loopback() -> None:
    with EmbeddedTarget("llm", "llm_engine", {"webhook_token": TOKEN, "service_time": "1ms"}) as target:
        url = target.start(timeout=15)
        assert url.startswith("http://127.0.0.1:")

        async def scenario() -> None:
            async with session() as s:
                _, (conv,) = await setup_conversations(s, f"{url}/v1")
                assert (await post_webhook(s, f"{url}/v1", conv, transcript_event("hi")))[:2] == (200, "ok")
                assert (await post_webhook(s, f"{url}/v1", conv, transcript_event("hi"), token="x"))[0] == 401

        asyncio.run(scenario())
