"""The dialects of the Dome WebSocket source: the same frames in, different requests out.

- `dome`: `<DOME_WS_URL>/<key>`; subscribe `{"action":"subscribe","platform":"polymarket",
  "version":1,"type":"orders","filters":{"users":[..]}}`; update = subscribe + `subscription_id`;
  unsubscribe `{"action":"unsubscribe","version":1,"subscription_id":..}`.
- `predexon` (Dome's protocol, a paid successor): `wss://wss.predexon.com/v1/<key>`; Dome's
  messages byte for byte, plus `"status":"all"` in the filters when pending (pre-block) events
  are wanted (PREDEXON_STATUS_ALL).
- `polynode` (Dome's advertised successor): `<DOME_WS_URL>?key=<key>`; subscribe
  `{"action":"subscribe","type":"dome","filters":{"wallets":[..]}}`, with `since` asking the
  server to replay the last POLYNODE_SINCE_S seconds: a first gap backfill on every (re)connect.
  feeds.md gives `since` as a replay window ("30 s on the free plan, up to 5 min on paid ones"):
  we send that number of seconds, at most the plan's window, so a server that checks it against
  the plan has nothing to refuse; `"status":"all"` (POLYNODE_STATUS_ALL) asks for pending events
  too. polynode documents no update or unsubscribe formats: we send
  the subscribe shape plus `subscription_id` for update and `{"action":"unsubscribe",
  "subscription_id":..}`.

Every dialect's frames are read by `frames.parse_frame`; fills carry the dialect's `Source`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from services.ingestor.subscriptions import Action, Subscribe, Unsubscribe, Update
from shared.models import Source

DialectName = Literal["dome", "polynode", "predexon"]
SOURCES: dict[str, Source] = {
    "dome": Source.DOME_WS,
    "polynode": Source.POLYNODE,
    "predexon": Source.PREDEXON,
}


@dataclass(frozen=True, slots=True)
class Dialect:
    """One dialect with its options: pending events too (PREDEXON_STATUS_ALL or
    POLYNODE_STATUS_ALL), polynode's replay (POLYNODE_SINCE_S)."""

    name: DialectName = "dome"
    status_all: bool = False
    since_s: float = 0.0

    @property
    def source(self) -> Source:
        return SOURCES[self.name]


def _dialect(dialect: Dialect | DialectName) -> Dialect:
    return dialect if isinstance(dialect, Dialect) else Dialect(dialect)


def subscribe_message(
    users: tuple[str, ...] | list[str],
    dialect: Dialect | DialectName = "dome",
    *,
    replay: bool = True,
) -> dict[str, Any]:
    """The subscribe request for these wallets' orders (one filter kind per subscription);
    `replay`: polynode's `since` when the dialect asks for one."""
    spoken = _dialect(dialect)
    if spoken.name == "polynode":
        filters: dict[str, Any] = {"wallets": list(users)}
        if spoken.status_all:
            filters["status"] = "all"
        if replay and spoken.since_s > 0:
            filters["since"] = int(spoken.since_s)
        return {"action": "subscribe", "type": "dome", "filters": filters}
    filters = {"users": list(users)}
    if spoken.name == "predexon" and spoken.status_all:
        filters["status"] = "all"
    return {
        "action": "subscribe",
        "platform": "polymarket",
        "version": 1,
        "type": "orders",
        "filters": filters,
    }


def message(action: Action, dialect: Dialect | DialectName) -> dict[str, Any]:
    """The request that carries out one registry action."""
    spoken = _dialect(dialect)
    if isinstance(action, Subscribe):
        return subscribe_message(action.wallets, spoken)
    if isinstance(action, Update):
        # No replay on an update: the subscription's other wallets were never away.
        return {
            **subscribe_message(action.wallets, spoken, replay=False),
            "action": "update",
            "subscription_id": action.subscription_id,
        }
    if isinstance(action, Unsubscribe):
        if spoken.name == "polynode":
            return {"action": "unsubscribe", "subscription_id": action.subscription_id}
        return {"action": "unsubscribe", "version": 1, "subscription_id": action.subscription_id}
    raise TypeError(f"not a subscription action: {action!r}")
