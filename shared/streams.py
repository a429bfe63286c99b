"""Stream names and key layout: the public contract of the Redis side.

Every key a service touches together with a stream carries that stream's name as a Redis Cluster
hash tag (`{orders.raw}:seen:<key>`), so one Lua script or MULTI stays in one slot. `namespace`
prefixes everything, which lets tests and several deployments share one Redis without seeing
each other.

Partitions (`STREAM_PARTITIONS`, docs/operations.md): with N = 1, every fill goes to `orders.raw`
and the detector keeps its state in the slot of `signals`, as always. With N > 1, a fill goes to
the wallet partition `orders.raw.<i>` of its wallet, and a BUY also to the token partition
`orders.bytoken.<j>` of its token, so that every rule finds its state in one partition: a
wallet's positions and cooldowns in its wallet partition, a token's consensus in its token
partition (docs/signals.md, "Partitions"). Each partition is its own slot (its name is its hash
tag): its dedupe keys, watermarks, detector state and signal outbox live with it, so partitions
spread over a cluster's nodes. A partition's signals go to its outbox first and are forwarded to
`signals` (one stream, the public contract) exactly once. On a cluster, one partition works the
same way (its state and outbox in the slot of `orders.raw`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from enum import StrEnum

# Partitions of `orders.raw` at most (STREAM_PARTITIONS): far more than masters in any cluster.
MAX_PARTITIONS = 256

DETECTOR_GROUP = "detector"
STORE_GROUP = "store"
WEBHOOKS_GROUP = "webhooks"


class Scope(StrEnum):
    """Which rules a detector lane runs: all of them (one partition), or one partition's share."""

    ALL = "all"
    WALLET = "wallet"
    TOKEN = "token"


@dataclass(frozen=True)
class Lane:
    """One stream of fills a detector reads, and where its state and signals go (one slot)."""

    stream: str
    scope: Scope
    # Prefix of the detector's state keys for this lane.
    state_prefix: str
    # Where the apply script adds this lane's signals: `signals` itself, or the lane's outbox.
    signals: str
    # True when `signals` is the lane's outbox, forwarded by services/detector/forward.py.
    outbox: bool = False


def _own_slot_lane(stream: str, scope: Scope) -> Lane:
    """A lane whose state and outbox share its stream's slot."""
    tag = "{" + stream + "}"
    return Lane(stream, scope, tag + ":det:", tag + ":signals", outbox=True)


def slot_tag(key: str) -> str:
    """The hash tag that places `key` (and any key starting with it) in `key`'s Redis Cluster
    slot: its own tag when it has one (`{orders.raw.0}:signals`), else the whole name in braces.
    """
    start = key.find("{")
    end = key.find("}", start + 1)
    if start >= 0 and end > start + 1:
        return key[start : end + 1]
    return "{" + key + "}"


def partition_of(value: str, partitions: int) -> int:
    """The partition of a wallet address or a token id: the same in every process and language
    (CRC-32 of the lowercase UTF-8 text, modulo N)."""
    return zlib.crc32(value.lower().encode()) % partitions


@dataclass(frozen=True)
class Streams:
    namespace: str = ""
    partitions: int = 1
    # On a Redis Cluster even one partition keeps its detector state and outbox in the slot of
    # `orders.raw`: a failover that loses recent writes there then loses a fill, its decision and
    # its ack together, and the re-backfill brings all back; with the state in the slot of
    # `signals` a lost decision would stay lost behind an ack that survived.
    cluster: bool = False

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"partitions must be at least 1, not {self.partitions}")

    @property
    def orders_raw(self) -> str:
        return f"{self.namespace}orders.raw"

    @property
    def partitioned(self) -> bool:
        return self.partitions > 1

    def wallet_partition(self, index: int) -> str:
        return f"{self.namespace}orders.raw.{index}"

    def token_partition(self, index: int) -> str:
        return f"{self.namespace}orders.bytoken.{index}"

    def order_streams(self) -> list[str]:
        """The streams that hold every fill once: `orders.raw`, or its wallet partitions."""
        if not self.partitioned:
            return [self.orders_raw]
        return [self.wallet_partition(i) for i in range(self.partitions)]

    def token_streams(self) -> list[str]:
        """The token partitions (none with one partition)."""
        if not self.partitioned:
            return []
        return [self.token_partition(i) for i in range(self.partitions)]

    def wallet_stream(self, wallet: str) -> str:
        """Where the fills of `wallet` go."""
        if not self.partitioned:
            return self.orders_raw
        return self.wallet_partition(partition_of(wallet, self.partitions))

    def token_stream(self, token_id: str) -> str | None:
        """Where the BUYs of `token_id` also go (None with one partition: `orders.raw` has all)."""
        if not self.partitioned:
            return None
        return self.token_partition(partition_of(token_id, self.partitions))

    def lanes(self) -> list[Lane]:
        """What the detector reads: one lane with every rule, or one per partition."""
        if not self.partitioned and not self.cluster:
            return [Lane(self.orders_raw, Scope.ALL, self.detector_prefix(), self.signals)]
        if not self.partitioned:
            stream = self.orders_raw
            return [_own_slot_lane(stream, Scope.ALL)]
        lanes = [
            *((stream, Scope.WALLET) for stream in self.order_streams()),
            *((stream, Scope.TOKEN) for stream in self.token_streams()),
        ]
        return [_own_slot_lane(stream, scope) for stream, scope in lanes]

    def forwarded_key_prefix(self) -> str:
        """Prefix of the keys that make forwarding an outbox entry to `signals` happen once."""
        return "{" + self.signals + "}:fwd:"

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
        """Hash address -> TrackedWallet JSON: the live set of tracked wallets, in the slot of
        `wallets.control` (one MULTI changes both)."""
        return "{" + self.wallets_control + "}:tracked"

    def wallets_seeded_key(self) -> str:
        """Set once the wallets file has seeded the registry: it never seeds it again."""
        return "{" + self.wallets_control + "}:seeded"

    def legacy_wallet_keys(self) -> dict[str, str]:
        """The registry's keys before they shared a slot (old name -> new), renamed on load."""
        return {
            f"{self.namespace}wallets:tracked": self.wallets_key(),
            f"{self.namespace}wallets:seeded": self.wallets_seeded_key(),
        }

    def seen_order_prefix(self, stream: str | None = None) -> str:
        """Prefix of the ingestor's dedupe keys, in the slot of `stream` (`orders.raw`)."""
        return "{" + (stream or self.orders_raw) + "}:seen:"

    def detector_prefix(self) -> str:
        """Prefix of the detector's state keys, in the slot of `signals`."""
        return "{" + self.signals + "}:det:"

    def layout_key(self) -> str:
        """The partition count this Redis holds (shared/layout.py)."""
        return f"{self.namespace}layout:partitions"

    def feed_status_key(self) -> str:
        """Hash where the ingestor publishes the feed's state for dashboards and health."""
        return f"{self.namespace}status:feed"
