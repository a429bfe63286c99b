"""What BetterBot would have signalled on a tape: `python -m services.detector.replay [TAPE]`.

Reads a Polymarket Data-API dump (default: the bundled Nobel Peace Prize 2025 morning), maps each
trade to the order fill the ingestor would publish (`shared.data_api`, the ingestor's mapping;
source `data_api`, `received_at` = the trade's timestamp), runs the rules in stream order
(`serial.py`, the semantics every number of replicas reproduces) with the wallets of `--wallets`
(default `WALLETS_FILE`) and the rule settings of the environment / `--rules` file, and prints a
markdown report: the settings, a table of the signals by kind, and one example of each kind (the
one with the highest confidence). `--jsonl FILE` also writes every signal, one JSON per line.

`--history EARLIER_TAPE` seeds the detector with an earlier tape first, as the live detector seeds
a wallet it starts tracking from the Data API's `/positions?user=`: its fills go through the same
rules, in order, their signals dropped (so TAPE starts with the consensus windows and cooldowns a
detector that had run through EARLIER_TAPE would hold); then every tracked wallet's positions are
set to the holdings the simulator's `/positions` computes from that tape
(`services.simulator.positions`), as of its last trade. From then on a `trader_entry` is a new
position (`opens_position` true) and a wallet's pre-held tokens give none.

`--validate` adds the report of `betterbot validate` (docs/signals.md, "Does it pay? Validation")
computed from the tape alone: a token's price at `t + h` is its last trade on TAPE at or before
then (every wallet's trades, not only the tracked ones); a horizon ending after the tape's last
trade is not measured. The settlement comes from `--resolution FILE` (default for the bundled tape:
data/nobel2025_resolution.json); `--fee-bps` is `VALIDATION_FEE_BPS`; `--by` groups by kind
(default), wallet or source.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson

from services.detector.rules import RuleSettings, describe
from services.detector.serial import SerialDetector
from services.detector.settings import DetectorSettings
from services.simulator.positions import Holding, Holdings, wallet_fills
from services.store.markouts import (
    HORIZONS,
    SETTLEMENT,
    PriceSeries,
    ResolutionError,
    fee_cents,
    load_resolution,
    markout_cents,
)
from services.store.validation_report import (
    GROUPINGS,
    RULE,
    Grouping,
    Measured,
    complete,
    ordered,
    render,
    tally,
)
from shared.data_api import order_from_data_api
from shared.models import FillStatus, OrderFill, Signal, SignalKind, Source, TrackedWallet
from shared.wallets import load_wallets

DEFAULT_TAPE = "data/polymarket_trades_nobel2025.json"
DEFAULT_RESOLUTION = "data/nobel2025_resolution.json"  # the bundled tape's


def tape_orders(path: str | Path) -> list[OrderFill]:
    """The tape's trades as order fills, oldest first (the order they reach `orders.raw`), each
    received at its own exchange time."""
    items = orjson.loads(Path(path).read_bytes())
    orders = []
    for item in reversed(items):  # the Data API lists newest first
        order = order_from_data_api(item)
        orders.append(OrderFill.from_dome(order, Source.DATA_API, float(order.timestamp)))
    # Stable: trades of one second keep their order on the tape.
    orders.sort(key=lambda order: order.timestamp)
    return orders


def replay(
    orders: Iterable[OrderFill],
    wallets: Iterable[TrackedWallet],
    settings: RuleSettings,
    history: Iterable[OrderFill] = (),
) -> tuple[list[Signal], Counter[str]]:
    """Every signal of the orders in stream order, and the signals cooldowns held back by kind;
    the `history` fills go through first and only leave their state (module doc)."""
    tracked = list(wallets)
    detector = SerialDetector(tracked, settings)
    earlier = list(history)
    for order in earlier:
        detector.process(order)
    if earlier:
        seed(detector, [w.address for w in tracked], earlier)
    detector.suppressed.clear()
    signals = [signal for order in orders for signal in detector.process(order)]
    return signals, detector.suppressed


def seed(detector: SerialDetector, wallets: Iterable[str], history: Sequence[OrderFill]) -> None:
    """Each wallet's positions as `/positions` would give them after `history` (the simulator's
    own computation), as of the last fill of `history`."""
    as_of = max(order.timestamp for order in history)
    for wallet in wallets:
        holdings = Holdings().add(wallet_fills(wallet, history))
        detector.seed(wallet, positions_by_market(holdings.of(wallet)), as_of)


def positions_by_market(holdings: Iterable[Holding]) -> dict[str, dict[str, int]]:
    """Micro-shares by market (the rules' `market_of`: condition id, else slug, else token) and
    token."""
    markets: dict[str, dict[str, int]] = {}
    for h in holdings:
        market = h.condition_id or h.slug or h.asset
        markets.setdefault(market, {})[h.asset] = h.micro
    return markets


def measure(
    signals: Iterable[Signal],
    orders: Sequence[OrderFill],
    resolution: dict[str, dict[str, float]],
    fee_bps: float,
) -> list[Measured]:
    """Each signal's markouts from the tape's own trades, and its settlement when `resolution`
    knows its market; retracted signals and fills are left out."""
    kept = [o for o in orders if o.status is not FillStatus.RETRACTED]
    series = PriceSeries((o.token_id, o.timestamp, o.price) for o in kept)
    end = max((o.timestamp for o in kept), default=0)
    measured: list[Measured] = []
    for s in signals:
        if s.status is FillStatus.RETRACTED:
            continue
        fee = fee_cents(s.price, fee_bps)
        for h in HORIZONS:
            point = series.at(s.token_id, s.exchange_ts + h.seconds)
            if s.exchange_ts + h.seconds <= end and point is not None:
                markout = markout_cents(s.side.value, s.price, point[1], fee_bps)
                measured.append(_measured(s, h.label, markout, fee))
        payout = resolution.get(s.condition_id.lower(), {}).get(s.token_label)
        if payout is not None:
            markout = markout_cents(s.side.value, s.price, payout, fee_bps)
            measured.append(_measured(s, SETTLEMENT, markout, fee))
    return measured


def _measured(signal: Signal, horizon: str, markout: float, fee: float) -> Measured:
    return Measured(
        signal.kind.value,
        signal.wallet,
        signal.wallet_label,
        signal.source.value,
        horizon,
        markout,
        fee,
    )


def validation_report(
    measured: Sequence[Measured],
    orders: Sequence[OrderFill],
    resolution_file: str | None,
    fee_bps: float,
    by: Grouping,
) -> str:
    end = _utc(max(o.timestamp for o in orders))
    settled = "no resolution file: settlements not measured"
    if resolution_file:
        settled = f"settlements from `{resolution_file}`"
    every = [kind.value for kind in SignalKind] if by == "kind" else []
    tallies = ordered(complete(tally(measured, by), every), by)
    lines = [
        "Does it pay? Markouts and settlements, in cents per share, net of fees "
        f"(`VALIDATION_FEE_BPS={fee_bps:g}`), from the tape alone: a token's price at t + h is "
        f"its last trade on the tape at or before then (all {len(orders):,} trades, every "
        f"wallet); a horizon ending after the tape's last trade ({end} UTC) is not measured; "
        f"{settled}.",
        "",
        f"Rule: {RULE}.",
        "",
        *render(tallies, by),
    ]
    return "\n".join(lines)


def report(
    signals: Sequence[Signal],
    suppressed: Counter[str],
    orders: Sequence[OrderFill],
    wallets: Sequence[TrackedWallet],
    settings: RuleSettings,
    tape: str,
) -> str:
    tracked = {w.address for w in wallets}
    tracked_orders = sum(1 for o in orders if o.user in tracked)
    start, end = _utc(orders[0].timestamp), _utc(orders[-1].timestamp)
    lines = [
        f"Tape `{tape}`: {len(orders):,} trades from {start} to {end} UTC; {len(wallets)} tracked "
        f"wallets made {tracked_orders} of them.",
        "",
        "Settings: " + ", ".join(f"`{k.upper()}={v}`" for k, v in describe(settings).items()),
        "",
        "| kind | signals | wallets | markets | held back by the cooldown |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in SignalKind:
        of_kind = [s for s in signals if s.kind is kind]
        lines.append(
            f"| `{kind.value}` | {len(of_kind)} | {len({s.wallet for s in of_kind})} "
            f"| {len({s.condition_id for s in of_kind})} | {suppressed.get(kind.value, 0)} |"
        )
    lines.append(f"| **all** | **{len(signals)}** | | | {sum(suppressed.values())} |")
    lines += ["", "One example of each kind (the highest confidence):", ""]
    for kind in SignalKind:
        of_kind = [s for s in signals if s.kind is kind]
        if of_kind:
            lines += _example(max(of_kind, key=lambda s: s.confidence))
    return "\n".join(lines)


def _example(signal: Signal) -> list[str]:
    who = signal.wallet_label or f"{signal.wallet[:6]}...{signal.wallet[-4:]}"
    head = (
        f"- **`{signal.kind.value}`** at {_utc(signal.exchange_ts)} UTC, {who}, "
        f'{signal.side.value} {signal.token_label!r} of "{signal.title}" '
        f"({signal.shares:,.2f} @ {signal.price:.3f} = ${signal.notional_usd:,.0f}), "
        f"confidence {signal.confidence:.2f}, `signal_id` `{signal.signal_id}`:"
    )
    return [head, *(f"  - {reason}" for reason in signal.reasons)]


def _utc(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.detector.replay", description=__doc__)
    parser.add_argument("tape", nargs="?", default=DEFAULT_TAPE)
    parser.add_argument("--wallets", help="tracked wallets file (default: WALLETS_FILE)")
    parser.add_argument("--rules", help="rules file (default: DETECTOR_RULES_FILE)")
    parser.add_argument("--jsonl", help="also write every signal to this file, one JSON a line")
    parser.add_argument("--history", help="an earlier tape whose fills seed the state first")
    parser.add_argument("--validate", action="store_true", help="add the validation report")
    parser.add_argument("--resolution", help="resolution file (default: the bundled tape's)")
    parser.add_argument("--fee-bps", type=float, default=0.0, help="VALIDATION_FEE_BPS")
    parser.add_argument("--by", choices=GROUPINGS, default="kind", help="validation groups")
    args = parser.parse_args(argv)
    settings = (
        DetectorSettings(detector_rules_file=args.rules) if args.rules else DetectorSettings()
    )
    wallets = load_wallets(args.wallets or settings.wallets_file)
    orders = tape_orders(args.tape)
    history = tape_orders(args.history) if args.history else []
    signals, suppressed = replay(orders, wallets, settings.rules(), history)
    if args.jsonl:
        Path(args.jsonl).write_text("".join(s.model_dump_json() + "\n" for s in signals))
    text = report(signals, suppressed, orders, wallets, settings.rules(), args.tape)
    if history:
        text += (
            f"\n\nState seeded from `{args.history}`: its {len(history):,} trades went through "
            "the same rules first, their signals dropped; then every tracked wallet's positions "
            "were set to its `/positions` holdings after them."
        )
    if args.validate:
        text += "\n\n" + _validation(args, signals, orders)
    sys.stdout.write(text + "\n")


def _validation(
    args: argparse.Namespace, signals: Sequence[Signal], orders: Sequence[OrderFill]
) -> str:
    path = args.resolution or (DEFAULT_RESOLUTION if args.tape == DEFAULT_TAPE else None)
    try:
        resolution = load_resolution(_found(path)) if path else {}
    except ResolutionError as exc:
        raise SystemExit(f"replay: {exc}") from None
    measured = measure(signals, orders, resolution, args.fee_bps)
    return validation_report(measured, orders, path, args.fee_bps, args.by)


def _found(path: str) -> Path:
    """A relative path as given, else from the project root (the defaults work from anywhere)."""
    candidate = Path(path)
    root = Path(__file__).resolve().parents[2]
    return candidate if candidate.is_absolute() or candidate.exists() else root / candidate


if __name__ == "__main__":
    main()
