"""Progress for people: durations as text (and the one fold of events into a status; see below)."""

from __future__ import annotations

import math
from typing import Optional


def format_duration(seconds: Optional[float]) -> str:
    """``3h 05m``, ``12m 03s`` or ``45s``; empty for unknown or negative."""
    if seconds is None:
        return ""
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(seconds) or seconds < 0:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
