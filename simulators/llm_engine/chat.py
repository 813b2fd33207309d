"""`llm-chat`: multi-turn streaming chat against any OpenAI-compatible `/v1/chat/completions`.

Each iteration is one turn: the user's next prompt is appended to the conversation's history
(optional `system` prompt first, then alternating user/assistant messages) and sent as
`POST {base}{path}` with `{"model", "messages", "stream": true, "max_tokens",
"stream_options": {"include_usage": true}}`; the streamed answer is appended to the history, so the
next turn carries it. After `turns` turns the user starts a new conversation. Works with vLLM,
llama.cpp server, Ollama's OpenAI API, hosted APIs (`api_key` → `Authorization: Bearer`) and the
embedded `llm_engine` target.

    groups:
      chat:
        simulator: llm-chat
        users: 20
        think_time: {type: uniform, min: 1s, max: 3s}
        options: {target: llm, model: m, turns: 4, max_tokens: 128, goodput_ttft: 1s, goodput_tpot: 50ms}
    thresholds:
      - p95(chat.ttft) < 1s
      - error_rate(chat.goodput) < 10%

Metrics, all measured on the client with `time.perf_counter()`; t0 is just before the request is
sent, a *token event* is a received SSE `data:` chunk whose `choices[0].delta.content` is non-empty
(servers send one token per chunk when streaming; a chunk carrying several tokens is one event):

- `ttft` (time to first token) = first token event − t0. Includes queueing, prefill and network.
- `itl` (inter-token latency) = the gap between two consecutive token events; one sample per gap,
  so its percentiles are over all gaps of all requests (the vLLM / GenAI-Perf definition).
- `tpot` (time per output token) = (last token event − first token event) / (output tokens − 1),
  one sample per request with at least two tokens. Excludes TTFT; a request's mean ITL when the
  server sends a token per chunk.
- `e2e` (end-to-end latency) = end of the stream (`data: [DONE]` or connection close) − t0.
- output tokens = `usage.completion_tokens` when the server reports it, else the token events.
- output tokens/s: per request, output tokens / e2e (in the request's datapoint,
  `output_tps`); for the run, the counter `output_tokens` (its rate is the system's throughput).
- `goodput`: one request per completed answer, failed unless ttft ≤ `goodput_ttft` and tpot ≤
  `goodput_tpot`; so `1 − error_rate(chat.goodput)` is the share of requests meeting both limits
  (`error_rate(chat.goodput) < 10%` asks for 90% goodput). Counters `good_requests` / `requests_done`.
- `chat`: the whole request (latency = e2e); it fails on an HTTP error, a broken stream or no tokens.
  It is the only name counted in the group's totals; the others are phases of it (kind `phase`:
  their own rows and percentiles, never counted twice in requests, rps or error rate).
Latencies go into the usual histograms (ms in reports); each request also leaves a datapoint
(entity `chat-user-<g>`) with all the per-request figures.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from harness.durations import Duration
from harness.simulator import Simulator, User
from simulators.llm_engine.event import DATA, read_lines


class ChatOptions(BaseModel):
    """Options of the `llm-chat` simulator."""

    model_config = ConfigDict(extra="forbid")
    target: str | None = None
    """Name of a profile target (default: the only target)."""
    base_url: str | None = None
    """An explicit base URL instead of a target (http://127.0.0.1:8000)."""
    path: str = "/v1/chat/completions"
    model: str = "llm-engine-sim"
    api_key: str | None = None
    """Sent as `Authorization: Bearer …` (use `${ENV}` in the profile)."""
    system: str | None = "You are a helpful event assistant."
    prompts: str | None = None
    """A prompt file, one prompt a line (default: the event question bank)."""
    turns: int = Field(default=3, ge=1)
    """Turns per conversation before the user starts a new one (history grows within it)."""
    max_tokens: int | None = Field(default=64, ge=1)
    """Output tokens asked for (none: the server decides)."""
    timeout: Duration = Field(default=120.0, gt=0)
    goodput_ttft: Duration = Field(default=2.0, gt=0)
    """A request counts towards goodput only if its TTFT is at most this…"""
    goodput_tpot: Duration = Field(default=0.1, gt=0)
    """…and its time per output token at most this."""


class ChatSimulator(Simulator):
    """Multi-turn streaming chat (SSE) against an OpenAI-compatible server: TTFT, ITL, TPOT, tokens/s."""

    name = "llm-chat"
    description = "streaming OpenAI-compatible chat completions: TTFT, inter-token latency, TPOT, goodput"
    Options = ChatOptions

    async def setup(self) -> None:
        opts: ChatOptions = self.options
        base = opts.base_url or self.ctx.target_url(opts.target)
        self.url = base.rstrip("/") + "/" + opts.path.lstrip("/")
        self.prompts = read_lines(opts.prompts or DATA / "questions.txt")
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if opts.api_key:
            headers["Authorization"] = f"Bearer {opts.api_key}"
        self.session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=opts.timeout),
            connector=aiohttp.TCPConnector(limit=0),
        )

    async def teardown(self) -> None:
        await self.session.close()

    async def start_user(self, user: User) -> None:
        user.data = {"history": [], "turn": 0, "index": self.ctx.global_user(user)}

    def _new_history(self) -> list[dict[str, str]]:
        system = self.options.system
        return [{"role": "system", "content": system}] if system else []

    async def iteration(self, user: User) -> None:
        data = user.data
        assert data is not None
        opts: ChatOptions = self.options
        if data["turn"] % opts.turns == 0:
            data["history"] = self._new_history()
        data["turn"] += 1
        history: list[dict[str, str]] = data["history"]
        history.append({"role": "user", "content": self.ctx.rng.choice(self.prompts)})
        body: dict[str, Any] = {
            "model": opts.model,
            "messages": history,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if opts.max_tokens is not None:
            body["max_tokens"] = opts.max_tokens
        result = await self.stream(body)
        metrics = self.metrics
        stamps: list[float] = result["stamps"]
        e2e = result["end"] - result["t0"]
        error = result["error"]
        if error is None and not stamps:
            error = "no tokens in the answer"
        metrics.request("chat", e2e, kind="llm", ok=error is None, error=error)
        if not stamps:
            history.pop()
            return
        history.append({"role": "assistant", "content": result["text"]})
        ttft = stamps[0] - result["t0"]
        tokens = result["usage_tokens"] or len(stamps)
        metrics.phase("ttft", ttft)
        for previous, current in itertools.pairwise(stamps):
            metrics.phase("itl", current - previous)
        tpot = (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else None
        if tpot is not None:
            metrics.phase("tpot", tpot)
        metrics.phase("e2e", e2e)
        metrics.counter("output_tokens", tokens)
        metrics.counter("requests_done")
        good = error is None and ttft <= opts.goodput_ttft and (tpot is None or tpot <= opts.goodput_tpot)
        if good:
            metrics.counter("good_requests")
        metrics.phase(
            "goodput",
            e2e,
            ok=good,
            error=None if good else f"ttft > {opts.goodput_ttft:g}s or tpot > {opts.goodput_tpot:g}s",
        )
        metrics.datapoint(
            f"chat-user-{data['index']}",
            {
                "turn": data["turn"],
                "ttft_ms": round(ttft * 1000, 3),
                "tpot_ms": None if tpot is None else round(tpot * 1000, 3),
                "e2e_ms": round(e2e * 1000, 3),
                "output_tokens": tokens,
                "output_tps": round(tokens / e2e, 3) if e2e > 0 else None,
                "history_messages": len(history),
                "good": good,
            },
        )

    async def stream(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send one streaming request; the token event times, the text, usage and any error."""
        stamps: list[float] = []
        parts: list[str] = []
        usage_tokens = 0
        error: str | None = None
        t0 = time.perf_counter()
        try:
            async with self.session.post(self.url, data=json.dumps(body)) as response:
                if response.status != 200:
                    text = await response.text()
                    error = f"HTTP {response.status}: {text[:200]}"
                else:
                    done = False
                    buffer = b""
                    async for chunk in response.content.iter_any():
                        now = time.perf_counter()
                        buffer += chunk
                        while b"\n" in buffer:
                            line, _, buffer = buffer.partition(b"\n")
                            line = line.strip()
                            if not line.startswith(b"data:"):
                                continue
                            payload = line[5:].strip()
                            if payload == b"[DONE]":
                                done = True
                                break
                            event = json.loads(payload)
                            if event.get("usage"):
                                usage_tokens = int(event["usage"].get("completion_tokens") or 0)
                            for choice in event.get("choices") or []:
                                content = (choice.get("delta") or {}).get("content")
                                if content:
                                    stamps.append(now)
                                    parts.append(content)
                        if done:
                            break
        except Exception as exc:  # a broken stream fails the request
            error = f"{type(exc).__name__}: {exc}"
        return {
            "t0": t0,
            "end": time.perf_counter(),
            "stamps": stamps,
            "text": "".join(parts),
            "usage_tokens": usage_tokens,
            "error": error,
        }
