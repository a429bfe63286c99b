"""The pipeline's state as the dashboard shows it (`/api/status`).

The feed's part comes from the ingestor's status hash (`Streams.feed_status_key()`, see
services/ingestor/feed_status.py), which expires when no ingestor refreshes it: no hash means no
ingestor running. When the ingestor runs several sources, `sources` gives each one's state.
Ages are computed here, with this host's clock, so a browser's clock does not
matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson


def describe_feed(fields: Mapping[bytes, bytes], now: float) -> dict[str, Any] | None:
    """The feed's state from the raw hash fields; None when there is no hash."""
    if not fields:
        return None
    text = {key.decode(): value.decode(errors="replace") for key, value in fields.items()}
    last_event_at = _number(text.get("last_event_at"))
    updated_at = _number(text.get("updated_at"))
    return {
        "source": text.get("source", ""),
        "state": text.get("state", "unknown"),
        "connected": text.get("connected") == "1",
        "wallets": _integer(text.get("wallets")),
        "subscriptions": _integer(text.get("subscriptions")),
        "last_event_age_s": _age(now, last_event_at),
        "last_exchange_ts": _integer(text.get("last_exchange_ts")),
        "reconnects": _integer(text.get("reconnects")),
        "published": _integer(text.get("published")),
        "duplicates": _integer(text.get("duplicates")),
        "last_error": text.get("last_error", ""),
        "status_age_s": _age(now, updated_at),
        "sources": _sources(text.get("sources"), now),
    }


def _sources(raw: str | None, now: float) -> list[dict[str, Any]]:
    """Each source's own state, when the ingestor runs several (`sources`: a JSON object)."""
    try:
        parts = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return []
    if not isinstance(parts, dict):
        return []
    return [
        {
            "source": name,
            "state": str(part.get("state", "unknown")),
            "connected": part.get("connected") == "1",
            "last_event_age_s": _age(now, _number(part.get("last_event_at"))),
        }
        for name, part in sorted(parts.items())
        if isinstance(part, dict)
    ]


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 3)


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _integer(value: str | None) -> int | None:
    number = _number(value)
    return None if number is None else int(number)
