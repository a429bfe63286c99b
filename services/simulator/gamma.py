"""Polymarket's Gamma API `/markets?clob_token_ids=<id>` for the markets of the tape, in Gamma's own
shape: `conditionId`, `slug`, `question`, `negRisk`, `closed`, and `outcomes` / `clobTokenIds` as
JSON text inside the JSON (that is how Gamma sends them), outcomes in the order of the token ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from services.simulator.trades import TradeTemplate


def gamma_markets(templates: Iterable[TradeTemplate]) -> dict[str, dict[str, Any]]:
    """Token id -> its market's Gamma object, built from the trades seen on each market."""
    by_condition: dict[str, dict[str, Any]] = {}
    for trade in templates:
        market = by_condition.setdefault(
            trade.condition_id,
            {"slug": trade.market_slug, "question": trade.title, "tokens": {}},
        )
        market["tokens"].setdefault(trade.token_id, trade.token_label)
    index: dict[str, dict[str, Any]] = {}
    for condition_id, market in by_condition.items():
        tokens = sorted(market["tokens"].items(), key=lambda item: item[1] != "Yes")
        body = {
            "conditionId": condition_id,
            "slug": market["slug"],
            "question": market["question"],
            "outcomes": orjson.dumps([label for _, label in tokens]).decode(),
            "clobTokenIds": orjson.dumps([token for token, _ in tokens]).decode(),
            "negRisk": False,
            "closed": False,
        }
        for token, _ in tokens:
            index[token] = body
    return index


def markets_answer(index: dict[str, dict[str, Any]], clob_token_ids: list[str]) -> list[Any]:
    """Gamma's answer: a list of the markets holding any of the ids (empty when none)."""
    found: list[Any] = []
    for token in clob_token_ids:
        market = index.get(token)
        if market is not None and market not in found:
            found.append(market)
    return found
