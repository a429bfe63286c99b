"""Tracked wallets -> Dome subscriptions within the tier's limits, and acks matched to subscribes.

Dome's acks echo no request id: they come back in the order the subscribes were sent, so the
registry matches them first-in first-out (as the official SDKs do). After a reconnect the server
has forgotten every subscription: the registry is cleared and everything is subscribed again.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any


class SubscriptionPlanError(ValueError):
    """The wallets cannot be subscribed within the configured limits."""


def plan_subscriptions(
    wallets: Sequence[str], per_subscription: int, max_subscriptions: int
) -> list[tuple[str, ...]]:
    """Split the wallets into chunks of at most `per_subscription`, one per subscription."""
    if not wallets:
        raise SubscriptionPlanError("no tracked wallets: the wallets file is empty")
    needed = math.ceil(len(wallets) / per_subscription)
    if needed > max_subscriptions:
        capacity = max_subscriptions * per_subscription
        raise SubscriptionPlanError(
            f"{len(wallets)} tracked wallets exceed the capacity of {max_subscriptions} "
            f"subscriptions x {per_subscription} wallets = {capacity} "
            f"(DOME_MAX_SUBSCRIPTIONS x DOME_WALLETS_PER_SUBSCRIPTION); they would need {needed} "
            f"subscriptions. Raise the limits to your Dome tier's or track fewer wallets."
        )
    return [
        tuple(wallets[start : start + per_subscription])
        for start in range(0, len(wallets), per_subscription)
    ]


def subscribe_message(users: Sequence[str]) -> dict[str, Any]:
    """Dome's subscribe request for these wallets' orders (one filter kind per subscription)."""
    return {
        "action": "subscribe",
        "platform": "polymarket",
        "version": 1,
        "type": "orders",
        "filters": {"users": list(users)},
    }


class SubscriptionRegistry:
    """Subscribes sent and not yet acknowledged, and the subscriptions the server confirmed."""

    def __init__(self) -> None:
        self._pending: deque[tuple[str, ...]] = deque()
        self.active: dict[str, tuple[str, ...]] = {}

    def clear(self) -> None:
        """Forget everything: a new connection starts with no subscriptions."""
        self._pending.clear()
        self.active.clear()

    def sent(self, users: Sequence[str]) -> None:
        self._pending.append(tuple(users))

    def acked(self, subscription_id: str) -> tuple[str, ...] | None:
        """Record the ack of the oldest pending subscribe; None when no subscribe was pending."""
        if not self._pending:
            return None
        users = self._pending.popleft()
        self.active[subscription_id] = users
        return users

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def wallets(self) -> int:
        return sum(len(users) for users in self.active.values())
