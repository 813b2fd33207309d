"""`llm-participant`: event participants asking the event assistant questions through the Recall webhook.

As the seed's `eventAssistantLoad.js` (`seed-systems.md` §1.2): participant g (`ctx.global_user`)
always uses conversation `g % N` (round-robin, so 500 users over 25 conversations is 20 each) and
the name `user<g+1>`; each iteration asks one question, chosen uniformly from the bank (the seed's
six questions, typo included, or a `questions` file), as

    POST {api}/webhooks/recall?token=T&conversationId=C        (Content-Type: application/json)
    {"event": "participant_events.chat_message", "data": {"bot": {"id": "loadtest"}, "data": {
        "participant": {"name": "user<g+1>", "id": "user<g+1>-<ms>"},
        "data": {"text": <question>, "timestamp": <ISO now>, "to": "only_bot"}}}}

The engine answers before it replies, so the request's latency is the assistant's answer time.

Recorded (group `participants` in the profile):
- `user_message`: every question's latency; it fails on a status other than 200, a body other than
  `ok`, no response, or a response after `timeout_after` (60 s). Thresholds use it
  (`p95(participants.user_message) < 5s`).
- counter `timeout`: +1 per timeout: no response at all (connection error, the client's `timeout`)
  or a response slower than `timeout_after` (the seed's `timeout_errors`); counters, not requests,
  so they do not count twice in `error_rate`; `count(participants.timeout) < 50` reads them.
- counter `server_error`: +1 per 5xx response (the seed's `server_errors`).
- counters `conversation_messages.<C>` and `conversation_errors.<C>`, and a datapoint per question
  (entity `conversation-<C>`: latency, status, timeout, server error): the per-conversation view.

Think time: the group's `think_time` applies (the harness's own pause between iterations, which also
lets a ramp-down stop a thinking user at once). The seed's README documents 1–3 min, so `llm-event`
sets `{type: uniform, min: 60s, max: 180s}`. The seed script actually sleeps `60 + random()·180`
s, i.e. uniform 60–240 s (mean 150 s); reproduce it with `--set groups.participants.think_time.max=240s`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import Field

from harness.durations import Duration
from harness.simulator import Simulator, User
from simulators.http.client import FastClient
from simulators.llm_engine.event import DATA, EventOptions, iso_now, prepare_event, read_lines, webhook_url


class ParticipantOptions(EventOptions):
    """Options of the `llm-participant` simulator."""

    questions: str | None = None
    """A question file, one question a line (default: the seed's six generic questions)."""
    timeout_after: Duration = Field(default=60.0, gt=0)
    """A response slower than this counts as a timeout (the seed's 60 000 ms)."""


class ParticipantSimulator(Simulator):
    """Event participants asking the assistant questions as Zoom chat messages to the bot."""

    name = "llm-participant"
    description = "LLM Engine event: participants ask the event assistant questions via the Recall webhook"
    Options = ParticipantOptions

    @classmethod
    def prepare_run(
        cls, options: ParticipantOptions, targets: dict[str, str], run_id: str, log: logging.Logger
    ) -> Any:
        return prepare_event(options, targets, run_id, log, find=True)

    async def setup(self) -> None:
        opts: ParticipantOptions = self.options
        self.questions = read_lines(opts.questions or DATA / "questions.txt")
        if not self.questions:
            raise ValueError("the question bank is empty")
        prepared = self.ctx.prepared or prepare_event(
            opts, self.ctx.targets, self.ctx.run_id, self.log, find=True
        )
        self.api: str = prepared["api"]
        self.conversations: list[str] = prepared["conversations"]
        self.client = FastClient(connections=opts.connections, timeout=opts.timeout)

    async def teardown(self) -> None:
        await self.client.close()

    async def start_user(self, user: User) -> None:
        index = self.ctx.global_user(user)
        conversation = self.conversations[index % len(self.conversations)]
        user.data = {
            "conversation": conversation,
            "name": f"user{index + 1}",
            "url": webhook_url(self.api, self.options, conversation),
        }

    async def iteration(self, user: User) -> None:
        data = user.data
        assert data is not None
        opts: ParticipantOptions = self.options
        conversation, name = data["conversation"], data["name"]
        question = self.ctx.rng.choice(self.questions)
        body = {
            "event": "participant_events.chat_message",
            "data": {
                "bot": {"id": opts.bot_id},
                "data": {
                    "participant": {"name": name, "id": f"{name}-{int(time.time() * 1000)}"},
                    "data": {"text": question, "timestamp": iso_now(), "to": "only_bot"},
                },
            },
        }
        payload = json.dumps(body).encode()
        start = time.perf_counter()
        status = 0
        error: str | None = None
        reply = b""
        try:
            response = await self.client.request(
                "POST", data["url"], {"Content-Type": "application/json"}, payload
            )
            status, reply = response.status, response.body
        except Exception as exc:  # no response at all
            error = f"{type(exc).__name__}: {exc}"
        latency = time.perf_counter() - start
        timed_out = status == 0 or latency > opts.timeout_after
        server_error = status >= 500
        if error is None:
            if status != 200:
                error = f"HTTP {status}"
            elif reply != b"ok":
                error = "body is not 'ok'"
            elif timed_out:
                error = f"slower than {opts.timeout_after:g}s"
        metrics = self.metrics
        metrics.request("user_message", latency, kind="http", ok=error is None, error=error)
        if timed_out:
            metrics.counter("timeout")
        if server_error:
            metrics.counter("server_error")
        metrics.counter(f"conversation_messages.{conversation}")
        if timed_out or server_error:
            metrics.counter(f"conversation_errors.{conversation}")
        metrics.datapoint(
            f"conversation-{conversation}",
            {
                "user": name,
                "latency_ms": round(latency * 1000, 3),
                "status": status,
                "timeout": timed_out,
                "server_error": server_error,
            },
        )
