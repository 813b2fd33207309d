"""Conversation files: export a Genie space's real conversations to YAML, and load them for replay.

The layout is the seed's (`export-conversations`, `seed-systems.md` §2.1), so files exported by the
original tool replay here unchanged:

    space_id: 01ef...
    exported_at: '2026-11-22T10:00:00+00:00'
    total_conversations: 2
    total_messages: 5
    filter: {from_timestamp: 1763200000000, from_timestamp_iso: ..., to_timestamp: ..., to_timestamp_iso: ...}
    conversations:
      - id: 01f0...
        title: Sales by region
        created_timestamp: 1763210000000
        messages:
          - {content: What were total sales by region?, timestamp: 1763210000000, message_id: 01f1...}

Export pages through `list_conversations` (100 a page) and each conversation's
`list_conversation_messages`, keeps messages with content in time order, drops conversations left
empty, and filters on `created_timestamp` (`--from/--to`: `7d`, `24h`, `30m`, `1w`, an ISO 8601 time
or a date).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.errors import UsageError

PAGE_SIZE = 100
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([wdhm])\s*$", re.IGNORECASE)
_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes"}


class Message(BaseModel):
    """One question asked in a conversation."""

    model_config = ConfigDict(extra="ignore")
    content: str = Field(min_length=1)
    timestamp: int | None = None
    message_id: str | None = None


class Conversation(BaseModel):
    """One exported conversation: its questions in the order they were asked."""

    model_config = ConfigDict(extra="ignore")
    id: str
    title: str | None = None
    created_timestamp: int | None = None
    messages: list[Message] = Field(min_length=1)


class ConversationsFile(BaseModel):
    """A whole export."""

    model_config = ConfigDict(extra="ignore")
    space_id: str | None = None
    exported_at: str | None = None
    total_conversations: int | None = None
    total_messages: int | None = None
    filter: dict[str, Any] | None = None
    conversations: list[Conversation] = Field(min_length=1)


def parse_when(value: str, now: datetime | None = None) -> int:
    """A `--from/--to` value as epoch milliseconds: `7d`/`24h`/`30m`/`1w` ago, ISO 8601, or a date."""
    now = now or datetime.now(UTC)
    text = value.strip()
    match = _RELATIVE.match(text)
    if match:
        delta = timedelta(**{_UNITS[match.group(2).lower()]: float(match.group(1))})
        return int((now - delta).timestamp() * 1000)
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            moment = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a time: use 7d, 24h, 30m, 1w, an ISO 8601 time or a date (2026-11-01)"
        ) from None
    return int(moment.timestamp() * 1000)


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _pages(fetch: Callable[[str | None], Any], items: str) -> Iterator[Any]:
    token: str | None = None
    while True:
        page = fetch(token)
        yield from getattr(page, items, None) or []
        token = getattr(page, "next_page_token", None)
        if not token:
            return


def export_conversations(
    client: Any,
    space_id: str,
    *,
    include_all: bool = False,
    from_ms: int | None = None,
    to_ms: int | None = None,
    max_conversations: int | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Export a space's conversations as the seed's YAML document (a dict), through the SDK.

    `on_progress(listed, exported, messages)` is called after each conversation. SDK errors (401, 403,
    404, unreachable host) propagate; the CLI turns them into one-line messages.
    """
    genie = client.genie
    conversations: list[dict[str, Any]] = []
    listed = messages_total = 0
    summaries = _pages(
        lambda token: genie.list_conversations(
            space_id, include_all=include_all, page_size=PAGE_SIZE, page_token=token
        ),
        "conversations",
    )
    for summary in summaries:
        if max_conversations is not None and len(conversations) >= max_conversations:
            break
        listed += 1
        created = summary.created_timestamp
        if created is not None and (
            (from_ms is not None and created < from_ms) or (to_ms is not None and created > to_ms)
        ):
            continue
        conversation_id = summary.conversation_id
        kept = []

        def messages_page(token: str | None, cid: str = conversation_id) -> Any:
            return genie.list_conversation_messages(space_id, cid, page_size=PAGE_SIZE, page_token=token)

        for message in _pages(messages_page, "messages"):
            content = (message.content or "").strip()
            if content:
                kept.append(
                    {
                        "content": content,
                        "timestamp": message.created_timestamp,
                        "message_id": message.message_id or message.id,
                    }
                )
        kept.sort(key=lambda m: m["timestamp"] or 0)
        if kept:
            conversations.append(
                {
                    "id": conversation_id,
                    "title": summary.title,
                    "created_timestamp": created,
                    "messages": kept,
                }
            )
            messages_total += len(kept)
        if on_progress is not None:
            on_progress(listed, len(conversations), messages_total)
    document: dict[str, Any] = {
        "space_id": space_id,
        "exported_at": datetime.now(UTC).isoformat(),
        "total_conversations": len(conversations),
        "total_messages": messages_total,
    }
    if from_ms is not None or to_ms is not None:
        document["filter"] = {
            "from_timestamp": from_ms,
            "from_timestamp_iso": _iso_ms(from_ms) if from_ms is not None else None,
            "to_timestamp": to_ms,
            "to_timestamp_iso": _iso_ms(to_ms) if to_ms is not None else None,
        }
    document["conversations"] = conversations
    return document


def explain_error(exc: BaseException, host: str | None, space_id: str, include_all: bool = False) -> str:
    """One line saying why talking to a space failed, and what to do about it."""
    from databricks.sdk import errors

    where = f"space {space_id} on {host or 'the configured workspace'}"
    if isinstance(exc, errors.Unauthenticated):
        return f"{where}: 401 unauthenticated: check DATABRICKS_TOKEN or the .databrickscfg profile"
    if isinstance(exc, errors.PermissionDenied):
        hint = " (--include-all needs CAN MANAGE on the space)" if include_all else ""
        return f"{where}: 403 permission denied: the token's user cannot read this space{hint}"
    if isinstance(exc, errors.NotFound):
        return f"{where}: 404 not found: check --space-id (the ID in the space's URL)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{where}: {type(exc).__name__}{': ' + first if first else ''}"


def write_conversations(document: dict[str, Any], path: Path) -> None:
    """Write an export as YAML (unicode kept, keys in the seed's order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8"
    )


def load_conversations(path: str | Path) -> ConversationsFile:
    """Read a conversations file; UsageError naming the file and the field on bad input."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"{path}: no such conversations file (write one with `harness genie export`)"
        ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: cannot read conversations: {str(exc).splitlines()[0]}") from None
    return parse_conversations(raw, str(path))


def parse_conversations(raw: Any, source: str) -> ConversationsFile:
    """Validate an export already parsed from YAML; UsageError naming `source` and the field."""
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: expected a mapping with a `conversations` list")
    if isinstance(raw.get("conversations"), list):
        # Messages without content are dropped, as the exporter does; a conversation left empty fails.
        for conversation in raw["conversations"]:
            if isinstance(conversation, dict) and isinstance(conversation.get("messages"), list):
                conversation["messages"] = [
                    m
                    for m in conversation["messages"]
                    if not (isinstance(m, dict) and not str(m.get("content") or "").strip())
                ]
    try:
        return ConversationsFile.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
        raise UsageError(f"{source}: {where or 'file'}: {error['msg']}") from None


def sample_conversations(
    conversations: list[Conversation], size: int | None, seed: int | None
) -> list[Conversation]:
    """The seed's `random.Random(seed).sample(conversations, size)`; all of them without a size."""
    if size is None or size >= len(conversations):
        return list(conversations)
    return random.Random(seed).sample(conversations, size)
