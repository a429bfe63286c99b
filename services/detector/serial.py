"""The reference semantics: the rules applied to the orders one by one, in stream order, with the
state in memory. Whatever number of replicas runs, the detector must emit exactly what this emits
for the same stream (the multi-replica tests compare the two), and `replay.py` uses it to show
what BetterBot would have signalled on a tape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from services.detector import rules
from services.detector.rules import Decision, Effect, RuleSettings, UnitState
from shared.models import FillStatus, OrderFill, Signal, TrackedWallet


class SerialDetector:
    """One detector over one stream: the state units, the order_keys already decided, and the
    signals cooldowns held back, by kind."""

    def __init__(self, wallets: Iterable[TrackedWallet], settings: RuleSettings) -> None:
        self.wallets: dict[str, TrackedWallet] = {w.address: w for w in wallets}
        self.settings = settings
        self.states: dict[str, UnitState] = {}
        self.done: set[str] = set()
        # What each decided fill did, for its retraction.
        self.effects: dict[str, Effect] = {}
        self.suppressed: Counter[str] = Counter()
        self.position = 0
        # Wallets whose positions were seeded from `/positions`, and the snapshot's time.
        self.seeded_at: dict[str, int] = {}

    def seed(self, wallet: str, positions: Mapping[str, Mapping[str, int]], as_of: int) -> None:
        """The wallet's true holdings (`/positions` at exchange time `as_of`, micro-shares by
        market and token) replace the positions its fills made, in every market."""
        prefix = rules.wallet_unit(wallet, "")
        markets = {unit[len(prefix) :] for unit in self.states if unit.startswith(prefix)}
        for market in markets | set(positions):
            unit = rules.wallet_unit(wallet, market)
            state = rules.seeded(self.states.get(unit), positions.get(market, {}))
            if state is None:
                self.states.pop(unit, None)
            else:
                self.states[unit] = state
        self.seeded_at[wallet] = as_of

    def process(self, order: OrderFill, detected_at: float | None = None) -> list[Signal]:
        """The signals of one order; a repeated order_key emits and changes nothing. A retraction
        undoes its fill and repeats its signals as retracted (docs/signals.md, "Retractions"):
        each stream entry comes once here, so a fill after its retraction is a new inclusion."""
        self.position += 1
        seeded_at = self.seeded_at.get(order.user)
        planned = rules.plan(
            order, self.wallets.get(order.user), self.settings, seeded_at=seeded_at
        )
        key = rules.decision_key(order, f"{self.position}-0")
        if planned is not None and key in self.done and order.status is FillStatus.CONFIRMED:
            return self._confirm(order, order.received_at if detected_at is None else detected_at)
        if planned is None or key in self.done:
            return []
        before = {unit: self.states.get(unit) for unit in planned.units}
        at = order.received_at if detected_at is None else detected_at
        if order.status is FillStatus.RETRACTED:
            effect = self.effects.pop(order.order_key, None)
            self.done.discard(order.order_key)
            decision = rules.undo(planned, before, effect, at) if effect else Decision((), {})
        else:
            decision = rules.decide(planned, before, self.settings, at)
            self.effects[order.order_key] = decision.effect
        for unit, state in decision.states.items():
            if state is None:
                self.states.pop(unit, None)
            else:
                self.states[unit] = state
        self.done.add(key)
        self.suppressed.update(kind.value for kind in decision.suppressed)
        return list(decision.signals)

    def _confirm(self, order: OrderFill, detected_at: float) -> list[Signal]:
        """A repeat of a fill decided while pending: its signals once more, as confirmed."""
        key = rules.confirmation_key(order)
        effect = self.effects.get(order.order_key)
        if effect is None or key in self.done:
            return []
        self.done.add(key)
        return list(rules.confirm(effect, detected_at))


def run(
    orders: Iterable[OrderFill],
    wallets: Iterable[TrackedWallet] | Mapping[str, TrackedWallet],
    settings: RuleSettings,
) -> list[Signal]:
    """Every signal of `orders`, in stream order; `detected_at` is each order's `received_at`."""
    tracked = wallets.values() if isinstance(wallets, Mapping) else wallets
    detector = SerialDetector(tracked, settings)
    return [signal for order in orders for signal in detector.process(order)]
