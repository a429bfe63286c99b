"""Polymarket's Gamma API `/markets?clob_token_ids=<id>` for the markets of the tape, in Gamma's own
shape: `conditionId`, `slug`, `question`, `negRisk`, `closed`, and `outcomes` / `clobTokenIds` as
JSON text inside the JSON (that is how Gamma sends them), outcomes in the order of the token ids.
Asked with `include_tag=true`, each market also carries `tags` (`{"id", "label", "slug"}`), from a
tags file (`SIM_TAGS`, see `load_tags`), as Gamma tags its markets.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from services.simulator.tape import TapeError
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


TagBook = dict[str, list[dict[str, str]]]


def load_tags(path: Path) -> TagBook:
    """Market slug -> its Gamma tags, from a tags file (`SIM_TAGS`; data/nobel2025_tags.json):
    `{"every_market": [tag, ...], "markets": {slug: [tag, ...]}}`, a tag `{"id", "label",
    "slug"}`. The key `""` holds the tags of every market."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise TapeError(f"tags file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise TapeError(f"tags file {path}: needs an object")
    book: TagBook = {"": _tag_list(path, data.get("every_market", []))}
    markets = data.get("markets", {})
    if not isinstance(markets, dict):
        raise TapeError(f"tags file {path}: 'markets' must map slugs to tag lists")
    for slug, tags in markets.items():
        book[str(slug)] = _tag_list(path, tags)
    return book


def _tag_list(path: Path, tags: Any) -> list[dict[str, str]]:
    if not isinstance(tags, list) or not all(
        isinstance(t, dict) and all(isinstance(t.get(k), str) for k in ("id", "label", "slug"))
        for t in tags
    ):
        raise TapeError(f"tags file {path}: a tag list must hold {{id, label, slug}} strings")
    return [{"id": t["id"], "label": t["label"], "slug": t["slug"]} for t in tags]


def with_tags(market: dict[str, Any], book: TagBook) -> dict[str, Any]:
    """The market as Gamma answers `include_tag=true`: with its `tags` list."""
    return {**market, "tags": book.get("", []) + book.get(market.get("slug", ""), [])}
