"""What BetterBot would have signalled on a tape: `python -m services.detector.replay [TAPE]`.

Reads a Polymarket Data-API dump (default: the bundled Nobel Peace Prize 2025 morning), maps each
trade to the order fill the ingestor would publish (`shared.data_api`, the ingestor's mapping;
source `data_api`, `received_at` = the trade's timestamp), runs the rules in stream order
(`serial.py`, the semantics every number of replicas reproduces) with the wallets of `--wallets`
(default `WALLETS_FILE`) and the rule settings of the environment / `--rules` file, and prints a
markdown report: the settings, a table of the signals by kind, and one example of each kind (the
one with the highest confidence). `--jsonl FILE` also writes every signal, one JSON per line.
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
from shared.data_api import order_from_data_api
from shared.models import OrderFill, Signal, SignalKind, Source, TrackedWallet
from shared.wallets import load_wallets

DEFAULT_TAPE = "data/polymarket_trades_nobel2025.json"


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
    orders: Iterable[OrderFill], wallets: Iterable[TrackedWallet], settings: RuleSettings
) -> tuple[list[Signal], Counter[str]]:
    """Every signal of the orders in stream order, and the signals cooldowns held back by kind."""
    detector = SerialDetector(wallets, settings)
    signals = [signal for order in orders for signal in detector.process(order)]
    return signals, detector.suppressed


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
    args = parser.parse_args(argv)
    settings = (
        DetectorSettings(detector_rules_file=args.rules) if args.rules else DetectorSettings()
    )
    wallets = load_wallets(args.wallets or settings.wallets_file)
    orders = tape_orders(args.tape)
    signals, suppressed = replay(orders, wallets, settings.rules())
    if args.jsonl:
        Path(args.jsonl).write_text("".join(s.model_dump_json() + "\n" for s in signals))
    sys.stdout.write(report(signals, suppressed, orders, wallets, settings.rules(), args.tape))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
