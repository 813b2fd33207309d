"""`llm-speaker`: one speaker per conversation feeds a live talk's transcript to the Recall webhook.

As the seed's `transcriptLoad.js` (`seed-systems.md` §1.1): speaker k (the group's k-th user, from
`ctx.global_user`) owns conversation k and sends chunk i of the transcript as

    POST {api}/webhooks/recall?token=T&conversationId=C        (Content-Type: application/json)
    {"event": "transcript.data", "data": {"bot": {"id": "loadtest"}, "data": {
        "participant": {"name": "Speaker-C", "id": "Speaker-C-<ms>"},
        "words": [{"text": <chunk>, "end_timestamp": {"absolute": <ISO now>}}]}}}

Each chunk is the request `transcript`, failed unless the status is 200 and the body is `ok` (the
seed's first two checks); its third check, under `max_latency` (1 s), is the counter
`transcript_over_max_latency` (as in k6, a failed check is not a failed request).

Chunks go out on a drift-free schedule: chunk i is due `i * chunk_interval` after the speaker's
first chunk, whatever the latencies (the seed slept 6 s *after* each response, so its talk drifted
by the latencies); there is no wait after the last chunk, and the speaker stops when the transcript
ends. Each chunk also leaves a datapoint (entity `conversation-C`: chunk, due and sent offsets,
latency), which is how a test checks the intervals. Users beyond the number of conversations stop
at once (one speaker per conversation).

Group settings: `users` = the number of conversations, `think_time` none (the schedule is the pacing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from pydantic import Field

from harness.durations import Duration
from harness.simulator import Simulator, StopUser, User
from simulators.http.client import FastClient
from simulators.llm_engine.event import DATA, EventOptions, iso_now, prepare_event, read_lines, webhook_url


class SpeakerOptions(EventOptions):
    """Options of the `llm-speaker` simulator."""

    chunk_interval: Duration = Field(default=6.0, gt=0)
    """Time between two transcript chunks (the seed's `TRANSCRIPT_CHUNK_DELAY`)."""
    transcript: str | None = None
    """A transcript file, one chunk a line (default: our own 150-chunk talk)."""
    max_latency: Duration = Field(default=1.0, gt=0)
    """A chunk slower than this fails its check (the seed's `duration < 1000 ms`)."""


class SpeakerSimulator(Simulator):
    """A speaker per conversation sending the talk's transcript to the Recall webhook, chunk by chunk."""

    name = "llm-speaker"
    description = "LLM Engine event: a speaker per conversation feeds a transcript to the Recall webhook"
    Options = SpeakerOptions

    @classmethod
    def prepare_run(
        cls, options: SpeakerOptions, targets: dict[str, str], run_id: str, log: logging.Logger
    ) -> Any:
        return prepare_event(options, targets, run_id, log)

    async def setup(self) -> None:
        opts: SpeakerOptions = self.options
        self.chunks = read_lines(opts.transcript or DATA / "transcript.txt")
        if not self.chunks:
            raise ValueError("the transcript has no chunks")
        prepared = self.ctx.prepared or prepare_event(opts, self.ctx.targets, self.ctx.run_id, self.log)
        self.api: str = prepared["api"]
        self.conversations: list[str] = prepared["conversations"]
        self.client = FastClient(connections=opts.connections, timeout=opts.timeout)

    async def teardown(self) -> None:
        await self.client.close()

    async def start_user(self, user: User) -> None:
        index = self.ctx.global_user(user)
        if index >= len(self.conversations):
            self.log.warning("speaker %d has no conversation (there are %d)", index, len(self.conversations))
            raise StopUser
        conversation = self.conversations[index]
        loop = asyncio.get_running_loop()
        user.data = {
            "conversation": conversation,
            "url": webhook_url(self.api, self.options, conversation),
            "start": loop.time(),
            "chunk": 0,
        }

    async def iteration(self, user: User) -> None:
        data = user.data
        assert data is not None
        i = data["chunk"]
        if i >= len(self.chunks):
            raise StopUser
        data["chunk"] = i + 1
        opts: SpeakerOptions = self.options
        loop = asyncio.get_running_loop()
        due = data["start"] + i * opts.chunk_interval
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        conversation = data["conversation"]
        name = f"Speaker-{conversation}"
        body = {
            "event": "transcript.data",
            "data": {
                "bot": {"id": opts.bot_id},
                "data": {
                    "participant": {"name": name, "id": f"{name}-{int(time.time() * 1000)}"},
                    "words": [{"text": self.chunks[i], "end_timestamp": {"absolute": iso_now()}}],
                },
            },
        }
        payload = json.dumps(body).encode()
        sent_at = time.time()
        lag = loop.time() - due
        start = time.perf_counter()
        status = 0
        error: str | None = None
        try:
            response = await self.client.request(
                "POST", data["url"], {"Content-Type": "application/json"}, payload
            )
            status = response.status
        except Exception as exc:  # every transport error is one failed chunk
            error = f"{type(exc).__name__}: {exc}"
        latency = time.perf_counter() - start
        if error is None:
            if status != 200:
                error = f"HTTP {status}"
            elif response.body != b"ok":
                error = "body is not 'ok'"
        self.metrics.request(
            "transcript", latency, kind="http", ok=error is None, error=error, bytes_sent=len(payload)
        )
        if latency >= opts.max_latency:
            self.metrics.counter("transcript_over_max_latency")
        self.metrics.datapoint(
            f"conversation-{conversation}",
            {
                "chunk": i,
                "due_offset_s": round(i * opts.chunk_interval, 6),
                "sent_offset_s": round(loop.time() - latency - data["start"], 6),
                "sent_at": sent_at,
                "lag_ms": round(lag * 1000, 3),
                "latency_ms": round(latency * 1000, 3),
                "status": status,
            },
        )
        if i + 1 == len(self.chunks):
            self.metrics.event("talk finished", {"conversation": conversation, "chunks": i + 1})
