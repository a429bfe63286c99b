"""The detection rules: plain functions from one order fill, its wallet and the state it touches to
the signals it emits and the state after it. No Redis here: `pipeline.py` reads the state, calls
`decide`, and hands the result to `state.py`, which applies it atomically with the emission.

State is split into units, each one JSON value, so that replicas only wait for each other on
orders that touch the same unit (`docs/signals.md` explains the ordering):
- `wm:<wallet>:<market>` (`WalletMarketState`): the wallet's position in each token of the market
  (tracked wallets), the exchange time of its latest signal of each kind (cooldowns), and its
  open runs of small fills (accumulation / distribution);
- `tok:<token>` (`ConsensusState`): the tracked wallets that bought the token within the window.

`market` is the order's condition_id (else its market_slug, else its token_id). All thresholds are
`RuleSettings` (settings file `DETECTOR_RULES_FILE` and env names in `settings.py`); every time
below is exchange time (the fill's `timestamp`), never the clock of the machine.

Rules, in emission order within one order:
- Filters, applied to every rule ("is this fill informative?"): no signal for a BUY at `price >=
  SIGNAL_MAX_PRICE` (default 0.95) or `price <= SIGNAL_MIN_PRICE` (default 0.05), an outcome the
  market already calls decided either way, nor for any fill with `notional <
  SIGNAL_MIN_NOTIONAL_USD` (default 10). A SELL is never dropped for its price (at 0.999 it takes
  profit, at 0.01 it cuts a loss: both can be exits). Filtered fills still move positions.
- `whale_order`: any fill (any wallet, BUY or SELL) with notional `shares * price >=
  WHALE_MIN_NOTIONAL_USD` (default 1000).
- `trader_entry`: a tracked wallet BUYs a token in which its position is 0.
- `trader_exit`: a tracked wallet SELLs at least `EXIT_MIN_FRACTION` (default 0.8) of the position
  it held in the token before the sell. Positions start from the wallet's holdings on the Data
  API's `/positions` when it started being tracked (`seeded`, with the snapshot's time `seeded_at`:
  a fill at or before it is in the snapshot and moves nothing), else from 0 then; fills add (BUY)
  and subtract (SELL), floor 0, in micro-shares. Unseeded, a position from before tracking started
  is unknown, so selling it is no exit, and `opens_position` is None.
- `accumulation` / `distribution`: a tracked wallet's small fills (under the whale threshold; a
  BUY inside the price band) of one token and side reach `ACCUMULATION_MIN_NOTIONAL_USD` (default
  500) within `ACCUMULATION_WINDOW_S` (1800) in at least `ACCUMULATION_MIN_FILLS` (3) fills; the
  signal lists them and the run starts afresh. A run keeps its latest ACCUMULATION_MAX_FILLS
  fills; the signal is pending while any of them was pending; retracting any of them retracts it.
- `consensus`: `CONSENSUS_MIN_WALLETS` = K (default 3) distinct tracked wallets BUY the token within
  `CONSENSUS_WINDOW_S` = W (default 6 h). Fires when it forms (K) and each time it grows (K+1, ...),
  never twice for one count of one episode; an episode ends when the count falls below K.
- Cooldown `SIGNAL_COOLDOWN_S` = C (default 300, 0 disables): a signal of a kind is not emitted
  when the same wallet x market had one of that kind within C seconds (for consensus: the same
  token). A suppressed signal does not restart the cooldown.
- Late fills: a fill that reached the ingestor more than `SIGNAL_MAX_AGE_S` (default 900, 0
  disables) after it traded (`received_at - timestamp`, a backfill) is decided like any other,
  and its signals are marked `late` with a reason saying so.

Confidence (in [0, 1]); `score` is the wallet's score (0.5 when absent or untracked), `T` the whale
threshold, `n` the notional, `size = min(1, n / T)`:
- entry, exit: `0.5 * score + 0.5 * size`; accumulation, distribution: the same on the run's total
- whale: `0.7 * (0.6 + 0.4 * min(1, log10(n / T))) + 0.3 * score`
- consensus with `m` wallets: `0.4 * min(1, m / (2K)) + 0.4 * mean member score
  + 0.2 * min(1, sum of the members' latest buy notionals / T)`
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.models import (
    SHARE_DECIMALS,
    FillStatus,
    OrderFill,
    Side,
    Signal,
    SignalKind,
    TrackedWallet,
    signal_id,
)
from shared.streams import Scope

DEFAULT_SCORE = 0.5
# EXIT_MIN_FRACTION is compared in integer parts per million: exact, the same on every replica.
PPM = 1_000_000

# A run of small fills keeps at most this many (the latest): its unit, and the order_keys of its
# signal, stay bounded however many tiny fills come within the window (docs/signals.md).
ACCUMULATION_MAX_FILLS = 100
# The accumulations / distributions a wallet x market unit remembers (the latest, within the
# window) so that retracting any of their fills retracts them.
FLOW_SIGNALS_KEPT = 10
FLOW_KINDS = (SignalKind.ACCUMULATION, SignalKind.DISTRIBUTION)

WALLET_UNIT = "wm:"
TOKEN_UNIT = "tok:"
SEED_UNIT = "seed:"


@dataclass(frozen=True)
class RuleSettings:
    whale_min_notional_usd: float = 1000.0
    signal_max_price: float = 0.95
    signal_min_notional_usd: float = 10.0
    signal_cooldown_s: int = 300
    exit_min_fraction: float = 0.8
    consensus_min_wallets: int = 3
    consensus_window_s: int = 6 * 3600
    signal_max_age_s: int = 900
    # Last, so that positional constructions written before them keep their meaning.
    signal_min_price: float = 0.05
    accumulation_min_notional_usd: float = 500.0
    accumulation_window_s: int = 1800
    accumulation_min_fills: int = 3


# --- state --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WalletMarketState:
    """One wallet in one market: positions by token (micro-shares > 0) and its latest signals."""

    positions: Mapping[str, int] = field(default_factory=dict)
    last_signal: Mapping[str, int] = field(default_factory=dict)
    # The current run of small fills per `<side>:<token>` (accumulation / distribution), oldest
    # first, at most ACCUMULATION_MAX_FILLS, each `[ts, order_key, notional, shares, opened,
    # pending]` (`opened`: the position was 0 just before it; `pending`: the fill was pending).
    flows: Mapping[str, list[list[Any]]] = field(default_factory=dict)
    # The accumulations / distributions emitted within the window (at most FLOW_SIGNALS_KEPT), by
    # signal_id: `[ts of its last fill, its order_keys, the signal's JSON]`, so that retracting
    # any of its fills retracts it.
    fired: Mapping[str, list[Any]] = field(default_factory=dict)

    def dump(self) -> bytes:
        data: dict[str, Any] = {"positions": self.positions, "last_signal": self.last_signal}
        if self.flows:  # written only when there are some: units without keep their old form
            data["flows"] = self.flows
        if self.fired:
            data["fired"] = self.fired
        return orjson.dumps(data)

    @classmethod
    def load(cls, raw: bytes) -> WalletMarketState:
        data = orjson.loads(raw)
        return cls(
            dict(data["positions"]),
            dict(data["last_signal"]),
            data.get("flows", {}),
            data.get("fired", {}),
        )

    @property
    def empty(self) -> bool:
        return not self.positions and not self.last_signal and not self.flows and not self.fired


@dataclass(frozen=True)
class Member:
    """A tracked wallet's latest qualifying BUY of a token, as the consensus remembers it."""

    ts: int
    order_key: str
    label: str
    score: float
    notional: float


@dataclass(frozen=True)
class ConsensusState:
    """One token: the members within the window and the current consensus episode.

    `clock` is the latest exchange time seen on the token; `formed_at` the clock when the current
    consensus formed (0: none), which names the episode; `fired` the largest count signalled in it.
    """

    clock: int = 0
    formed_at: int = 0
    fired: int = 0
    last_signal: int | None = None
    members: Mapping[str, Member] = field(default_factory=dict)

    def dump(self) -> bytes:
        return orjson.dumps(
            {
                "clock": self.clock,
                "formed_at": self.formed_at,
                "fired": self.fired,
                "last_signal": self.last_signal,
                "members": {
                    address: [m.ts, m.order_key, m.label, m.score, m.notional]
                    for address, m in self.members.items()
                },
            }
        )

    @classmethod
    def load(cls, raw: bytes) -> ConsensusState:
        data = orjson.loads(raw)
        members = {address: Member(*fields) for address, fields in data["members"].items()}
        return cls(data["clock"], data["formed_at"], data["fired"], data["last_signal"], members)


UnitState = WalletMarketState | ConsensusState


def load_unit(unit: str, raw: bytes | None) -> UnitState | None:
    if raw is None:
        return None
    if unit.startswith(WALLET_UNIT):
        return WalletMarketState.load(raw)
    return ConsensusState.load(raw)


def market_of(order: OrderFill) -> str:
    return order.condition_id or order.market_slug or order.token_id


def wallet_unit(wallet: str, market: str) -> str:
    return f"{WALLET_UNIT}{wallet}:{market}"


def token_unit(token_id: str) -> str:
    return f"{TOKEN_UNIT}{token_id}"


def seed_unit(wallet: str) -> str:
    """Where a wallet's `/positions` seeding is kept, in the lane of its units (state.py)."""
    return f"{SEED_UNIT}{wallet}"


def seeding_time(raw: bytes | str | None) -> int | None:
    """The snapshot's time of a seed key's value (`<as_of>|<generation>`), None when the wallet
    is not seeded (no key, or a removal's tombstone `|<generation>`)."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    as_of = text.partition("|")[0]
    return int(as_of) if as_of else None


def seeded(state: UnitState | None, positions: Mapping[str, int]) -> WalletMarketState | None:
    """A wallet x market unit after seeding it with the wallet's true holdings in that market
    (`/positions`, micro-shares by token): they replace what the fills made; cooldowns stay."""
    before = _wallet_state(state)
    held = {t: n for t, n in positions.items() if n > 0}
    after = replace(before, positions=held)
    return None if after.empty else after


# --- the plan of an order: which state it needs -------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """An order that can change state or emit: its wallet, and the state units it reads/writes."""

    order: OrderFill
    wallet: TrackedWallet | None
    whale: bool
    wallet_unit: str | None
    token_unit: str | None
    # When the wallet's positions were seeded from `/positions` (the snapshot's exchange time);
    # None: never, its positions are the fills seen since tracking started. The Redis detector
    # sets it from `seed_unit`, read with the units and compared with them when applied.
    seeded_at: int | None = None
    # Read for every order several times per batch (ordering, reads, writes): computed once.
    units: tuple[str, ...] = field(init=False)
    # The key of the wallet's seeding (a tracked wallet's order with its wallet unit), read-only:
    # not one of `units`, as it orders nothing (the seeding is no entry of the stream).
    seed_unit: str | None = field(init=False)

    def __post_init__(self) -> None:
        units = tuple(u for u in (self.wallet_unit, self.token_unit) if u is not None)
        object.__setattr__(self, "units", units)
        tracked = self.wallet is not None and self.wallet_unit is not None
        object.__setattr__(self, "seed_unit", seed_unit(self.order.user) if tracked else None)


def plan(
    order: OrderFill,
    wallet: TrackedWallet | None,
    settings: RuleSettings,
    scope: Scope = Scope.ALL,
    seeded_at: int | None = None,
) -> Plan | None:
    """None when the order can neither emit nor change state (an untracked non-whale).

    `scope`: the rules of a wallet partition (whale, entry, exit: the wallet unit) or of a token
    partition (consensus: the token unit), or all of them. `seeded_at`: when the wallet's positions
    were seeded from `/positions` (None: never)."""
    passes = passes_filters(order, settings)
    by_wallet, by_token = scope is not Scope.TOKEN, scope is not Scope.WALLET
    whale = by_wallet and passes and order.notional_usd >= settings.whale_min_notional_usd
    tracked = wallet is not None
    # A whale has its wallet unit even without a cooldown to keep: the unit is what orders the
    # fill before its retraction across replicas.
    w_unit = wallet_unit(order.user, market_of(order)) if by_wallet and (tracked or whale) else None
    buys = by_token and tracked and order.side is Side.BUY
    t_unit = token_unit(order.token_id) if buys and passes else None
    if not (whale or w_unit or t_unit):
        return None
    return Plan(order, wallet, whale, w_unit, t_unit, seeded_at if tracked else None)


# --- the pure pieces ----------------------------------------------------------------------------


def micro_shares(order: OrderFill) -> int:
    """The fill's size in integer 10^-6 shares: positions add up without float drift."""
    return round(order.shares_normalized * 10**SHARE_DECIMALS)


def opens_position(side: Side, prior_micro_shares: int) -> bool:
    return side is Side.BUY and prior_micro_shares <= 0


def exits_position(side: Side, prior: int, size: int, min_fraction: float) -> bool:
    """A SELL of at least `min_fraction` of a known position (exact, in parts per million)."""
    return side is Side.SELL and prior > 0 and size * PPM >= round(min_fraction * PPM) * prior


def next_position(side: Side, prior_micro_shares: int, size_micro_shares: int) -> int:
    """BUY adds, SELL subtracts, floor 0."""
    delta = size_micro_shares if side is Side.BUY else -size_micro_shares
    return max(0, prior_micro_shares + delta)


def passes_filters(order: OrderFill, settings: RuleSettings) -> bool:
    """False for fills that emit no signal at all: tiny notionals, and BUYs of an outcome the
    market already calls decided, near-certain (>= SIGNAL_MAX_PRICE) or near-impossible (<=
    SIGNAL_MIN_PRICE: a $1 lottery ticket, or a loser bought after the result is public).

    Side-aware: a SELL near 1 takes profit and a SELL near 0 cuts a loss, both what a follower
    holding the token wants to know, so a SELL is never dropped for its price."""
    if order.notional_usd < settings.signal_min_notional_usd:
        return False
    if order.side is Side.SELL:
        return True
    return settings.signal_min_price < order.price < settings.signal_max_price


def is_late(order: OrderFill, settings: RuleSettings) -> bool:
    """The fill reached the ingestor more than SIGNAL_MAX_AGE_S after it traded.

    Both times travel in the fill, so every replica, every redelivery and the serial reference
    judge it alike; the detector's own clock at decision time would not."""
    max_age = settings.signal_max_age_s
    return max_age > 0 and order.received_at - order.timestamp > max_age


def cooldown_allows(last: int | None, ts: int, cooldown_s: int) -> bool:
    """No signal of this kind for this wallet x market (or token) within `cooldown_s` of `ts`."""
    return cooldown_s <= 0 or last is None or abs(ts - last) >= cooldown_s


def clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


def wallet_score(wallet: TrackedWallet | None) -> float:
    if wallet is None or wallet.score is None:
        return DEFAULT_SCORE
    return wallet.score


def size_factor(notional: float, threshold: float) -> float:
    """How big the fill is relative to the whale threshold, capped at 1."""
    return min(1.0, notional / threshold)


def entry_confidence(notional: float, threshold: float, score: float) -> float:
    """`clamp(0.5 * score + 0.5 * min(1, notional / threshold))`, for entries and exits."""
    return clamp(0.5 * score + 0.5 * size_factor(notional, threshold))


def whale_magnitude(notional: float, threshold: float) -> float:
    """`min(1, log10(notional / threshold))`, and 0 below the threshold."""
    if notional <= threshold:
        return 0.0
    return min(1.0, math.log10(notional / threshold))


def whale_confidence(notional: float, threshold: float, score: float) -> float:
    """`clamp(0.7 * (0.6 + 0.4 * whale_magnitude) + 0.3 * score)`."""
    return clamp(0.7 * (0.6 + 0.4 * whale_magnitude(notional, threshold)) + 0.3 * score)


def consensus_confidence(
    members: Mapping[str, Member], min_wallets: int, threshold: float
) -> float:
    """`clamp(0.4 * min(1, m / 2K) + 0.4 * mean score + 0.2 * min(1, total notional / T))`."""
    count = len(members)
    breadth = min(1.0, count / (2 * min_wallets))
    mean_score = sum(m.score for m in members.values()) / count
    total = sum(m.notional for m in members.values())
    return clamp(0.4 * breadth + 0.4 * mean_score + 0.2 * size_factor(total, threshold))


def join_consensus(
    state: ConsensusState, address: str, member: Member, settings: RuleSettings
) -> tuple[ConsensusState, int | None]:
    """The token's state after a tracked wallet's qualifying BUY, and the count to signal, if any.

    The window is `[clock - W, clock]`, both edges included; a buy older than that (a late fill)
    joins nothing. A wallet counts once, with its latest buy.
    """
    window, needed = settings.consensus_window_s, settings.consensus_min_wallets
    clock = max(state.clock, member.ts)
    members = dict(state.members)
    current = members.get(address)
    if member.ts >= clock - window and (current is None or member.ts >= current.ts):
        members[address] = member
    members = {a: m for a, m in members.items() if m.ts >= clock - window}
    count = len(members)
    if count < needed:
        return ConsensusState(clock, 0, 0, state.last_signal, members), None
    formed_at = state.formed_at if state.fired else clock
    after = ConsensusState(clock, formed_at, max(state.fired, count), state.last_signal, members)
    return after, (count if count > state.fired else None)


# --- decide -------------------------------------------------------------------------------------


# A consensus episode: (formed_at, fired, last_signal).
Episode = tuple[int, int, int | None]


def _episode(state: ConsensusState | None) -> Episode:
    return (0, 0, None) if state is None else (state.formed_at, state.fired, state.last_signal)


@dataclass(frozen=True)
class Effect:
    """What one decided order did, kept with it (in its done key) so that a retraction of the fill
    can undo it: the signals it emitted, the change of its wallet's position in its token, the
    consensus member its wallet had before (None: none), the cooldown stamps it moved (kind,
    before, after) and the consensus episode (formed_at, fired, last_signal) before and after."""

    signals: tuple[Signal, ...] = ()
    position_delta: int = 0
    joined: bool = False
    previous_member: Member | None = None
    stamps: tuple[tuple[str, int | None, int], ...] = ()
    episode: tuple[Episode, Episode] | None = None

    def dump(self) -> bytes:
        if not (self.signals or self.position_delta or self.joined or self.stamps or self.episode):
            return b"1"
        member = self.previous_member
        # Fragments: the signals are JSON already; parsing them to write them again was a
        # measurable share of the detector's time per order (bench/README.md).
        return orjson.dumps(
            {
                "signals": [orjson.Fragment(s.to_json()) for s in self.signals],
                "position_delta": self.position_delta,
                "joined": self.joined,
                "previous_member": None if member is None else list(vars(member).values()),
                "stamps": self.stamps,
                "episode": self.episode,
            }
        )

    @classmethod
    def load(cls, raw: bytes | None) -> Effect | None:
        """The effect kept in a done key; None when the order was never decided (or its record
        expired), an empty Effect when it had none."""
        if raw is None or raw.startswith(b"x:"):
            return None  # never decided, or retracted already (a tombstone)
        if raw == b"1":
            return cls()
        data = orjson.loads(raw)
        member = data["previous_member"]
        episode = data.get("episode")
        return cls(
            tuple(Signal.model_validate(s) for s in data["signals"]),
            int(data["position_delta"]),
            bool(data["joined"]),
            None if member is None else Member(*member),
            tuple((kind, before, after) for kind, before, after in data.get("stamps", ())),
            None if episode is None else (tuple(episode[0]), tuple(episode[1])),
        )

    def part(self, scope: Scope) -> Effect:
        """The share of the effect a lane of `scope` keeps: a wallet partition its signals but
        consensus, position and stamps; a token partition the consensus signal and member."""
        if scope is Scope.ALL:
            return self
        consensus = SignalKind.CONSENSUS
        if scope is Scope.WALLET:
            signals = tuple(s for s in self.signals if s.kind is not consensus)
            return Effect(signals, self.position_delta, stamps=self.stamps)
        signals = tuple(s for s in self.signals if s.kind is consensus)
        return Effect(
            signals, joined=self.joined, previous_member=self.previous_member, episode=self.episode
        )

    def merge(self, other: Effect) -> Effect:
        """One effect from two lanes' shares of it (a partition count lowered); a share both
        hold (copied to every partition by an earlier move) counts once."""
        ids = {(s.signal_id, s.status) for s in self.signals}
        signals = self.signals + tuple(
            s for s in other.signals if (s.signal_id, s.status) not in ids
        )
        return Effect(
            signals,
            self.position_delta or other.position_delta,
            self.joined or other.joined,
            self.previous_member or other.previous_member,
            self.stamps or other.stamps,
            self.episode or other.episode,
        )


@dataclass(frozen=True)
class Decision:
    """What one order does: the signals to emit, each unit's state after it (None: delete), the
    kinds its cooldowns held back, and its effect (for a retraction to undo)."""

    signals: tuple[Signal, ...]
    states: dict[str, UnitState | None]
    suppressed: tuple[SignalKind, ...] = ()
    effect: Effect = field(default_factory=Effect)


def decide(
    planned: Plan,
    states: Mapping[str, UnitState | None],
    settings: RuleSettings,
    detected_at: float,
) -> Decision:
    """Apply every rule to one order, given the state of its units just before it."""
    order, wallet = planned.order, planned.wallet
    ts, cooldown = order.timestamp, settings.signal_cooldown_s
    candidates: list[Signal] = []
    if planned.whale:
        candidates.append(whale_signal(order, wallet, settings, detected_at))
    after: dict[str, UnitState | None] = {}
    emitted: list[Signal] = []
    suppressed: list[SignalKind] = []
    delta, joined, previous = 0, False, None
    stamps: list[tuple[str, int | None, int]] = []
    episode: tuple[Episode, Episode] | None = None
    if planned.wallet_unit is None:
        emitted = candidates
    else:
        before = _wallet_state(states.get(planned.wallet_unit))
        positions = dict(before.positions)
        flows = dict(before.flows)
        horizon = ts - settings.accumulation_window_s
        fired = {sid: f for sid, f in before.fired.items() if f[0] >= horizon}
        if wallet is not None:
            holding = positions.get(order.token_id, 0)
            opens = _opens(order, holding, planned.seeded_at)
            if opens is not None:
                candidates = [s.model_copy(update={"opens_position": opens}) for s in candidates]
            candidates += _position_signals(planned, positions, settings, detected_at)
            candidates += _flow_signals(planned, holding, flows, settings, detected_at)
        last = dict(before.last_signal)
        for candidate in candidates:
            kind = candidate.kind.value
            if not cooldown_allows(last.get(kind), ts, cooldown):
                suppressed.append(candidate.kind)
                continue
            emitted.append(candidate)
            if cooldown > 0:
                last[kind] = max(ts, last.get(kind, ts))
        state = WalletMarketState(positions, last, flows, fired)
        after[planned.wallet_unit] = None if state.empty else state
        token = order.token_id
        delta = positions.get(token, 0) - before.positions.get(token, 0)
        stamps = [
            (kind, before.last_signal.get(kind), stamp)
            for kind, stamp in last.items()
            if before.last_signal.get(kind) != stamp
        ]
    if planned.token_unit is not None and wallet is not None:
        token_state = states.get(planned.token_unit)
        prior = token_state if isinstance(token_state, ConsensusState) else None
        consensus, signal, held = _consensus(order, wallet, prior, settings, detected_at)
        after[planned.token_unit] = consensus
        emitted += [signal] if signal else []
        suppressed += [held] if held else []
        member = consensus.members.get(order.user)
        joined = member is not None and member.order_key == order.order_key
        previous = prior.members.get(order.user) if prior is not None else None
        if _episode(prior) != _episode(consensus):
            episode = (_episode(prior), _episode(consensus))
    if emitted and is_late(order, settings):
        emitted = [mark_late(signal, order, settings) for signal in emitted]
    if planned.wallet_unit is not None and any(s.kind in FLOW_KINDS for s in emitted):
        after[planned.wallet_unit] = _remember_flows(after[planned.wallet_unit], emitted, ts)
    effect = Effect(tuple(emitted), delta, joined, previous, tuple(stamps), episode)
    return Decision(tuple(emitted), after, tuple(suppressed), effect)


def _remember_flows(state: UnitState | None, emitted: list[Signal], ts: int) -> WalletMarketState:
    """The unit with the accumulations / distributions just emitted remembered (`fired`), as
    emitted (late or not), the oldest dropped beyond FLOW_SIGNALS_KEPT."""
    before = _wallet_state(state)
    fired = dict(before.fired)
    for signal in emitted:
        if signal.kind in FLOW_KINDS:
            fired[signal.signal_id] = [ts, list(signal.order_keys), signal.to_json().decode()]
    kept = sorted(fired.items(), key=lambda item: item[1][0])[-FLOW_SIGNALS_KEPT:]
    return replace(before, fired=dict(kept))


def decision_key(order: OrderFill, entry_id: str) -> str:
    """What the order's decision is known by (its done key): the fill's order_key, or for a
    retraction that key and the retraction's own entry id (each retraction of a fill included
    again and orphaned again is its own; a redelivered one is a repeat)."""
    if order.status is not FillStatus.RETRACTED:
        return order.order_key
    return f"{order.order_key}:retracted:{entry_id}"


def confirmation_key(order: OrderFill) -> str:
    """What the confirmation of a fill decided while pending is known by (its done key)."""
    return f"{order.order_key}:confirmed"


def confirm(effect: Effect, detected_at: float) -> tuple[Signal, ...]:
    """The confirmation of a fill decided while pending: the signals it emitted then, repeated
    with status `confirmed` (same `signal_id`s). It changes no state and fires no rule again:
    the fill was decided once, when it was first seen."""
    confirmed = {"status": FillStatus.CONFIRMED, "detected_at": detected_at}
    return tuple(
        s.model_copy(update=confirmed) for s in effect.signals if s.status is FillStatus.PENDING
    )


def undo(
    planned: Plan,
    states: Mapping[str, UnitState | None],
    effect: Effect,
    detected_at: float,
) -> Decision:
    """A retraction of the fill `planned.order`: its effect undone on the units as they are now,
    and each signal it emitted repeated with status `retracted` and the reason.

    The position loses what the fill added (or gets back what it took, floor 0); the consensus gets
    back the wallet's previous member, unless a later buy has replaced the fill's since. The
    cooldown stamps and the consensus episode the fill moved go back when nothing has moved them
    since, so a fill included again is decided as the first time; a retraction itself never
    makes a signal fire. The fill leaves its run of small fills, and an accumulation /
    distribution it was an earlier member of (the unit's `fired`) is retracted with it, once."""
    order = planned.order
    after: dict[str, UnitState | None] = {}
    unit = planned.wallet_unit
    state = _wallet_state(states.get(unit) if unit is not None else None)
    flows = _without(state.flows, order.order_key)
    # The accumulations / distributions the fill was part of go with it: the one it completed is
    # among its effect's signals, those of which it was an earlier member are remembered in
    # `fired`. A retracted one stays there, marked (a fourth field), so that it goes once.
    drawn = {sid for sid, f in state.fired.items() if order.order_key in f[1]}
    gone = {sid for sid, f in state.fired.items() if len(f) > 3}
    own = {s.signal_id for s in effect.signals}
    members_of = tuple(
        Signal.model_validate_json(state.fired[sid][2]) for sid in drawn - own - gone
    )
    still = {
        sid: (f if sid not in drawn or sid in gone else [*f, 1]) for sid, f in state.fired.items()
    }
    signals = tuple(s for s in effect.signals if s.signal_id not in gone) + members_of
    changed = flows != state.flows or still != state.fired
    if unit is not None and (effect.position_delta or effect.stamps or changed):
        positions = dict(state.positions)
        position = max(0, positions.get(order.token_id, 0) - effect.position_delta)
        if position:
            positions[order.token_id] = position
        else:
            positions.pop(order.token_id, None)
        last = dict(state.last_signal)
        for kind, before, stamp in effect.stamps:
            if last.get(kind) == stamp:  # not moved since by a later signal
                if before is None:
                    last.pop(kind, None)
                else:
                    last[kind] = before
        undone = WalletMarketState(positions, last, flows, still)
        after[unit] = None if undone.empty else undone
    current = states.get(planned.token_unit) if planned.token_unit is not None else None
    if isinstance(current, ConsensusState) and planned.token_unit is not None:
        members = dict(current.members)
        mine = members.get(order.user)
        if effect.joined and mine is not None and mine.order_key == order.order_key:
            if effect.previous_member is None:
                members.pop(order.user)
            else:
                members[order.user] = effect.previous_member
        restored = replace(current, members=members)
        if effect.episode is not None and _episode(current) == effect.episode[1]:
            formed_at, fired, last_signal = effect.episode[0]
            restored = replace(restored, formed_at=formed_at, fired=fired, last_signal=last_signal)
        if restored != current:
            after[planned.token_unit] = restored
    update = {"status": FillStatus.RETRACTED, "status_reason": order.status_reason}
    retracted = tuple(s.model_copy(update={**update, "detected_at": detected_at}) for s in signals)
    return Decision(retracted, after)


def _without(flows: Mapping[str, list[list[Any]]], order_key: str) -> dict[str, list[list[Any]]]:
    """The runs without the fill `order_key` (a retraction takes it back), empty runs dropped."""
    kept = {key: [f for f in run if f[1] != order_key] for key, run in flows.items()}
    return {key: run for key, run in kept.items() if run}


def counts_towards_flow(order: OrderFill, settings: RuleSettings) -> bool:
    """A small fill that can be part of an accumulation (BUY) or distribution (SELL): under the
    whale threshold (a whale has its own signal), and for a BUY inside the price band (buying a
    decided outcome in small pieces tells no more than in one). Not the notional filter: small
    fills are what a run is made of."""
    if order.notional_usd >= settings.whale_min_notional_usd:
        return False
    if order.side is Side.SELL:
        return True
    return settings.signal_min_price < order.price < settings.signal_max_price


def _flow_signals(
    planned: Plan,
    prior: int,
    flows: dict[str, list[list[Any]]],
    settings: RuleSettings,
    detected_at: float,
) -> list[Signal]:
    """The accumulation / distribution the fill completes, if any; moves `flows` (in place).

    Each `<side>:<token>` run keeps the fills of the last ACCUMULATION_WINDOW_S (exchange time,
    by the newest fill); when it holds at least ACCUMULATION_MIN_FILLS fills worth at least
    ACCUMULATION_MIN_NOTIONAL_USD together, it signals and starts afresh, so a fill is in at most
    one such signal."""
    order, window = planned.order, settings.accumulation_window_s
    if settings.accumulation_min_notional_usd <= 0:
        return []
    horizon = order.timestamp - window
    for key in list(flows):  # the other runs age too, or a unit would keep them for ever
        flows[key] = [f for f in flows[key] if f[0] >= horizon]
        if not flows[key]:
            del flows[key]
    if in_snapshot(order, planned.seeded_at) or not counts_towards_flow(order, settings):
        return []
    key = f"{order.side.value}:{order.token_id}"
    entry = [order.timestamp, order.order_key, order.notional_usd, order.shares_normalized]
    pending = int(order.status is FillStatus.PENDING)
    # At most ACCUMULATION_MAX_FILLS: the oldest fill leaves when one more comes.
    run = [*flows.get(key, []), [*entry, int(prior == 0), pending]][-ACCUMULATION_MAX_FILLS:]
    total = sum(f[2] for f in run)
    if len(run) < settings.accumulation_min_fills or total < settings.accumulation_min_notional_usd:
        flows[key] = run
        return []
    flows.pop(key, None)
    return [flow_signal(planned, run, settings, detected_at)]


def _wallet_state(state: UnitState | None) -> WalletMarketState:
    return state if isinstance(state, WalletMarketState) else WalletMarketState()


def in_snapshot(order: OrderFill, seeded_at: int | None) -> bool:
    """The fill traded at or before the wallet's `/positions` snapshot: the seeded position holds
    it already, so it neither moves the position again nor opens or closes one."""
    return seeded_at is not None and order.timestamp <= seeded_at


def _opens(order: OrderFill, prior: int, seeded_at: int | None) -> bool | None:
    """`Signal.opens_position` of a tracked wallet's fill: a SELL never opens one; a BUY is known
    only once its positions were seeded (before, a holding from before tracking is invisible)."""
    if order.side is Side.SELL:
        return False  # a sell never opens a position
    if seeded_at is None or in_snapshot(order, seeded_at):
        return None
    return opens_position(order.side, prior)


def _position_signals(
    planned: Plan,
    positions: dict[str, int],
    settings: RuleSettings,
    detected_at: float,
) -> list[Signal]:
    """Entry/exit candidates; moves `positions` (in place) by the fill."""
    order, wallet, seeded_at = planned.order, planned.wallet, planned.seeded_at
    assert wallet is not None  # only tracked wallets keep positions
    if in_snapshot(order, seeded_at):
        return []
    prior = positions.get(order.token_id, 0)
    size = micro_shares(order)
    found: list[Signal] = []
    if passes_filters(order, settings):
        if opens_position(order.side, prior):
            entry = entry_signal(order, wallet, seeded_at, settings, detected_at)
            found.append(entry)
        elif exits_position(order.side, prior, size, settings.exit_min_fraction):
            found.append(exit_signal(order, wallet, prior, seeded_at, settings, detected_at))
    position = next_position(order.side, prior, size)
    if position:
        positions[order.token_id] = position
    else:
        positions.pop(order.token_id, None)
    return found


def _consensus(
    order: OrderFill,
    wallet: TrackedWallet,
    before: ConsensusState | None,
    settings: RuleSettings,
    detected_at: float,
) -> tuple[ConsensusState, Signal | None, SignalKind | None]:
    """The token's state after the buy, its consensus signal, or the kind its cooldown held."""
    state = before or ConsensusState()
    member = Member(
        order.timestamp, order.order_key, wallet.label, wallet_score(wallet), order.notional_usd
    )
    after, count = join_consensus(state, order.user, member, settings)
    if count is None:
        return after, None, None
    if not cooldown_allows(state.last_signal, order.timestamp, settings.signal_cooldown_s):
        return after, None, SignalKind.CONSENSUS
    if settings.signal_cooldown_s > 0:
        last = max(order.timestamp, state.last_signal or order.timestamp)
        after = replace(after, last_signal=last)
    grew_from = state.fired if state.fired else None
    return after, consensus_signal(order, wallet, after, grew_from, settings, detected_at), None


# --- the signals --------------------------------------------------------------------------------


def whale_signal(
    order: OrderFill, wallet: TrackedWallet | None, settings: RuleSettings, detected_at: float
) -> Signal:
    threshold = settings.whale_min_notional_usd
    notional = order.notional_usd
    confidence = whale_confidence(notional, threshold, wallet_score(wallet))
    reasons = [
        f"order of {_usd(notional)} >= whale threshold {_usd(threshold)} "
        f"({notional / threshold:.1f}x)",
        f"{_who(order, wallet)}: {_fill_text(order)}",
        _score_text(wallet),
        f"confidence {confidence:.2f} = 0.7 x (0.6 + 0.4 x min(1, log10(notional / threshold))) "
        "+ 0.3 x score",
    ]
    return _signal(SignalKind.WHALE_ORDER, order, wallet, confidence, reasons, detected_at)


def entry_signal(
    order: OrderFill,
    wallet: TrackedWallet,
    seeded_at: int | None,
    settings: RuleSettings,
    detected_at: float,
) -> Signal:
    """A BUY into a token the wallet holds none of, as far as the detector knows: a new position
    when its positions were seeded (`opens_position` true), else unknown (None)."""
    threshold = settings.whale_min_notional_usd
    notional = order.notional_usd
    confidence = entry_confidence(notional, threshold, wallet_score(wallet))
    if seeded_at is None:
        opened = "opened a position: no holding in this token since tracking started"
    else:
        opened = f"opened a new position: it held none of this token ({_known(seeded_at)})"
    reasons = [
        f"{_who(order, wallet)} {opened}",
        _fill_text(order),
        _score_text(wallet),
        *_size_confidence_text(notional, threshold, confidence),
    ]
    signal = _signal(SignalKind.TRADER_ENTRY, order, wallet, confidence, reasons, detected_at)
    return signal.model_copy(update={"opens_position": True if seeded_at is not None else None})


def exit_signal(
    order: OrderFill,
    wallet: TrackedWallet,
    prior: int,
    seeded_at: int | None,
    settings: RuleSettings,
    detected_at: float,
) -> Signal:
    threshold = settings.whale_min_notional_usd
    notional = order.notional_usd
    confidence = entry_confidence(notional, threshold, wallet_score(wallet))
    reasons = [
        f"{_who(order, wallet)} {_sold_text(micro_shares(order), prior, seeded_at)} "
        f">= exit fraction {settings.exit_min_fraction:.0%}",
        _fill_text(order),
        _score_text(wallet),
        *_size_confidence_text(notional, threshold, confidence),
    ]
    signal = _signal(SignalKind.TRADER_EXIT, order, wallet, confidence, reasons, detected_at)
    return signal.model_copy(update={"opens_position": False})


def _sold_text(size: int, prior: int, seeded_at: int | None) -> str:
    """What the sell did to the position we know, never more than we know: a wallet that sells
    more than we counted held shares we did not see (bought before tracking started, or through
    a route that is no fill: a split, a conversion), so "100%" would be a guess."""
    held = prior / 10**SHARE_DECIMALS
    known = _known(seeded_at)
    if size <= prior:
        return f"sold {size / prior:.0%} of its position ({held:,.2f} shares held, {known})"
    return (
        f"sold {size / 10**SHARE_DECIMALS:,.2f} shares, more than the {held:,.2f} we knew it "
        f"held ({known}): at least all of that position; what it held beyond is unknown"
    )


def _known(seeded_at: int | None) -> str:
    if seeded_at is None:
        return "counted from its fills since tracking started"
    at = datetime.fromtimestamp(seeded_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"per its /positions at {at} UTC and its fills since"


def flow_signal(
    planned: Plan, run: list[list[Any]], settings: RuleSettings, detected_at: float
) -> Signal:
    """An accumulation (BUYs) or distribution (SELLs): the run's fills, oldest first, in
    `order_keys`; `shares` and `notional_usd` their sums; `price` the last fill's (where the
    market is as the signal fires); confidence as an entry's, on the run's total."""
    order, wallet, seeded_at = planned.order, planned.wallet, planned.seeded_at
    buying = order.side is Side.BUY
    kind = SignalKind.ACCUMULATION if buying else SignalKind.DISTRIBUTION
    threshold = settings.whale_min_notional_usd
    total, shares = sum(f[2] for f in run), sum(f[3] for f in run)
    confidence = entry_confidence(total, threshold, wallet_score(wallet))
    span = _duration(run[-1][0] - run[0][0])
    outcome = f" {order.token_label!r}" if order.token_label else ""
    reasons = [
        f"{_who(order, wallet)} {'bought' if buying else 'sold'} {shares:,.2f} shares of"
        f"{outcome or ' this token'} in {len(run)} fills over {span} for {_usd(total)} (mean "
        f"price {total / shares:.3f}): at least {_usd(settings.accumulation_min_notional_usd)} "
        f"in at least {settings.accumulation_min_fills} fills, each under the whale threshold, "
        f"within {_duration(settings.accumulation_window_s)}",
        f"last fill: {_fill_text(order)}",
        _score_text(wallet),
        *_size_confidence_text(total, threshold, confidence),
    ]
    keys = [f[1] for f in run]
    signal = _signal(kind, order, wallet, confidence, reasons, detected_at)
    opens = (None if seeded_at is None else bool(run[0][4])) if buying else False
    # Pending while any of its fills was seen pending (entries of older units have no flag).
    pending = any(len(f) > 5 and f[5] for f in run) or order.status is FillStatus.PENDING
    return signal.model_copy(
        update={
            "signal_id": signal_id(kind, *keys),
            "order_keys": keys,
            "shares": shares,
            "notional_usd": total,
            "opens_position": opens,
            "status": FillStatus.PENDING if pending else FillStatus.CONFIRMED,
        }
    )


def consensus_signal(
    order: OrderFill,
    wallet: TrackedWallet,
    state: ConsensusState,
    grew_from: int | None,
    settings: RuleSettings,
    detected_at: float,
) -> Signal:
    """The consensus of `state` (count = its members), triggered by `order`.

    Its id names the token, the episode (`formed_at`) and the count, not an order: whichever
    replica decides it, it is the same signal.
    """
    members = sorted(state.members.items(), key=lambda item: (item[1].ts, item[0]))
    count, needed = len(members), settings.consensus_min_wallets
    threshold = settings.whale_min_notional_usd
    confidence = consensus_confidence(state.members, needed, threshold)
    hours = settings.consensus_window_s / 3600
    outcome = f"{order.token_label!r}" if order.token_label else "this token"
    names = ", ".join(m.label or f"{a[:6]}...{a[-4:]}" for a, m in members)
    change = f"grew from {grew_from} to {count}" if grew_from else f"formed with {count}"
    total = sum(m.notional for _, m in members)
    mean = sum(m.score for _, m in members) / count
    reasons = [
        f"{count} tracked wallets bought {outcome} within {hours:g} h: {names}",
        f"consensus {change} (K = {needed}) when {_who(order, wallet)} {_fill_text(order)}",
        f"mean wallet score {mean:.2f}; members' latest buys total {_usd(total)}",
        f"confidence {confidence:.2f} = 0.4 x min(1, {count} / {2 * needed}) + 0.4 x mean score "
        f"+ 0.2 x min(1, {_usd(total)} / {_usd(threshold)})",
    ]
    sid = signal_id(SignalKind.CONSENSUS, f"{order.token_id}|{state.formed_at}|{count}")
    signal = _signal(SignalKind.CONSENSUS, order, wallet, confidence, reasons, detected_at)
    return signal.model_copy(
        update={"signal_id": sid, "order_keys": [m.order_key for _, m in members]}
    )


def _signal(
    kind: SignalKind,
    order: OrderFill,
    wallet: TrackedWallet | None,
    confidence: float,
    reasons: list[str],
    detected_at: float,
) -> Signal:
    return Signal(
        signal_id=signal_id(kind, order.order_key),
        kind=kind,
        wallet=order.user,
        wallet_label=wallet.label if wallet else "",
        market_slug=order.market_slug,
        title=order.title,
        condition_id=order.condition_id,
        token_id=order.token_id,
        token_label=order.token_label,
        side=order.side,
        price=order.price,
        shares=order.shares_normalized,
        notional_usd=order.notional_usd,
        confidence=confidence,
        reasons=reasons,
        order_keys=[order.order_key],
        source=order.source,
        exchange_ts=order.timestamp,
        received_at=order.received_at,
        detected_at=detected_at,
        # A signal of a fill seen before its block says so; its confirmation repeats it.
        status=FillStatus.PENDING if order.status is FillStatus.PENDING else FillStatus.CONFIRMED,
    )


def mark_late(signal: Signal, order: OrderFill, settings: RuleSettings) -> Signal:
    """The signal of a late fill: `late` set, and a reason saying how late, kept before the last
    line so that the last one still spells out the confidence formula."""
    age = order.received_at - order.timestamp
    line = (
        f"late: the fill reached BetterBot {_duration(age)} after it traded (more than "
        f"SIGNAL_MAX_AGE_S = {_duration(settings.signal_max_age_s)}, e.g. read by a backfill): "
        "it tells what happened then, not a trade to follow now"
    )
    reasons = [*signal.reasons[:-1], line, *signal.reasons[-1:]]
    return signal.model_copy(update={"late": True, "reasons": reasons})


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size_confidence_text(notional: float, threshold: float, confidence: float) -> list[str]:
    return [
        f"size factor {size_factor(notional, threshold):.2f} = min(1, {_usd(notional)} / "
        f"{_usd(threshold)})",
        f"confidence {confidence:.2f} = 0.5 x score + 0.5 x size factor",
    ]


def _who(order: OrderFill, wallet: TrackedWallet | None) -> str:
    short = f"{order.user[:6]}...{order.user[-4:]}"
    return f"{wallet.label} ({short})" if wallet and wallet.label else short


def _fill_text(order: OrderFill) -> str:
    verb = "bought" if order.side is Side.BUY else "sold"
    outcome = f" {order.token_label!r}" if order.token_label else ""
    return (
        f"{verb} {order.shares_normalized:,.2f} shares of{outcome or ' token'} "
        f"at {order.price:.3f} ({_usd(order.notional_usd)})"
    )


def _score_text(wallet: TrackedWallet | None) -> str:
    if wallet is None:
        return f"untracked wallet: score {DEFAULT_SCORE} assumed"
    if wallet.score is None:
        return f"tracked wallet without a score: {DEFAULT_SCORE} assumed"
    return f"wallet score {wallet.score:.2f}"


def _usd(amount: float) -> str:
    return f"${amount:,.0f}" if amount >= 100 else f"${amount:,.2f}"


def describe(settings: RuleSettings) -> dict[str, Any]:
    """The settings as `{name: value}`, for logs and the replay report."""
    return {name: getattr(settings, name) for name in RuleSettings.__dataclass_fields__}
