"""What the speaker and participant simulators share: options, data files and the run's set-up step.

The set-up step (`prepare_event`) follows the seed's k6 `setup()` (`seed-systems.md` §1.1) against
`{api}` = the target's base URL + `api_prefix` (`/v1`):

1. `GET {api}/auth/newPseudonym` -> `{token, pseudonym}`
2. `POST {api}/auth/register`, form-encoded `token, pseudonym, username, password` -> 201; on 409
   (the user exists) `POST {api}/auth/login` with JSON `{username, password}` -> 200
3. `POST {api}/topics` (JSON, Bearer; 201) and `POST {api}/conversations` for each conversation
   (JSON, Bearer; 201) with the seed's body and a meeting URL unique to the run:
   `http://fakezoom.com/loadtest-<run_id>-<ms>-<i>-<rand>`.

Participants follow `eventAssistantLoad.js` instead: `GET newPseudonym`, `POST /auth/login` (JSON,
with the pseudonym's token as Bearer, as the seed does; 401 -> register as above), then
`GET {api}/conversations/userConversations` and keep the first N whose zoom `meetingUrl` carries
this run's id; any missing are created as in 3. Groups are prepared in profile order, so the
speaker group creates the run's conversations and the participant group finds the same ones, and
two runs never share conversations (the seed needed an empty database for this).
With `conversation_ids` given, nothing is created: those conversations are used as they are.
"""

from __future__ import annotations

import logging
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import requests
from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.durations import Duration

DATA = Path(__file__).resolve().parent / "data"
BOT_ID = "loadtest"
"""The seed's bot id: the engine skips sending the assistant's replies back to Recall for it."""


class EventOptions(BaseModel):
    """Options shared by `llm-speaker` and `llm-participant`."""

    model_config = ConfigDict(extra="forbid")
    target: str | None = None
    """Name of a profile target (default: the only target)."""
    base_url: str | None = None
    """An explicit base URL instead of a target (http://127.0.0.1:3000)."""
    api_prefix: str = "/v1"
    """Joined to the base URL: the seed's `API_BASE` is `http://host:3000/v1`."""
    conversations: int = Field(default=25, ge=1)
    """How many conversations the event has (the seed hard-codes 25)."""
    conversation_ids: list[str] | None = None
    """Use these existing conversations instead of creating them (their bot id must be `bot_id`)."""
    username: str = "loadtest"
    password: str = "loadtest-password"
    webhook_token: str = "recall-token"
    """The Recall webhook's `token` query parameter (the seed's `RECALL_WEBHOOK_TOKEN`)."""
    bot_id: str = BOT_ID
    topic_name: str = "Load Test Topic"
    conversation_name: str = "Where are all the aliens?"
    timeout: Duration = Field(default=60.0, gt=0)
    """Total time allowed for one webhook request (k6's default timeout is 60 s)."""
    connections: int = Field(default=1000, ge=1)
    """Pooled keep-alive connections per worker."""

    @model_validator(mode="after")
    def _ids(self) -> EventOptions:
        if self.conversation_ids is not None and not self.conversation_ids:
            raise ValueError("conversation_ids must not be empty")
        return self


def api_base(options: EventOptions, targets: dict[str, str]) -> str:
    """The API base URL (`http://host:port/v1`)."""
    if options.base_url:
        base = options.base_url
    elif options.target is not None:
        if options.target not in targets:
            raise ValueError(f"no target named {options.target!r}; have {sorted(targets)}")
        base = targets[options.target]
    elif len(targets) == 1:
        base = next(iter(targets.values()))
    else:
        raise ValueError(f"name the target to use (option 'target'), one of {sorted(targets)}")
    return base.rstrip("/") + "/" + options.api_prefix.strip("/") if options.api_prefix.strip("/") else base


def read_lines(path: str | Path) -> list[str]:
    """A data file's non-empty lines."""
    text = Path(path).expanduser().read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def conversation_body(options: EventOptions, topic_id: str, meeting_url: str) -> dict[str, Any]:
    """The seed's `POST /conversations` body."""
    return {
        "name": options.conversation_name,
        "topicId": topic_id,
        "agentTypes": [{"name": "eventAssistant"}],
        "channels": [{"name": "transcript"}],
        "enableDMs": ["agents"],
        "adapters": [
            {
                "type": "zoom",
                "config": {"meetingUrl": meeting_url, "botName": "Load Tester", "botId": options.bot_id},
                "dmChannels": [{"direct": True, "agent": "eventAssistant", "direction": "both"}],
                "audioChannels": [{"name": "transcript"}],
            }
        ],
    }


def topic_body(options: EventOptions) -> dict[str, Any]:
    """The seed's `POST /topics` body."""
    return {
        "name": options.topic_name,
        "votingAllowed": True,
        "conversationCreationAllowed": True,
        "private": False,
        "archivable": True,
    }


def _expect(response: requests.Response, status: int, what: str) -> Any:
    if response.status_code != status:
        raise RuntimeError(f"{what}: HTTP {response.status_code} (expected {status}): {response.text[:200]}")
    return response.json()


def _run_marker(run_id: str) -> str:
    return f"/loadtest-{run_id}-"


def _of_run(conversation: dict[str, Any], marker: str) -> bool:
    adapters = conversation.get("adapters") or []
    return any(marker in str((a.get("config") or {}).get("meetingUrl", "")) for a in adapters)


def _register_or_login(http: requests.Session, api: str, options: EventOptions, find: bool) -> Any:
    """The seed's log-in: a pseudonym, then register (speaker) or log in (participants)."""
    timeout = 30.0
    pseudo = _expect(http.get(f"{api}/auth/newPseudonym", timeout=timeout), 200, "newPseudonym")
    login = {"username": options.username, "password": options.password}
    if find:
        # eventAssistantLoad.js: JSON log-in, with the pseudonym's token as a (needless) Bearer.
        response = http.post(
            f"{api}/auth/login",
            json=login,
            headers={"Authorization": f"Bearer {pseudo['token']}"},
            timeout=timeout,
        )
        if response.status_code != 401:
            return _expect(response, 200, "login")
    # transcriptLoad.js: form-encoded register; 409 (the user exists) -> log in.
    form = {"token": pseudo["token"], "pseudonym": pseudo["pseudonym"], **login}
    response = http.post(f"{api}/auth/register", data=form, timeout=timeout)
    if response.status_code == 409:
        return _expect(http.post(f"{api}/auth/login", json=login, timeout=timeout), 200, "login")
    return _expect(response, 201, "register")


def prepare_event(
    options: EventOptions, targets: dict[str, str], run_id: str, log: logging.Logger, find: bool = False
) -> Any:
    """The run's conversations (see the module docstring): `{"api": ..., "conversations": [ids]}`.

    `find=False` (speakers, as transcriptLoad.js): log in, create the topic and the conversations.
    `find=True` (participants, as eventAssistantLoad.js): log in, list the user's conversations and
    take this run's; any still missing are created as above.
    """
    api = api_base(options, targets)
    if options.conversation_ids is not None:
        return {"api": api, "conversations": list(options.conversation_ids)}
    timeout = 30.0
    with requests.Session() as http:
        auth = _register_or_login(http, api, options, find)
        bearer = {"Authorization": f"Bearer {auth['tokens']['access']['token']}"}
        ids: list[str] = []
        if find:
            listed = _expect(
                http.get(f"{api}/conversations/userConversations", headers=bearer, timeout=timeout),
                200,
                "userConversations",
            )
            marker = _run_marker(run_id)
            ids = [c["id"] for c in listed if _of_run(c, marker)][: options.conversations]
        if len(ids) < options.conversations:
            topic = _expect(
                http.post(f"{api}/topics", json=topic_body(options), headers=bearer, timeout=timeout),
                201,
                "create topic",
            )
            found = len(ids)
            for i in range(found, options.conversations):
                stamp = int(time.time() * 1000)
                url = f"http://fakezoom.com/loadtest-{run_id}-{stamp}-{i}-{secrets.token_hex(4)}"
                body = conversation_body(options, topic["id"], url)
                created = _expect(
                    http.post(f"{api}/conversations", json=body, headers=bearer, timeout=timeout),
                    201,
                    "create conversation",
                )
                ids.append(created["id"])
            log.info("created %d conversations for run %s", options.conversations - found, run_id)
    return {"api": api, "conversations": ids}


def iso_now() -> str:
    """The time now as JavaScript's `toISOString()` writes it (`2026-01-02T03:04:05.678Z`)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def webhook_url(api: str, options: EventOptions, conversation_id: str) -> str:
    """`{api}/webhooks/recall?token=…&conversationId=…`."""
    query = urlencode({"token": options.webhook_token, "conversationId": conversation_id})
    return f"{api}/webhooks/recall?{query}"
