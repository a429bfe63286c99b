"""How the tape's markets resolved, served through the simulator's Gamma `/markets`.

`SIM_RESOLUTION` names a resolution file (the bundled tape's: data/nobel2025_resolution.json):
`{"markets": [{"conditionId": "0x..", "question": "..", "payouts": {"Yes": 1, "No": 0}}]}`. A
market it lists is answered as Gamma shows a resolved one: `closed: true` and `outcomePrices`
holding each outcome's payout as text, in the order of `outcomes` / `clobTokenIds` (JSON text
inside the JSON, as Gamma sends them). Markets it does not list stay open (`closed: false`). Unset,
every market is open, as during the tape.

Lookups: `clob_token_ids` and `condition_ids` (each repeated or comma-separated; a market matching
either is answered once) and `closed` (`true`: closed markets only, `false`: open ones only; unset:
both). Gamma itself leaves closed markets out unless asked with `closed=true`, so a client looking
for resolutions must ask for them that way, and the store's validator does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from services.simulator.tape import TapeError

PAYOUTS = (0, 0.5, 1)


class ResolutionError(TapeError):
    """A resolution file that cannot be read: the simulator does not start."""


def load_resolution(path: Path) -> dict[str, dict[str, float]]:
    """Condition id (lower case) -> payout per outcome label."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ResolutionError(f"resolution file {path}: {exc}") from None
    markets = data.get("markets") if isinstance(data, dict) else None
    if not isinstance(markets, list):
        raise ResolutionError(f"resolution file {path}: needs a list under 'markets'")
    resolution: dict[str, dict[str, float]] = {}
    for index, market in enumerate(markets):
        condition = market.get("conditionId") if isinstance(market, dict) else None
        payouts = market.get("payouts") if isinstance(market, dict) else None
        if not isinstance(condition, str) or not isinstance(payouts, dict):
            raise ResolutionError(
                f"resolution file {path}: market {index} lacks conditionId or payouts"
            )
        if any(value not in PAYOUTS for value in payouts.values()):
            raise ResolutionError(
                f"resolution file {path}: market {index} pays other than 0, 0.5, 1"
            )
        resolution[condition.lower()] = {str(k): float(v) for k, v in payouts.items()}
    return resolution


def with_resolution(
    market: Mapping[str, Any], payouts: Mapping[str, float] | None
) -> dict[str, Any]:
    """The Gamma object of a market, closed with its payouts if it resolved."""
    if payouts is None:
        return dict(market)
    labels = orjson.loads(market["outcomes"])
    prices = [_text(payouts.get(label, 0.0)) for label in labels]
    return {**market, "closed": True, "outcomePrices": orjson.dumps(prices).decode()}


def _text(payout: float) -> str:
    return "0.5" if payout == 0.5 else str(int(payout))


def gamma_answer(
    index: Mapping[str, Mapping[str, Any]],
    resolution: Mapping[str, Mapping[str, float]],
    token_ids: Iterable[str],
    condition_ids: Iterable[str],
    closed: bool | None,
) -> list[dict[str, Any]]:
    """Gamma's answer: the markets holding any of the token ids or condition ids, each once, in
    the order asked, filtered by `closed` when given."""
    wanted = {c.lower() for c in condition_ids}
    found: dict[str, Mapping[str, Any]] = {}
    for token in token_ids:
        market = index.get(token)
        if market is not None:
            found.setdefault(market["conditionId"], market)
    for market in index.values():
        if market["conditionId"].lower() in wanted:
            found.setdefault(market["conditionId"], market)
    answer = [with_resolution(m, resolution.get(c.lower())) for c, m in found.items()]
    return [m for m in answer if closed is None or m["closed"] is closed]
