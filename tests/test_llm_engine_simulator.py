"""The LLM Engine event family's set-up step against the real `llm_engine` target, and the
`llm-event` profile through the CLI. (Each simulator has its own file too:
`test_llm-speaker_simulator.py`, `test_llm-participant_simulator.py`, `test_llm-chat_simulator.py`.)"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from simulators.llm_engine import ParticipantOptions, SpeakerOptions
from simulators.llm_engine.event import prepare_event
from tests.clitools import harness
from tests.llmtools import Seen, engine

LOG = logging.getLogger("test")


def prepare(url: str, run_id: str, find: bool = False, **options: Any) -> Any:
    model = ParticipantOptions if find else SpeakerOptions
    opts = model.model_validate({"target": "llm", **options})
    return prepare_event(opts, {"llm": url}, run_id, LOG, find=find)


def test_speaker_setup_sequence_and_bodies() -> None:
    async def main() -> tuple[Any, list[Seen]]:
        async with engine() as (url, seen):
            prepared = await asyncio.to_thread(prepare, url, "run-a", conversations=3)
            assert prepared["api"] == f"{url}/v1"
            return prepared, list(seen)

    prepared, seen = asyncio.run(main())
    assert [(s.method, s.path) for s in seen] == [
        ("GET", "/v1/auth/newPseudonym"),
        ("POST", "/v1/auth/register"),
        ("POST", "/v1/topics"),
        ("POST", "/v1/conversations"),
        ("POST", "/v1/conversations"),
        ("POST", "/v1/conversations"),
    ]
    register = seen[1]
    assert register.content_type == "application/x-www-form-urlencoded"
    assert set(register.form) == {"token", "pseudonym", "username", "password"}
    assert register.form["username"] == "loadtest"
    token = seen[3].headers["Authorization"]
    assert token.startswith("Bearer ") and all(s.headers["Authorization"] == token for s in seen[2:])
    assert seen[2].json == {
        "name": "Load Test Topic",
        "votingAllowed": True,
        "conversationCreationAllowed": True,
        "private": False,
        "archivable": True,
    }
    urls = []
    for s in seen[3:]:
        body = s.json
        adapter = body["adapters"][0]
        urls.append(adapter["config"].pop("meetingUrl"))
        assert body == {
            "name": "Where are all the aliens?",
            "topicId": body["topicId"],
            "agentTypes": [{"name": "eventAssistant"}],
            "channels": [{"name": "transcript"}],
            "enableDMs": ["agents"],
            "adapters": [
                {
                    "type": "zoom",
                    "config": {"botName": "Load Tester", "botId": "loadtest"},
                    "dmChannels": [{"direct": True, "agent": "eventAssistant", "direction": "both"}],
                    "audioChannels": [{"name": "transcript"}],
                }
            ],
        }
    assert len(set(urls)) == 3 and all(u.startswith("http://fakezoom.com/loadtest-run-a-") for u in urls)
    assert len(prepared["conversations"]) == 3


def test_participants_find_their_runs_conversations() -> None:
    async def main() -> None:
        async with engine() as (url, seen):
            a = await asyncio.to_thread(prepare, url, "run-a", conversations=2)
            b = await asyncio.to_thread(prepare, url, "run-b", conversations=2)  # 409 -> log in
            assert set(a["conversations"]).isdisjoint(b["conversations"])
            del seen[:]
            found = await asyncio.to_thread(prepare, url, "run-b", True, conversations=2)
            assert found["conversations"] == b["conversations"]
            assert [(s.method, s.path) for s in seen] == [
                ("GET", "/v1/auth/newPseudonym"),
                ("POST", "/v1/auth/login"),
                ("GET", "/v1/conversations/userConversations"),
            ]
            assert seen[1].json == {"username": "loadtest", "password": "loadtest-password"}
            # Participants alone (a run without speakers) create what is missing.
            alone = await asyncio.to_thread(prepare, url, "run-c", True, conversations=2)
            assert len(alone["conversations"]) == 2
            assert set(alone["conversations"]).isdisjoint(a["conversations"] + b["conversations"])
            # Given ids are used as they are, with no request.
            del seen[:]
            ids = await asyncio.to_thread(prepare, url, "run-d", conversation_ids=["x", "y"])
            assert ids["conversations"] == ["x", "y"] and not seen

    asyncio.run(main())


@pytest.mark.slow
def test_llm_event_profile_short_run(tmp_path: Path) -> None:
    db, report = tmp_path / "h.db", tmp_path / "report"
    proc = harness(
        "start",
        "--profile",
        "llm-event",
        "--headless",
        "--quiet",
        "--db",
        str(db),
        "--report-dir",
        str(report),
        "--set",
        "duration=20s",
        "--set",
        "stop_grace=5s",
        "--set",
        "groups.speakers.users=2",
        "--set",
        "groups.speakers.options.conversations=2",
        "--set",
        "groups.participants.options.conversations=2",
        "--set",
        "groups.speakers.options.chunk_interval=1s",
        "--set",
        "groups.participants.start_delay=2s",
        "--set",
        "groups.participants.shape.stages=[{duration: 4s, target: 6}, {duration: 10s, target: 6}]",
        "--set",
        "groups.participants.think_time.min=500ms",
        "--set",
        "groups.participants.think_time.max=1s",
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((report / "summary.json").read_text())
    assert summary["status"] == "passed"
    endpoints = {(e["group"], e["name"]): e for e in summary["endpoints"]}
    assert endpoints[("speakers", "transcript")]["requests"] >= 30
    assert endpoints[("participants", "user_message")]["requests"] > 10
    assert endpoints[("speakers", "transcript")]["failures"] == 0
    # The speakers' schedule, from their datapoints: one chunk a second, within 100 ms.
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT entity, values_json FROM datapoint WHERE \"group\" = 'speakers'"
        ).fetchall()
    by_conversation: dict[str, list[float]] = {}
    for entity, values in rows:
        by_conversation.setdefault(entity, []).append(json.loads(values)["sent_offset_s"])
    assert len(by_conversation) == 2
    for offsets in by_conversation.values():
        offsets.sort()
        gaps = [b - a for a, b in itertools.pairwise(offsets)]
        assert len(gaps) >= 14
        assert all(abs(g - 1.0) < 0.1 for g in gaps), gaps
