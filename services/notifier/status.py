"""The pipeline's state as the dashboard shows it (`/api/status`).

The feed's part comes from the ingestor's status hash (`Streams.feed_status_key()`, read as a
`FeedReport`, shared/feed_status.py), which expires when no ingestor refreshes it: no hash means
no ingestor running. When the ingestor runs several sources, `sources` gives each one's state.
Ages are computed here, with this host's clock, so a browser's clock does not
matter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from shared.feed_status import FeedReport

log = logging.getLogger(__name__)


def describe_feed(fields: Mapping[bytes, bytes], now: float) -> dict[str, Any] | None:
    """The feed's state from the raw hash fields; None when there is no hash."""
    if not fields:
        return None
    feed = FeedReport.from_fields(fields)
    if feed.unreadable:
        # Another ingestor version, or a damaged hash: shown as not reported, not an error.
        log.debug("feed_status_unreadable", extra={"fields": list(feed.unreadable)})
    return {
        "source": feed.source,
        "state": feed.state,
        "connected": feed.connected,
        "wallets": feed.wallets,
        "subscriptions": feed.subscriptions,
        "last_event_age_s": _age(now, feed.last_event_at),
        "last_exchange_ts": feed.last_exchange_ts,
        "reconnects": feed.reconnects,
        "published": feed.published,
        "duplicates": feed.duplicates,
        "last_error": feed.last_error,
        "status_age_s": _age(now, feed.updated_at),
        "sources": [
            {
                "source": name,
                "state": part.state,
                "connected": part.connected,
                "last_event_age_s": _age(now, part.last_event_at),
            }
            for name, part in sorted(feed.sources.items())
        ],
    }


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 3)
