"""Settings of the simulator, from the environment (unprefixed names such as SIM_PORT) or `.env`.

| env | default | meaning |
|---|---|---|
| SIM_HOST / SIM_PORT | 127.0.0.1 / 8765 | WebSocket, REST, /health, /metrics and /_sim (0: any) |
| SIM_API_KEY | empty | the one accepted key; empty accepts any non-empty key |
| SIM_MODE | tape | `tape` (replay SIM_TAPE) or `synthetic` (random trades at SIM_RATE) |
| SIM_TAPE | data/polymarket_trades_nobel2025.json | Data-API trades (a JSON list) |
| SIM_SPEED | 30 | tape seconds played per real second |
| SIM_LOOP | true | replay the tape again, with fresh hashes, when it ends |
| SIM_SEED / SIM_RATE | 42 / 100 | synthetic mode: random seed, orders per second |
| SIM_WALLETS_FILE | config/wallets.example.json | synthetic mode: the wallets that trade |
| SIM_WAIT_FOR_SUBSCRIBER | true | start the clock at the first WebSocket subscription |
| SIM_BLOCK_TIME_S | 2 | seconds between blocks of the simulated Polygon node (`/rpc`) |
| SIM_HISTORY_MAX | 1000000 | emitted trades kept for REST and the ground truth (oldest dropped) |
| SIM_SEND_QUEUE_MAX | 10000 | frames queued per client before it is cut off (close 1013) |
| SIM_MAX_SUBSCRIPTIONS | 500 | subscriptions per connection (Dome's Dev tier) |
| SIM_MAX_FILTER_VALUES | 500 | values per filter list (Dome's Dev tier: 500 wallets) |
| SIM_RESOLUTION | empty | resolution file: Gamma shows its markets closed, with payouts |
| SIM_POSITIONS_TAPE | empty | earlier tape: `/positions` holdings start from its trades |
| SIM_TAGS | data/nobel2025_tags.json | Gamma tags of the markets (`include_tag=true`) |
| SIM_REST_INDEX_LAG_S | 0 | fault: a trade is in REST orders only this long after its live event |
| SIM_UPDATE_DELAY_S | 0 | fault: a subscription `update` is applied this long after it arrives |
| SIM_MS_TIMESTAMP_EVERY | 0 | quirk: every n-th scheduled trade stamped in ms (0: none) |
| SIM_FUTURE_TIMESTAMP_EVERY | 0 | quirk: every n-th scheduled trade stamped in the future |
| SIM_FUTURE_TIMESTAMP_S | 3600 | quirk: how far in the future |
| SIM_TWIN_EVERY | 0 | quirk: every n-th scheduled trade has an identical twin in its tx |
| SIM_UNSTABLE_TIES | false | quirk: Data API pages order one second's trades differently |
| SIM_MAKER_EVERY | 0 | quirk: every n-th scheduled trade is a maker fill (Data API: takerOnly) |
| SIM_CDN_CACHE_S | 300 | the Data API's CDN: an identical URL is answered from cache this long |
| SIM_RTDS_DELAY_S | 0.65 | RTDS (`/rtds`): seconds from a trade to its frames |
| SIM_RTDS_EMPTY_FIRST_FRAME | false | RTDS quirk: an empty frame after the handshake |
| SIM_RTDS_CHECKSUM_WALLETS | false | RTDS quirk: `proxyWallet` checksum-cased |
| SIM_RTDS_OUTCOME_INDEX_999_EVERY | 0 | RTDS quirk: every n-th trade's `outcomeIndex` is 999 |
| SIM_RTDS_FEE_EVERY | 0 | RTDS quirk: only every n-th trade carries `fee` (0: none) |
| SIM_RTDS_TRADES_SILENT | false | RTDS fault: type `trades` silent, `orders_matched` works |
| SIM_RTDS_REJECT_CONNECTS | 0 | RTDS fault: the next n handshakes get HTTP 429 |
| SIM_PENDING_EVENTS | false | mempool: each trade pending first, emitted SIM_PENDING_LEAD_S later |
| SIM_PENDING_LEAD_S | 3 | seconds from a pending event to its block (the confirmed fill) |
| SIM_PENDING_DROP_EVERY | 0 | fault: every n-th pending fill never confirms (0: none) |
| SIM_PREDEXON_PLAN | pro | Predexon plan: `dev` 10 subscriptions x 10 items, `pro` 100 x 500 |
| SIM_PREDEXON_PING_S | 30 | seconds between Predexon's WebSocket pings |
| SIM_PREDEXON_IDLE_CLOSE_S | 120 | Predexon closes a connection without subscription this long |
| SIM_PREDEXON_EVENT_TYPE | event | quirk: event frames' `type`: `event`, `trade` or `alternate` |
| SIM_PREDEXON_FEE_REFUND_EVERY | 0 | quirk: a `fee_refund` event after every n-th fill (0: none) |
| SIM_POLYNODE_PLAN | paid | polynode: `free` (30 s `since`, session budget) or `paid` (300 s) |
| SIM_POLYNODE_SESSION_S | 3600 | free plan: seconds of session before it is ended and refused |
| SIM_POLYNODE_HEARTBEAT_S | 15 | seconds between polynode's `heartbeat` frames |
| SIM_POLYNODE_MAX_ITEMS | 10000 | polynode: filter items per subscription |
| LOG_LEVEL | INFO | |

Relative paths are read from the working directory, else from the project root, so the defaults
work from anywhere inside the checkout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from shared.settings import CommonSettings

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: Path) -> Path:
    if path.is_absolute() or path.exists():
        return path
    return PROJECT_ROOT / path


class SimulatorSettings(CommonSettings):
    sim_host: str = "127.0.0.1"
    sim_port: int = Field(default=8765, ge=0, le=65535)
    sim_api_key: SecretStr = SecretStr("")
    sim_mode: Literal["tape", "synthetic"] = "tape"
    sim_tape: Path = Path("data/polymarket_trades_nobel2025.json")
    sim_speed: float = Field(default=30.0, gt=0)
    sim_loop: bool = True
    sim_seed: int = 42
    sim_rate: float = Field(default=100.0, gt=0)
    sim_wallets_file: Path = Path("config/wallets.example.json")
    sim_wait_for_subscriber: bool = True
    # Seconds between two blocks of the simulated Polygon chain (`/rpc`); Polygon's is about 2.
    sim_block_time_s: float = Field(default=2.0, gt=0)
    sim_history_max: int = Field(default=1_000_000, ge=1)
    sim_send_queue_max: int = Field(default=10_000, ge=1)
    sim_max_subscriptions: int = Field(default=500, ge=1)
    sim_max_filter_values: int = Field(default=500, ge=1)
    # How the tape's markets resolved (e.g. data/nobel2025_resolution.json), served by Gamma;
    # empty: every market open, as during the tape.
    sim_resolution: str = ""
    # An earlier tape (Data-API trades): the wallets' history before the replay window, which
    # `/positions` adds up with the trades emitted since; empty: only those.
    sim_positions_tape: str = ""
    # The markets' Gamma tags (served with `include_tag=true`); empty: no tags.
    sim_tags: str = "data/nobel2025_tags.json"
    # Faults on from the start (the /_sim routes switch them at run time too; see `faults`, `feed`):
    # the REST index trails the live feed by this much, and updates are applied this late.
    sim_rest_index_lag_s: float = Field(default=0.0, ge=0)
    sim_update_delay_s: float = Field(default=0.0, ge=0)
    # The CLOB price history (`/prices-history`) trails the trades by this much.
    sim_prices_lag_s: float = Field(default=0.0, ge=0)
    # Quirks of the real feeds (`trades.Quirks`; the simulator's `quirks` switches them live):
    # timestamps in milliseconds or in the future, identical fills in one transaction, and the
    # Data API's order of same-second trades changing from page to page.
    sim_ms_timestamp_every: int = Field(default=0, ge=0)
    sim_future_timestamp_every: int = Field(default=0, ge=0)
    sim_future_timestamp_s: int = Field(default=3600, ge=1)
    sim_twin_every: int = Field(default=0, ge=0)
    sim_unstable_ties: bool = False
    sim_maker_every: int = Field(default=0, ge=0)
    # Polymarket's CDN answers an identical Data API URL from its cache for up to 300 s
    # (`cf-cache-status: HIT`); 0 turns the simulated cache off (`POST /_sim/cdn` at run time).
    sim_cdn_cache_s: float = Field(default=300.0, ge=0)
    # Polymarket's unofficial RTDS `activity` firehose at `/rtds` (`services/simulator/rtds.py`;
    # `POST /_sim/rtds` switches all of these live, and freezes open sockets).
    sim_rtds_delay_s: float = Field(default=0.65, ge=0)
    sim_rtds_empty_first_frame: bool = False
    sim_rtds_checksum_wallets: bool = False
    sim_rtds_outcome_index_999_every: int = Field(default=0, ge=0)
    sim_rtds_fee_every: int = Field(default=0, ge=0)
    sim_rtds_trades_silent: bool = False
    sim_rtds_reject_connects: int = Field(default=0, ge=0)
    # Dome's successors (`services/simulator/successors.py`; `/_sim/pending`, `/_sim/predexon`,
    # `/_sim/polynode` switch them live): the mempool's pending events and the fills it drops,
    # Predexon's plan, pings, idle close and event quirks, polynode's plan and heartbeats.
    sim_pending_events: bool = False
    sim_pending_lead_s: float = Field(default=3.0, ge=0)
    sim_pending_drop_every: int = Field(default=0, ge=0)
    sim_predexon_plan: Literal["dev", "pro"] = "pro"
    sim_predexon_ping_s: float = Field(default=30.0, gt=0)
    sim_predexon_idle_close_s: float = Field(default=120.0, gt=0)
    sim_predexon_event_type: Literal["event", "trade", "alternate"] = "event"
    sim_predexon_fee_refund_every: int = Field(default=0, ge=0)
    sim_polynode_plan: Literal["free", "paid"] = "paid"
    sim_polynode_session_s: float = Field(default=3600.0, ge=0)
    sim_polynode_heartbeat_s: float = Field(default=15.0, gt=0)
    sim_polynode_max_items: int = Field(default=10_000, ge=1)
