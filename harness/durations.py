"""Parse human durations (`90`, `1.5s`, `250ms`, `2m`, `1h30m`) into seconds."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|us|s|m|h|d)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number (seconds) or a string such as `250ms`, `2m`, `1h30m`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 2m or 250ms")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            seconds = float("inf")
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _PART.finditer(text):
                if match.start() != pos and text[pos : match.start()].strip():
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos == 0 or text[pos:].strip():
                raise ValueError(f"expected a duration such as 30s, 2m or 250ms, got {value!r}") from None
    else:
        raise ValueError(f"expected a duration such as 30s, 2m or 250ms, got {type(value).__name__}")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"a duration must be a finite number >= 0, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """A short human form: `950ms`, `42s`, `3m05s`, `1h02m`."""
    if seconds < 0.9995:  # not 1000ms
        return f"{seconds * 1000:.0f}ms"
    if seconds < 59.95:  # not 60.0s
        return f"{seconds:.0f}s" if seconds == int(seconds) else f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A pydantic field type: seconds, accepting `30s`, `2m`, `250ms` or a number."""
