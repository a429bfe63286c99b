"""The replay tape: Polymarket Data-API trades mapped to Dome orders, played oldest first, looped.

Mapping (feeds.md): proxyWallet->user (lower-cased), asset->token_id, conditionId->condition_id,
size->shares_normalized (and shares = round(size * 1e6)), slug->market_slug,
outcome->token_label, transactionHash->tx_hash, title->title, side and price as they are.
`order_hash`, `taker`, and at emission `block_number`/`log_index`, are synthesized (see `trades`).

Looping: pass `n` (from 0) replays the same trades with tx hashes derived from the original hash
and `n` (pass 0 keeps the real ones), and order hashes derived from those, so a consumer that
dedupes by tx hash or order key sees each pass as new trades.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from services.simulator.trades import (
    Quirks,
    TradeTemplate,
    raw_shares,
    sha256_hex,
    synthetic_order_hash,
    twin_of,
)

# (offset in real seconds from the start of the clock, the trade, the pass it belongs to)
Scheduled = tuple[float, TradeTemplate, int]

_REQUIRED = (
    "proxyWallet",
    "side",
    "asset",
    "conditionId",
    "size",
    "price",
    "timestamp",
    "transactionHash",
)


class TapeError(ValueError):
    pass


def _number(item: Mapping[str, Any], name: str) -> float:
    value = item[name]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TapeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _text(item: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = item.get(name, default)
    if not isinstance(value, str):
        raise TapeError(f"{name} must be a string, got {type(value).__name__}")
    return value


def from_data_api(item: Mapping[str, Any]) -> TradeTemplate:
    """Map one Data-API `/trades` item to a Dome order template (raises TapeError if unusable)."""
    missing = [name for name in _REQUIRED if name not in item]
    if missing:
        raise TapeError(f"missing field(s) {missing}")
    size, price = _number(item, "size"), _number(item, "price")
    if size <= 0 or not 0 <= price <= 1:
        raise TapeError(f"size must be > 0 and price in 0..1, got size={size} price={price}")
    side = _text(item, "side").upper()
    if side not in ("BUY", "SELL"):
        raise TapeError(f"side must be BUY or SELL, got {side!r}")
    timestamp = item["timestamp"]
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise TapeError("timestamp must be an integer")
    user, token_id = _text(item, "proxyWallet").lower(), _text(item, "asset")
    tx_hash, shares = _text(item, "transactionHash"), raw_shares(size)
    return TradeTemplate(
        token_id=token_id,
        token_label=_text(item, "outcome", ""),
        side=side,
        market_slug=_text(item, "slug", ""),
        condition_id=_text(item, "conditionId"),
        shares=shares,
        shares_normalized=shares / 1_000_000,
        price=price,
        tx_hash=tx_hash,
        title=_text(item, "title", ""),
        order_hash=synthetic_order_hash(tx_hash, user, token_id, side, shares),
        user=user,
        tape_ts=timestamp,
    )


def for_pass(template: TradeTemplate, n: int) -> TradeTemplate:
    """The template replayed in pass `n`: after pass 0, fresh deterministic tx and order hashes."""
    if n == 0:
        return template
    tx_hash = sha256_hex(f"{template.tx_hash}|pass|{n}")
    order_hash = synthetic_order_hash(
        tx_hash, template.user, template.token_id, template.side, template.shares
    )
    return replace(template, tx_hash=tx_hash, order_hash=order_hash)


def load_tape(path: Path) -> list[TradeTemplate]:
    """Read a Data-API dump (a JSON list, any order) and return its trades oldest first."""
    try:
        items = orjson.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise TapeError(f"tape not found: {path}") from exc
    except orjson.JSONDecodeError as exc:
        raise TapeError(f"tape {path} is not JSON: {exc}") from exc
    if not isinstance(items, list) or not items:
        raise TapeError(f"tape {path} must be a non-empty JSON list of trades")
    templates = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise TapeError(f"tape {path} item {index} is not an object")
        try:
            templates.append(from_data_api(item))
        except TapeError as exc:
            raise TapeError(f"tape {path} item {index}: {exc}") from exc
    # The Data API lists newest first: reversing first keeps same-second trades in their real order.
    templates.reverse()
    templates.sort(key=lambda t: t.tape_ts)
    return templates


def tape_schedule(
    templates: Sequence[TradeTemplate], speed: float, loop: bool
) -> Iterator[Scheduled]:
    """When each trade is due, in real seconds from the start: tape time divided by `speed`.

    A pass lasts the tape's span plus one tape second, so the next pass starts just after it.
    """
    if not templates:
        return
    first = templates[0].tape_ts
    pass_length = (templates[-1].tape_ts - first + 1) / speed
    n = 0
    while True:
        base = n * pass_length
        for template in templates:
            yield base + (template.tape_ts - first) / speed, for_pass(template, n), n
        if not loop:
            return
        n += 1


def with_quirks(schedule: Iterator[Scheduled], quirks: Quirks) -> Iterator[Scheduled]:
    """The schedule (tape or synthetic) with the quirks on in `quirks` at the time each trade is
    due: a trade stamped oddly, or followed at the same moment by its twin."""
    for count, (offset, template, n) in enumerate(schedule, start=1):
        yield offset, quirks.stamp(template, count), n
        if quirks.twinned(count):
            yield offset, twin_of(template), n
