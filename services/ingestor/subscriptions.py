"""Tracked wallets -> subscriptions within the tier's limits, and what the server has confirmed.

Three layers, all pure (no I/O):
- `plan_subscriptions`: wallets -> connections -> subscriptions (chunks of at most
  `wallets_per_subscription`), or a `SubscriptionPlanError` naming the numbers when the tier cannot
  hold them. Never a silent truncation.
- `SubscriptionLayout`: the desired state, changed one wallet at a time while running. A new wallet
  goes into the first subscription with room (one `update`), else a new subscription on the first
  connection with room, else a new connection; a removed wallet leaves its subscription (an
  `update`, or an `unsubscribe` when it was the last). Slots keep a local key for life, so a change
  touches one subscription and never reshuffles the others.
- `SubscriptionRegistry`: one connection's view of the server. `reconcile(slots)` returns the
  messages that bring the server to the desired slots; acks echo no request id, so they are matched
  to subscribes first-in first-out (as the official SDKs do). After a reconnect the server has
  forgotten everything: the registry is cleared and every slot is subscribed again, with new ids.
  An `update` gets no reply, so the wallets it adds are handed out by `take_added` for the
  caller to treat as unconfirmed (read again once the server has surely applied it).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class SubscriptionPlanError(ValueError):
    """The wallets cannot be subscribed within the configured limits."""


@dataclass(frozen=True)
class SubscriptionLimits:
    wallets_per_subscription: int
    max_subscriptions: int
    subscriptions_per_connection: int
    max_connections: int

    @property
    def subscriptions(self) -> int:
        """Subscriptions usable at once: the tier's, unless the connections hold fewer."""
        return min(self.max_subscriptions, self.subscriptions_per_connection * self.max_connections)

    @property
    def wallets(self) -> int:
        return self.subscriptions * self.wallets_per_subscription

    def check(self, wallets: int) -> None:
        """Raise SubscriptionPlanError, naming the numbers, if `wallets` cannot be subscribed."""
        needed = math.ceil(wallets / self.wallets_per_subscription)
        if needed > self.max_subscriptions:
            capacity = self.max_subscriptions * self.wallets_per_subscription
            raise SubscriptionPlanError(
                f"{wallets} tracked wallets exceed the capacity of {self.max_subscriptions} "
                f"subscriptions x {self.wallets_per_subscription} wallets = {capacity} "
                f"(DOME_MAX_SUBSCRIPTIONS x DOME_WALLETS_PER_SUBSCRIPTION, or DOME_TIER); they "
                f"would need {needed} subscriptions. Raise the limits to your Dome tier's or track "
                f"fewer wallets."
            )
        if needed > self.subscriptions:
            raise SubscriptionPlanError(
                f"{wallets} tracked wallets need {needed} subscriptions, but "
                f"{self.max_connections} connections x {self.subscriptions_per_connection} "
                f"subscriptions = {self.subscriptions} "
                f"(DOME_MAX_CONNECTIONS x DOME_SUBSCRIPTIONS_PER_CONNECTION); raise one of them."
            )


def plan_subscriptions(
    wallets: Sequence[str], limits: SubscriptionLimits
) -> list[list[tuple[str, ...]]]:
    """Connections, each a list of subscriptions, each a chunk of wallets (in the given order)."""
    limits.check(len(wallets))
    per = limits.wallets_per_subscription
    chunks = [tuple(wallets[start : start + per]) for start in range(0, len(wallets), per)]
    per_connection = limits.subscriptions_per_connection
    return [
        chunks[start : start + per_connection] for start in range(0, len(chunks), per_connection)
    ]


@dataclass(eq=False)
class Slot:
    """One subscription as we want it: a local key (stable for life) and its wallets."""

    key: int
    wallets: list[str]


class SubscriptionLayout:
    """The desired subscriptions over connections, changed one wallet at a time."""

    def __init__(self, wallets: Sequence[str], limits: SubscriptionLimits) -> None:
        self.limits = limits
        self._keys = itertools.count(1)
        self.connections: list[list[Slot]] = [
            [Slot(next(self._keys), list(chunk)) for chunk in connection]
            for connection in plan_subscriptions(wallets, limits)
        ]
        self._where: dict[str, int] = {
            wallet: index
            for index, connection in enumerate(self.connections)
            for slot in connection
            for wallet in slot.wallets
        }

    @property
    def wallets(self) -> int:
        return len(self._where)

    @property
    def subscriptions(self) -> int:
        return sum(len(connection) for connection in self.connections)

    def __contains__(self, wallet: object) -> bool:
        return wallet in self._where

    def add(self, wallet: str) -> int | None:
        """Place a wallet; returns the index of the connection to reconcile (None: already there).

        Raises SubscriptionPlanError, naming the numbers, when the tier has no room left."""
        if wallet in self._where:
            return None
        index = self._place(wallet)
        self._where[wallet] = index
        return index

    def remove(self, wallet: str) -> int | None:
        """Take a wallet out; returns the index of the connection to reconcile (None: unknown)."""
        index = self._where.pop(wallet, None)
        if index is None:
            return None
        connection = self.connections[index]
        for slot in connection:
            if wallet in slot.wallets:
                slot.wallets.remove(wallet)
                if not slot.wallets:
                    connection.remove(slot)
                break
        return index

    def _place(self, wallet: str) -> int:
        limits = self.limits
        for index, connection in enumerate(self.connections):
            for slot in connection:
                if len(slot.wallets) < limits.wallets_per_subscription:
                    slot.wallets.append(wallet)
                    return index
        if self.subscriptions >= limits.max_subscriptions:
            limits.check(self.wallets + 1)
        for index, connection in enumerate(self.connections):
            if len(connection) < limits.subscriptions_per_connection:
                connection.append(Slot(next(self._keys), [wallet]))
                return index
        if len(self.connections) >= limits.max_connections:
            limits.check(self.wallets + 1)
        self.connections.append([Slot(next(self._keys), [wallet])])
        return len(self.connections) - 1


@dataclass(frozen=True, slots=True)
class Subscribe:
    slot: int
    wallets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Update:
    slot: int
    subscription_id: str
    wallets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    slot: int
    subscription_id: str


Action = Subscribe | Update | Unsubscribe


class SubscriptionRegistry:
    """One connection's subscriptions as the server knows them, and subscribes awaiting an ack."""

    def __init__(self) -> None:
        self._pending: deque[tuple[int, tuple[str, ...]]] = deque()
        self._ids: dict[int, str] = {}
        # subscription id -> the wallets the server holds for it (or was asked to, by an update).
        self.active: dict[str, tuple[str, ...]] = {}
        # Wallets added by updates sent since the last `take_added`.
        self._added: set[str] = set()

    def clear(self) -> None:
        """Forget everything: a new connection starts with no subscriptions."""
        self._pending.clear()
        self._ids.clear()
        self.active.clear()
        self._added.clear()

    def take_added(self) -> set[str]:
        """The wallets that updates sent since the last call added to their subscription."""
        added, self._added = self._added, set()
        return added

    def reconcile(self, slots: Iterable[Slot]) -> list[Action]:
        """The messages that turn what the server holds into `slots`, recorded as sent.

        A slot whose subscribe awaits its ack is left alone until the ack comes: call again then."""
        desired = {slot.key: tuple(slot.wallets) for slot in slots if slot.wallets}
        waiting = {key for key, _ in self._pending}
        actions: list[Action] = []
        for key, subscription_id in list(self._ids.items()):
            if key not in desired:
                actions.append(Unsubscribe(key, subscription_id))
                del self._ids[key]
                del self.active[subscription_id]
        for key, wallets in desired.items():
            if key in waiting:
                continue
            bound = self._ids.get(key)
            if bound is None:
                actions.append(Subscribe(key, wallets))
                self._pending.append((key, wallets))
            elif self.active[bound] != wallets:
                actions.append(Update(key, bound, wallets))
                self._added.update(set(wallets) - set(self.active[bound]))
                self.active[bound] = wallets
        return actions

    def acked(self, subscription_id: str) -> tuple[str, ...] | None:
        """Record the ack of the oldest pending subscribe; None when no subscribe was pending."""
        if not self._pending:
            return None
        key, wallets = self._pending.popleft()
        self._ids[key] = subscription_id
        self.active[subscription_id] = wallets
        return wallets

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def wallets(self) -> int:
        return sum(len(wallets) for wallets in self.active.values())

    def confirmed(self) -> set[str]:
        """Wallets in subscriptions the server holds (acked), including those added by updates
        since, which the server may not have applied yet (see `take_added`)."""
        return {wallet for wallets in self.active.values() for wallet in wallets}
