"""The two dialects of the Dome WebSocket source: the same frames in, different requests out.

- `dome`: `<DOME_WS_URL>/<key>`; subscribe `{"action":"subscribe","platform":"polymarket",
  "version":1,"type":"orders","filters":{"users":[..]}}`; update = subscribe + `subscription_id`;
  unsubscribe `{"action":"unsubscribe","version":1,"subscription_id":..}`.
- `polynode` (Dome's advertised successor): `<DOME_WS_URL>?key=<key>`; subscribe
  `{"action":"subscribe","type":"dome","filters":{"wallets":[..]}}`. polynode documents no update,
  unsubscribe or ack formats: we send the subscribe shape plus `subscription_id` for update,
  `{"action":"unsubscribe","subscription_id":..}`, and expect Dome's acks (the simulator agrees).

Events are read by `frames.parse_frame` for both.
"""

from __future__ import annotations

from typing import Any, Literal

from services.ingestor.subscriptions import Action, Subscribe, Unsubscribe, Update

DialectName = Literal["dome", "polynode"]


def subscribe_message(
    users: tuple[str, ...] | list[str], dialect: DialectName = "dome"
) -> dict[str, Any]:
    """The subscribe request for these wallets' orders (one filter kind per subscription)."""
    if dialect == "polynode":
        return {"action": "subscribe", "type": "dome", "filters": {"wallets": list(users)}}
    return {
        "action": "subscribe",
        "platform": "polymarket",
        "version": 1,
        "type": "orders",
        "filters": {"users": list(users)},
    }


def message(action: Action, dialect: DialectName) -> dict[str, Any]:
    """The request that carries out one registry action."""
    if isinstance(action, Subscribe):
        return subscribe_message(action.wallets, dialect)
    if isinstance(action, Update):
        return {
            **subscribe_message(action.wallets, dialect),
            "action": "update",
            "subscription_id": action.subscription_id,
        }
    if isinstance(action, Unsubscribe):
        if dialect == "polynode":
            return {"action": "unsubscribe", "subscription_id": action.subscription_id}
        return {"action": "unsubscribe", "version": 1, "subscription_id": action.subscription_id}
    raise TypeError(f"not a subscription action: {action!r}")
