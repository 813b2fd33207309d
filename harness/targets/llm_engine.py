"""The `llm_engine` target: a stand-in for the LLM Engine event assistant and an OpenAI-compatible server.

It speaks the API the seed's k6 scripts use (`../shared/reference/seed-systems.md` §1), under `/v1`:

- `GET /v1/auth/newPseudonym` -> 200 `{token, pseudonym}`
- `POST /v1/auth/register` (form-encoded or JSON `token, pseudonym, username, password`) -> 201
  `{user, tokens: {access: {token, expires}, refresh: {token, expires}}}`; 409 if the username exists
- `POST /v1/auth/login` (JSON or form `username, password`) -> 200 `{user, tokens}`; 401 if wrong
- `POST /v1/topics` (Bearer, JSON `{name, ...}`) -> 201 the topic with its `id`
- `POST /v1/conversations` (Bearer, JSON with `topicId` and a `zoom` adapter whose `config.meetingUrl`
  is unique) -> 201 the conversation with its `id`, `agents` and `adapters[].config.botId`; 409 if the
  meeting URL is taken
- `GET /v1/conversations/userConversations` (Bearer) -> 200 the user's conversations, oldest first
- `GET /v1/messages/{conversationId}` (Bearer) -> 200 the conversation's chat messages, including
  the assistant's answers (the harness's way to observe them; the load test itself does not)
- `POST /v1/webhooks/recall?token=T&conversationId=C` (JSON `{event, data: {bot: {id}, data: ...}}`):
  401 without the right token, 200 `ok` for an event it does not handle, 404 for an unknown
  conversation or a bot id that matches none of its zoom adapters; `transcript.data` appends the
  words to the transcript, `participant_events.chat_message` has the assistant answer (stored as a
  message; as with the seed's bot id `loadtest`, nothing is sent back to Recall) and only then
  replies 200 `ok`, so the answer's cost is the request's latency.

And `POST /v1/chat/completions` (OpenAI-compatible; `stream: true` gives server-sent events, one
token per chunk, the first after `ttft` and the rest `inter_token` apart, then `data: [DONE]`).

Latency model, on top of the shared service model: a transcript chunk costs `transcript_time` plus
`transcript_time_per_kword` per thousand words already in the transcript; a question waits for one
of `llm_slots` LLM slots, then takes `answer_time` plus `answer_time_per_kword` per thousand
transcript words, stretched by `batch_slowdown` for every other question being answered at once.
So latency grows with the talk's length and with concurrent questions, and a ramp finds where it
degrades.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from pydantic import Field

from harness.distributions import Distribution
from harness.durations import Duration
from harness.targets.service import ServiceModel, ServiceModelConfig, instrument

SUPPORTED_EVENTS = frozenset(
    {"transcript.data", "participant_events.chat_message", "participant_events.join"}
)
ACCESS_LIFETIME = timedelta(minutes=30)
REFRESH_LIFETIME = timedelta(days=30)
_TEXT = (
    "the speaker explained how living systems stay far from equilibrium and use energy to build "
    "order so that cells can move sense and organise themselves in ways that still surprise physicists"
)
_VOCABULARY = _TEXT.split()


class LlmEngineConfig(ServiceModelConfig):
    """The configuration of the `llm_engine` target."""

    concurrency: int = Field(default=256, ge=1)
    """How many requests are being served at once (a question holds its worker while it is answered)."""

    queue_limit: int = Field(default=4096, ge=0)
    """How many requests may wait for a free worker; any beyond this get 503 at once."""

    seed: int | None = None
    """Seeds the service-time, answer-time and error sampling; none means random."""

    webhook_token: str = "recall-token"
    """The token the Recall webhook expects in its `token` query parameter."""

    transcript_time: Duration = 0.002
    """What one `transcript.data` chunk costs on top of the service time."""

    transcript_time_per_kword: Duration = 0.005
    """What a transcript chunk costs more per thousand words already in the conversation's transcript."""

    answer_time: Distribution = Field(default=0.3, validate_default=True)
    """The LLM time of one answer to a participant's question, before context and contention."""

    answer_time_per_kword: Duration = 0.5
    """What an answer costs more per thousand words of the conversation's transcript (its context)."""

    llm_slots: int = Field(default=8, ge=1)
    """How many questions the LLM answers at once; the rest wait in FIFO order."""

    batch_slowdown: float = Field(default=0.1, ge=0.0)
    """How much slower an answer is for each other question being answered at the same time."""

    ttft: Duration = 0.2
    """Chat completions: the time to the first token, from when the handler starts."""

    inter_token: Duration = 0.02
    """Chat completions: the time between two output tokens."""

    output_tokens: int = Field(default=64, ge=1)
    """Chat completions: how many tokens an answer has when the request sets no `max_tokens`."""


@dataclass
class User:
    id: str
    username: str
    password: str
    pseudonym: str

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "username": self.username,
            "role": "user",
            "pseudonyms": [{"pseudonym": self.pseudonym, "active": True}],
        }


@dataclass
class Conversation:
    id: str
    owner: str
    body: dict[str, Any]
    bot_ids: set[str]
    transcript: list[str] = field(default_factory=list)
    transcript_words: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EngineState:
    config: LlmEngineConfig
    rng: random.Random
    users: dict[str, User] = field(default_factory=dict)
    tokens: dict[str, User] = field(default_factory=dict)
    """Access token -> its user."""
    topics: dict[str, dict[str, Any]] = field(default_factory=dict)
    conversations: dict[str, Conversation] = field(default_factory=dict)
    meeting_urls: set[str] = field(default_factory=set)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    llm_slots: asyncio.Semaphore | None = None
    answering: int = 0
    answered: int = 0
    chunks: int = 0

    def new_id(self) -> str:
        # Mongo-like: 24 hex digits, unique within the process.
        return f"{int(time.time()):08x}{next(self.ids):016x}"

    def slots(self) -> asyncio.Semaphore:
        if self.llm_slots is None:
            self.llm_slots = asyncio.Semaphore(self.config.llm_slots)
        return self.llm_slots


STATE = web.AppKey("llm_engine_state", EngineState)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def _openai_error(message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return web.json_response(body, status=400)


async def _body(request: web.Request) -> dict[str, Any] | None:
    """The request's JSON object or form fields; None if it is neither."""
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return {key: str(value) for key, value in (await request.post()).items()}
    try:
        data = await request.json(loads=json.loads)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _field(obj: dict[str, Any], key: str) -> dict[str, Any]:
    """`obj[key]` if it is an object, else an empty one: webhook payloads are read leniently."""
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _user(request: web.Request) -> User | None:
    state = request.app[STATE]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return state.tokens.get(token.strip())


def _tokens(state: EngineState, user: User) -> dict[str, Any]:
    now = datetime.now(UTC)
    access = secrets.token_hex(16)
    state.tokens[access] = user
    return {
        "access": {"token": access, "expires": (now + ACCESS_LIFETIME).isoformat()},
        "refresh": {"token": secrets.token_hex(16), "expires": (now + REFRESH_LIFETIME).isoformat()},
    }


# --- auth, topics, conversations ---------------------------------------------------------------


async def _new_pseudonym(request: web.Request) -> web.Response:
    number = secrets.randbelow(1_000_000)
    return web.json_response({"token": secrets.token_hex(16), "pseudonym": f"Participant {number:06d}"})


async def _register(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _body(request)
    if body is None:
        return _error(400, "expected a form-encoded or JSON body")
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not username or not isinstance(password, str) or not password:
        return _error(400, "username and password are required")
    if username in state.users:
        return _error(409, "Username already taken")
    pseudonym = body.get("pseudonym")
    user = User(
        id=state.new_id(),
        username=username,
        password=password,
        pseudonym=pseudonym if isinstance(pseudonym, str) and pseudonym else "Participant",
    )
    state.users[username] = user
    return web.json_response({"user": user.public(), "tokens": _tokens(state, user)}, status=201)


async def _login(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _body(request)
    if body is None:
        return _error(400, "expected a JSON or form-encoded body")
    user = state.users.get(str(body.get("username", "")))
    if user is None or user.password != body.get("password"):
        return _error(401, "Incorrect username or password")
    return web.json_response({"user": user.public(), "tokens": _tokens(state, user)})


async def _create_topic(request: web.Request) -> web.Response:
    state = request.app[STATE]
    user = _user(request)
    if user is None:
        return _error(401, "Please authenticate")
    body = await _body(request)
    if body is None or not isinstance(body.get("name"), str) or not body["name"]:
        return _error(400, "a topic needs a name")
    topic = {
        "name": body["name"],
        "votingAllowed": bool(body.get("votingAllowed", True)),
        "conversationCreationAllowed": bool(body.get("conversationCreationAllowed", True)),
        "private": bool(body.get("private", False)),
        "archivable": bool(body.get("archivable", True)),
        "owner": user.id,
        "id": state.new_id(),
    }
    state.topics[topic["id"]] = topic
    return web.json_response(topic, status=201)


def _zoom_adapters(body: dict[str, Any]) -> list[dict[str, Any]] | str:
    """The conversation's adapters, or an error message."""
    adapters = body.get("adapters", [])
    if not isinstance(adapters, list) or not all(isinstance(a, dict) for a in adapters):
        return "adapters must be a list of objects"
    for adapter in adapters:
        if adapter.get("type") == "zoom":
            config = adapter.get("config")
            if not isinstance(config, dict) or not isinstance(config.get("meetingUrl"), str):
                return "a zoom adapter needs config.meetingUrl"
    return adapters


async def _create_conversation(request: web.Request) -> web.Response:
    state = request.app[STATE]
    user = _user(request)
    if user is None:
        return _error(401, "Please authenticate")
    body = await _body(request)
    if body is None or not isinstance(body.get("name"), str) or not body["name"]:
        return _error(400, "a conversation needs a name")
    topic_id = body.get("topicId")
    if not isinstance(topic_id, str):
        return _error(400, "a conversation needs a topicId")
    if topic_id not in state.topics:
        return _error(404, "Topic not found")
    adapters = _zoom_adapters(body)
    if isinstance(adapters, str):
        return _error(400, adapters)
    urls = [a["config"]["meetingUrl"] for a in adapters if a.get("type") == "zoom"]
    if len(set(urls)) != len(urls) or any(url in state.meeting_urls for url in urls):
        return _error(409, "meetingUrl is already in use by another conversation")
    conversation_id = state.new_id()
    stored_adapters = []
    bot_ids = set()
    for adapter in adapters:
        stored = {**adapter, "id": state.new_id()}
        if adapter.get("type") == "zoom":
            config = dict(adapter["config"])
            # The real engine gets a bot id from Recall; the load test passes its own (`loadtest`).
            config.setdefault("botId", f"bot-{conversation_id}")
            bot_ids.add(str(config["botId"]))
            stored["config"] = config
        stored_adapters.append(stored)
    agent_types = body.get("agentTypes", [])
    agents = [
        {"id": state.new_id(), "agentType": a.get("name"), "conversation": conversation_id}
        for a in (agent_types if isinstance(agent_types, list) else [])
        if isinstance(a, dict)
    ]
    conversation = {
        "id": conversation_id,
        "name": body["name"],
        "topic": topic_id,
        "owner": user.id,
        "agents": agents,
        "channels": body.get("channels", []),
        "enableDMs": body.get("enableDMs", []),
        "adapters": stored_adapters,
        "active": True,
        "createdAt": datetime.now(UTC).isoformat(),
    }
    state.meeting_urls.update(urls)
    state.conversations[conversation_id] = Conversation(conversation_id, user.id, conversation, bot_ids)
    return web.json_response(conversation, status=201)


async def _user_conversations(request: web.Request) -> web.Response:
    state = request.app[STATE]
    user = _user(request)
    if user is None:
        return _error(401, "Please authenticate")
    return web.json_response([c.body for c in state.conversations.values() if c.owner == user.id])


async def _messages(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if _user(request) is None:
        return _error(401, "Please authenticate")
    conversation = state.conversations.get(request.match_info["conversationId"])
    if conversation is None:
        return _error(404, "Conversation not found")
    return web.json_response(conversation.messages)


# --- the Recall webhook ------------------------------------------------------------------------


async def _recall_webhook(request: web.Request) -> web.Response:
    state = request.app[STATE]
    token = request.query.get("token")
    if not token:
        return _error(401, "Token not provided")
    if not secrets.compare_digest(token.encode(), state.config.webhook_token.encode()):
        return _error(401, "Invalid token")
    body = await _body(request)
    if body is None:
        return _error(400, "expected a JSON body")
    event = body.get("event")
    if event not in SUPPORTED_EVENTS:
        return web.Response(text="ok")
    conversation = state.conversations.get(request.query.get("conversationId", ""))
    if conversation is None:
        return _error(404, "Conversation not found")
    data = _field(body, "data")
    bot = _field(data, "bot")
    if str(bot.get("id")) not in conversation.bot_ids:
        return _error(404, "No zoom adapter with this bot id in the conversation")
    payload = _field(data, "data")
    if event == "transcript.data":
        await _ingest_transcript(state, conversation, payload)
    elif event == "participant_events.chat_message":
        await _answer(state, conversation, payload)
    return web.Response(text="ok")


async def _ingest_transcript(state: EngineState, conversation: Conversation, payload: dict[str, Any]) -> None:
    config = state.config
    await asyncio.sleep(
        config.transcript_time + config.transcript_time_per_kword * conversation.transcript_words / 1000
    )
    words = payload.get("words")
    words = words if isinstance(words, list) else []
    text = " ".join(str(w.get("text", "")) for w in words if isinstance(w, dict)).strip()
    if text:
        conversation.transcript.append(text)
        conversation.transcript_words += len(text.split())
    state.chunks += 1


def answer_seconds(config: LlmEngineConfig, transcript_words: int, answering: int, base: float) -> float:
    """How long one answer takes: `base` plus its context cost, stretched by the other answers in flight."""
    work = base + config.answer_time_per_kword * transcript_words / 1000
    return work * (1 + config.batch_slowdown * max(0, answering - 1))


async def _answer(state: EngineState, conversation: Conversation, payload: dict[str, Any]) -> None:
    participant = _field(payload, "participant")
    message = _field(payload, "data")
    question = str(message.get("text", ""))
    now = datetime.now(UTC).isoformat()
    conversation.messages.append(
        {"id": state.new_id(), "body": question, "pseudonym": participant.get("name"), "createdAt": now}
    )
    async with state.slots():
        state.answering += 1
        try:
            seconds = answer_seconds(
                state.config,
                conversation.transcript_words,
                state.answering,
                state.config.answer_time.sample(state.rng),
            )
            await asyncio.sleep(seconds)
        finally:
            state.answering -= 1
    last = conversation.transcript[-1] if conversation.transcript else "nothing yet"
    conversation.messages.append(
        {
            "id": state.new_id(),
            "body": f"The speaker has said {conversation.transcript_words} words so far; lately: {last}",
            "pseudonym": "Event Assistant",
            "fromAgent": True,
            "createdAt": datetime.now(UTC).isoformat(),
        }
    )
    state.answered += 1


# --- OpenAI-compatible chat completions --------------------------------------------------------


def _prompt_tokens(messages: list[Any]) -> int:
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            total += sum(len(str(p.get("text", "")).split()) for p in content if isinstance(p, dict))
    return total


def _max_tokens(body: dict[str, Any], default: int) -> int | str:
    """The number of tokens to produce, or an error message."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{key} must be a positive integer"
        return value
    return default


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config = state.config
    start = time.perf_counter()
    body = await _body(request)
    if body is None:
        return _openai_error("expected a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _openai_error("messages must be a non-empty list", "messages")
    n_tokens = _max_tokens(body, config.output_tokens)
    if isinstance(n_tokens, str):
        return _openai_error(n_tokens, "max_tokens")
    model = str(body.get("model") or "llm-engine-sim")
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    offset = state.rng.randrange(len(_VOCABULARY))
    tokens = [(" " if i else "") + _VOCABULARY[(offset + i) % len(_VOCABULARY)] for i in range(n_tokens)]
    usage = {
        "prompt_tokens": _prompt_tokens(messages),
        "completion_tokens": n_tokens,
        "total_tokens": _prompt_tokens(messages) + n_tokens,
    }
    # A request's own limit is what stops the answer; without one it ends where the model would.
    finish = (
        "stop" if body.get("max_tokens") is None and body.get("max_completion_tokens") is None else "length"
    )
    if not body.get("stream"):
        await _sleep_until(start + config.ttft + config.inter_token * (n_tokens - 1))
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(tokens)},
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
        )
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
    )
    await response.prepare(request)

    async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

    for i, token in enumerate(tokens):
        await _sleep_until(start + config.ttft + config.inter_token * i)
        delta = {"role": "assistant", "content": token} if i == 0 else {"content": token}
        await send([{"index": 0, "delta": delta, "finish_reason": None}])
    await send([{"index": 0, "delta": {}, "finish_reason": finish}])
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        await send([], usage=usage)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _engine_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "users": len(state.users),
            "topics": len(state.topics),
            "conversations": len(state.conversations),
            "transcript_chunks": state.chunks,
            "answering": state.answering,
            "answered": state.answered,
        }
    )


def build_app(config: LlmEngineConfig) -> web.Application:
    """The LLM Engine app, with `config`'s service model in front of every route but health and stats."""
    app = web.Application()
    instrument(app, ServiceModel(config, seed=config.seed))
    app[STATE] = EngineState(config=config, rng=random.Random(config.seed))
    app.router.add_get("/v1/auth/newPseudonym", _new_pseudonym)
    app.router.add_post("/v1/auth/register", _register)
    app.router.add_post("/v1/auth/login", _login)
    app.router.add_post("/v1/topics", _create_topic)
    app.router.add_post("/v1/conversations", _create_conversation)
    app.router.add_get("/v1/conversations/userConversations", _user_conversations)
    app.router.add_get("/v1/messages/{conversationId}", _messages)
    app.router.add_post("/v1/webhooks/recall", _recall_webhook)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/_engine", _engine_stats)
    return app
