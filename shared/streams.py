"""Stream names and key layout: the public contract of the Redis side.

Every key a service touches together with a stream carries that stream's name as a Redis Cluster
hash tag (`{orders.raw}:seen:<key>`), so one Lua script or MULTI stays in one slot. `namespace`
prefixes everything, which lets tests and several deployments share one Redis without seeing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass

DETECTOR_GROUP = "detector"
STORE_GROUP = "store"
WEBHOOKS_GROUP = "webhooks"


@dataclass(frozen=True)
class Streams:
    namespace: str = ""

    @property
    def orders_raw(self) -> str:
        return f"{self.namespace}orders.raw"

    @property
    def signals(self) -> str:
        return f"{self.namespace}signals"

    @property
    def orders_dead(self) -> str:
        return f"{self.namespace}orders.dead"

    @property
    def signals_dead(self) -> str:
        return f"{self.namespace}signals.dead"

    @property
    def webhooks_dead(self) -> str:
        return f"{self.namespace}webhooks.dead"

    @property
    def wallets_control(self) -> str:
        """Changes to the tracked wallets (see shared.wallet_registry)."""
        return f"{self.namespace}wallets.control"

    def wallets_key(self) -> str:
        """Hash address -> TrackedWallet JSON: the live set of tracked wallets."""
        return f"{self.namespace}wallets:tracked"

    def wallets_seeded_key(self) -> str:
        """Set once the wallets file has seeded the registry: it never seeds it again."""
        return f"{self.namespace}wallets:seeded"

    def seen_order_prefix(self) -> str:
        """Prefix of the ingestor's dedupe keys, in the slot of `orders.raw`."""
        return "{" + self.orders_raw + "}:seen:"

    def detector_prefix(self) -> str:
        """Prefix of the detector's state keys, in the slot of `signals`."""
        return "{" + self.signals + "}:det:"

    def feed_status_key(self) -> str:
        """Hash where the ingestor publishes the feed's state for dashboards and health."""
        return f"{self.namespace}status:feed"
