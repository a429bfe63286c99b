"""Polymarket's Data API trade item -> the order contract: the one mapping, used by the
ingestor's `data_api` source, `betterbot replay-tape` and the detector's replay of a tape.

v1 (`/trades`, tapes) spells fields in camelCase, v2 (`/v2/trades`) in snake_case
(`proxy_wallet`, `condition_id`, `transaction_hash`); both spellings are read.

Mapping (feeds.md): proxyWallet->user, asset->token_id, conditionId->condition_id,
size->shares_normalized (and shares = size x 1e6), slug->market_slug, outcome->token_label,
transactionHash->tx_hash; side (upper-cased), price, timestamp, title as they are. There is no
order_hash or taker, and none is needed: order_key is built from fields every source has, so the
same fill read from Dome and from here gets the same key and is published once.

The simulator reads its tapes with a mapping of its own (`services/simulator/tape.py`): it plays
the world, and a test that compares its ground truth with what the pipeline stored could not fail
on a mapping bug the two sides shared.
"""

from __future__ import annotations

from typing import Any

from shared.models import SHARE_DECIMALS, FeedOrder

_FIELDS = {
    "proxyWallet": "user",
    "asset": "token_id",
    "conditionId": "condition_id",
    "size": "shares_normalized",
    "slug": "market_slug",
    "outcome": "token_label",
    "transactionHash": "tx_hash",
    "side": "side",
    "price": "price",
    "timestamp": "timestamp",
    "title": "title",
}


# v2's spelling of the camelCase names (the others are one word in both).
_SNAKE = {
    "proxyWallet": "proxy_wallet",
    "conditionId": "condition_id",
    "transactionHash": "transaction_hash",
}


def order_from_data_api(item: Any) -> FeedOrder:
    """A Data API trade item (v1 or v2) as an order; raises ValueError (a ValidationError
    included)."""
    if not isinstance(item, dict):
        raise ValueError(f"a trade must be an object, got {type(item).__name__}")
    data: dict[str, Any] = {}
    for theirs, ours in _FIELDS.items():
        value = item.get(theirs)
        if value is None and theirs in _SNAKE:
            value = item.get(_SNAKE[theirs])
        if value is not None:
            data[ours] = value
    size = data.get("shares_normalized")
    if isinstance(size, int | float) and not isinstance(size, bool):
        data["shares"] = round(size * 10**SHARE_DECIMALS)
    if isinstance(data.get("side"), str):
        data["side"] = data["side"].upper()
    return FeedOrder.model_validate(data)
