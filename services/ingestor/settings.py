"""The ingestor's settings, from the environment (unprefixed names) or `.env`.

Defaults work with the bundled simulator on 127.0.0.1:8765 and the local Redis. The tier limits
default to Dome's Dev tier; `DOME_TIER=free|dev` fills in that tier's limits (subscriptions,
wallets per subscription, REST rate) for every limit not set explicitly, `custom` (the default)
takes each limit from its own setting. docs/ingestion.md explains every setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from services.ingestor.chain.events import V2_EXCHANGES
from shared.models import MAX_FUTURE_S, MIN_EXCHANGE_TS, ExchangeTimeBounds, normalize_address
from shared.settings import CommonSettings

MIB = 1 << 20
PROJECT_ROOT = Path(__file__).resolve().parents[2]

IngestSource = Literal["dome_ws", "dome_rest", "data_api", "polygon", "rtds"]
INGEST_SOURCES: tuple[IngestSource, ...] = ("dome_ws", "dome_rest", "data_api", "polygon", "rtds")


@dataclass(frozen=True)
class Tier:
    max_subscriptions: int
    wallets_per_subscription: int
    subscriptions_per_connection: int
    # None: the plan publishes no REST rate; DOME_REST_RATE_* keep their own values.
    rest_rate_per_s: float | None
    rest_rate_per_10s: int | None


# Published limits (feeds.md): subscriptions x wallets, and REST requests per s / per 10 s. Dome's
# `free` and `dev`; Predexon's plans (`predexon_dev`, `predexon_pro`: subscriptions x items).
TIERS: dict[str, Tier] = {
    "free": Tier(2, 5, 2, 10, 100),
    "dev": Tier(500, 500, 500, 100, 500),
    "predexon_dev": Tier(10, 10, 10, None, None),
    "predexon_pro": Tier(100, 500, 100, None, None),
}
TierName = Literal["free", "dev", "predexon_dev", "predexon_pro", "custom"]
_TIER_FIELDS = {
    "dome_max_subscriptions": "max_subscriptions",
    "dome_wallets_per_subscription": "wallets_per_subscription",
    "dome_subscriptions_per_connection": "subscriptions_per_connection",
    "dome_rest_rate_per_s": "rest_rate_per_s",
    "dome_rest_rate_per_10s": "rest_rate_per_10s",
}


class IngestorSettings(CommonSettings):
    ops_port: int = 8082

    # Which feeds to read, comma-separated: dome_ws (WebSocket + REST gap backfill), dome_rest
    # (REST polling), data_api (Polymarket's public Data API, no key), polygon (the chain), rtds
    # (Polymarket's unofficial RTDS firehose, best beside another). Overlaps are deduplicated.
    ingest_sources: str = "dome_ws"
    # The seed's switch: false turns dome_ws into dome_rest (polling).
    dome_use_websocket: bool = True

    # free | dev (Dome), predexon_dev | predexon_pro (Predexon's plans) fill in that tier's limits
    # below unless set explicitly; custom uses them as set.
    dome_tier: TierName = "custom"
    # Dome puts the key in the URL path (`<DOME_WS_URL>/<key>`); it is never logged or shown.
    dome_api_key: SecretStr = SecretStr("demo-key")
    # dome: Dome's protocol; polynode: its Dome-compatible successor (`<DOME_WS_URL>?key=<key>`,
    # subscribe `{"action":"subscribe","type":"dome","filters":{"wallets":[..]}}`).
    # predexon: Dome's protocol at `<DOME_WS_URL>/<key>` (DOME_WS_URL=wss://wss.predexon.com/v1).
    dome_dialect: Literal["dome", "polynode", "predexon"] = "dome"
    # The polynode key; empty: DOME_API_KEY is used for the WebSocket in that dialect too.
    polynode_api_key: SecretStr = SecretStr("")
    # The Predexon key; empty: DOME_API_KEY is used for the WebSocket in that dialect too.
    predexon_api_key: SecretStr = SecretStr("")
    # predexon: ask for pending (pre-block) events too (`"status":"all"` in the filters); they are
    # published with status `pending`, then again `confirmed` under the same order_key.
    predexon_status_all: bool = False
    # polynode: the same (`"status":"all"`); its pending events have a null block and log index.
    polynode_status_all: bool = False
    # polynode: every subscribe asks the server to replay this many seconds (`since`, a number of
    # seconds), a first gap backfill before the REST one; the plan bounds it (free 30 s, paid up
    # to 300 s). 0: off.
    polynode_since_s: float = Field(default=30.0, ge=0, le=300)
    # polynode: `&compress=zlib`, event frames arrive as binary raw deflate (inflated here, bounded
    # by DOME_MAX_FRAME_BYTES); control messages stay JSON text.
    polynode_compress: bool = False
    # The provider refused for the plan (Predexon ITEMS_LIMIT / CONNECTION_LIMIT / INVALID_FILTERS,
    # polynode's daily session used up): wait from DOME_RECONNECT_MAX_S, doubling up to this,
    # between attempts, never a hot reconnect loop.
    dome_plan_limit_wait_s: float = Field(default=900.0, gt=0)
    dome_ws_url: str = "ws://127.0.0.1:8765"
    # REST base for polling and gap backfill (`Authorization: Bearer <DOME_API_KEY>`).
    dome_api_url: str = "http://127.0.0.1:8765/v1"

    dome_max_subscriptions: int = Field(default=500, ge=1)
    dome_wallets_per_subscription: int = Field(default=500, ge=1)
    # Subscriptions one connection carries; more subscriptions open more connections.
    dome_subscriptions_per_connection: int = Field(default=500, ge=1)
    dome_max_connections: int = Field(default=10, ge=1)
    dome_rest_rate_per_s: float = Field(default=100.0, gt=0)
    dome_rest_rate_per_10s: int = Field(default=500, ge=1)
    # Orders per REST page (Dome allows 1..1000).
    dome_rest_page_limit: int = Field(default=1000, ge=1, le=1000)
    # REST polling: the shortest time between two polls of the same wallet.
    dome_poll_interval_s: float = Field(default=2.0, ge=0)
    # A relative path is read from the working directory, else from the project root. The file
    # seeds the wallet registry in Redis the first time; after that the registry is the truth.
    wallets_file: str = "config/wallets.example.json"

    # Polymarket's Data API (`https://data-api.polymarket.com` in production; the simulator
    # serves `/trades` too). Public limit reported near 200 requests per 10 s.
    data_api_url: str = "http://127.0.0.1:8765"
    data_api_rate_per_s: float = Field(default=10.0, gt=0)
    data_api_rate_per_10s: int = Field(default=150, ge=1)
    # Rows per `/v2/trades` page (the API's cap is 1,000).
    data_api_page_limit: int = Field(default=500, ge=1, le=1000)
    data_api_poll_interval_s: float = Field(default=5.0, ge=0)
    # How long the Data API's CDN may answer an identical URL from its cache (Cloudflare, up to
    # 300 s): a URL asked within this long is not asked again unchanged (sources/data_api.py).
    data_api_cdn_cache_s: float = Field(default=300.0, ge=0)

    # Gap backfill after every (re)connect: where from, how far back.
    backfill_via: Literal["dome_rest", "data_api", "off"] = "dome_rest"
    # Re-read this much before a wallet's watermark, for fills indexed late or out of order.
    backfill_overlap_s: int = Field(default=120, ge=0)
    # A wallet with no watermark yet (first start, newly tracked) is read this far back.
    backfill_initial_lookback_s: int = Field(default=3600, ge=0)
    # The provider's REST index may trail its live feed by up to this: every backfill pass is
    # followed by a second one this much later, reaching back this much before the first (0: no
    # second pass). Dome publishes no bound; 10 s covers the few seconds peers report.
    backfill_indexing_lag_s: float = Field(default=10.0, ge=0)
    # Wallets are backfilled one at a time; a wallet whose read failed is retried on the side (its
    # own backoff, DOME_RECONNECT_MIN_S..MAX_S), up to this many at once, so one slow or failing
    # wallet holds back no other.
    backfill_retry_concurrency: int = Field(default=4, ge=1)
    # Dome sends no reply to a subscription `update`: assume the server applies one within this.
    # A wallet added by an update is read again once this (plus the indexing lag) has passed, and
    # only then counts as caught up.
    dome_update_apply_s: float = Field(default=10.0, ge=0)
    http_timeout_s: float = Field(default=10.0, gt=0)

    # Plausible exchange times, on every source: a fill stamped more than this many seconds after
    # it was received, or before EXCHANGE_TS_MIN (default 2020-01-01), is dead-lettered with the
    # reason (milliseconds, a broken clock) and never reaches a watermark or the detector.
    exchange_ts_max_future_s: int = Field(default=MAX_FUTURE_S, ge=0)
    exchange_ts_min: int = Field(default=MIN_EXCHANGE_TS, ge=0)

    # Reconnect backoff: doubles from min to max, with jitter; reset once a connection has stayed
    # up for `dome_stable_after_s`. Auth failures wait the maximum.
    dome_reconnect_min_s: float = Field(default=1.0, gt=0)
    dome_reconnect_max_s: float = Field(default=60.0, gt=0)
    dome_stable_after_s: float = Field(default=30.0, ge=0)
    # WebSocket keepalive: a ping every interval; no pong within the timeout = dead connection.
    dome_ping_interval_s: float = Field(default=10.0, gt=0)
    dome_ping_timeout_s: float = Field(default=10.0, gt=0)
    dome_open_timeout_s: float = Field(default=10.0, gt=0)
    dome_close_timeout_s: float = Field(default=2.0, gt=0)
    # No frame at all for this long while subscribed = a frozen feed: replace the connection (and
    # so backfill). Pings prove the link, not the feed. 0 turns it off. See docs/ingestion.md.
    dome_silence_timeout_s: float = Field(default=300.0, ge=0)
    # Frames above this are rejected and dead-lettered (their first bytes); the socket's own hard
    # limit is a multiple of it, see `sources.ws_connection.HARD_LIMIT_FACTOR`.
    dome_max_frame_bytes: int = Field(default=MIB, ge=1024)

    # --- polygon: OrderFilled logs over a Polygon JSON-RPC WebSocket (docs/ingestion.md) ---
    # Comma-separated; the first that works is used, the next on error, 429 or stall. They usually
    # carry a provider key: secret, never logged (endpoints are named by position).
    polygon_ws_urls: SecretStr = SecretStr("ws://127.0.0.1:8765/rpc")
    # The exchange contracts whose logs are read; default the two CLOB V2 exchanges.
    polygon_exchanges: str = ",".join(V2_EXCHANGES)
    # 0: publish a fill on first sight (a later reorg is reported, not undone); N: only once its
    # block has N successors (about 2 s each), reading settled blocks only.
    polygon_confirmations: int = Field(default=2, ge=0, le=256)
    # Up to this many wallets go into the topic filter; above, every fill is read, kept here.
    polygon_max_wallets_per_filter: int = Field(default=1000, ge=0)
    # Blocks per eth_getLogs (providers cap it, commonly 1k-10k); a refused range is halved.
    polygon_getlogs_max_blocks: int = Field(default=1000, ge=1)
    # /health turns red when more settled blocks than this wait to be read (30 blocks ~ 1 min).
    polygon_max_lag_blocks: int = Field(default=30, ge=1)
    # No new head for this long = a stalled endpoint: fail over.
    polygon_stall_timeout_s: float = Field(default=30.0, gt=0)
    # After this long on a fallback endpoint, try the first again.
    polygon_failback_after_s: float = Field(default=300.0, gt=0)
    # First start (no block watermark): read this many blocks back (1,800 blocks ~ 1 hour).
    polygon_initial_lookback_blocks: int = Field(default=1800, ge=0)
    # A wallet added while running: its own fills this many blocks back, then it joins the filter.
    polygon_new_wallet_lookback_blocks: int = Field(default=1800, ge=0)
    # A JSON-RPC call unanswered this long = a dead connection.
    polygon_call_timeout_s: float = Field(default=30.0, gt=0)
    # Polymarket's Gamma API: token -> market, slug, title, outcome (the simulator serves it too).
    gamma_api_url: str = "http://127.0.0.1:8765"
    # The longest a fill waits for its market's metadata; later it goes out without it.
    market_lookup_timeout_s: float = Field(default=1.0, gt=0)

    # --- rtds: Polymarket's unofficial RTDS `activity` firehose, an extra source only ---
    # (docs/ingestion.md, "The rtds source"). Every trade of the exchange arrives; the tracked
    # wallets' are kept. The simulator serves it at `ws://127.0.0.1:8765/rtds`.
    rtds_url: str = "wss://ws-live-data.polymarket.com"
    # The client sends the text `ping` this often (the official client's 5 s).
    rtds_ping_interval_s: float = Field(default=5.0, gt=0)
    # No payload (of any wallet) for this long = a frozen socket: open a new one, and backfill.
    # The maintainers' advice is ~15 s; 0 turns the watchdog off.
    rtds_payload_timeout_s: float = Field(default=15.0, ge=0)
    # Where the gap after each new socket is read from (keyless Data API by default).
    rtds_backfill_via: Literal["data_api", "dome_rest", "off"] = "data_api"

    # How long an order_key is remembered for dedupe (s): covers reconnect replays and backfill.
    dedupe_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    # A pending (mempool) fill not confirmed by any source within this bound is retracted
    # (services/ingestor/pending.py); its deadline is kept in Redis, so a restart keeps it.
    pending_confirm_timeout_s: float = Field(default=60.0, gt=0)
    # How often the due pending deadlines are looked at.
    pending_sweep_interval_s: float = Field(default=1.0, gt=0)
    # Fills waiting for Redis; when full the socket reader waits (backpressure), nothing dropped.
    publish_queue_size: int = Field(default=10_000, ge=1)
    # Most fills published in one Lua call when several are already waiting.
    publish_batch_max: int = Field(default=500, ge=1, le=5_000)
    # /health turns red after a source has been down (no connection, failing polls) this long.
    health_max_disconnected_s: float = Field(default=60.0, gt=0)
    # /health also turns red after this long without any event; 0 = off (quiet wallets are normal).
    health_max_event_silence_s: float = Field(default=0.0, ge=0)
    # /health reports "degraded" (still 200) while a wallet's backfill has not completed for
    # this long (its REST history keeps failing); the wallets behind are in /health and metrics.
    health_max_backfill_behind_s: float = Field(default=300.0, gt=0)
    # How often the feed status hash is written for the dashboard.
    status_interval_s: float = Field(default=1.0, gt=0)
    # On SIGTERM, how long to keep trying to publish what is queued before giving up.
    shutdown_flush_timeout_s: float = Field(default=10.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _tier_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        tier_name = data.get("dome_tier")
        if isinstance(tier_name, str):
            data["dome_tier"] = tier_name = tier_name.strip().lower()
        tier = TIERS.get(tier_name) if isinstance(tier_name, str) else None
        if tier is not None:
            for field, attribute in _TIER_FIELDS.items():
                if getattr(tier, attribute) is not None:
                    data.setdefault(field, getattr(tier, attribute))
        return data

    @field_validator("dome_ws_url", "rtds_url")
    @classmethod
    def _websocket_scheme(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("DOME_WS_URL and RTDS_URL must start with ws:// or wss://")
        return value.rstrip("/")

    @field_validator("dome_api_url", "data_api_url", "gamma_api_url")
    @classmethod
    def _http_scheme(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                "DOME_API_URL, DATA_API_URL and GAMMA_API_URL must start with http:// or https://"
            )
        return value.rstrip("/")

    @field_validator("polygon_ws_urls")
    @classmethod
    def _polygon_urls(cls, value: SecretStr) -> SecretStr:
        urls = [url.strip() for url in value.get_secret_value().split(",") if url.strip()]
        if not urls or not all(url.startswith(("ws://", "wss://")) for url in urls):
            # The value is not echoed: it carries provider keys.
            raise ValueError("POLYGON_WS_URLS must list ws:// or wss:// URLs, comma-separated")
        return SecretStr(",".join(urls))

    @field_validator("polygon_exchanges")
    @classmethod
    def _exchange_addresses(cls, value: str) -> str:
        try:
            addresses = [
                normalize_address(part.strip()) for part in value.split(",") if part.strip()
            ]
        except ValueError as exc:
            raise ValueError(f"POLYGON_EXCHANGES: {exc}") from None
        if not addresses:
            raise ValueError("POLYGON_EXCHANGES must list at least one contract address")
        return ",".join(dict.fromkeys(addresses))

    @field_validator("ingest_sources")
    @classmethod
    def _known_sources(cls, value: str) -> str:
        names = [name.strip().lower() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in INGEST_SOURCES]
        if unknown or not names:
            raise ValueError(
                f"INGEST_SOURCES must list some of {', '.join(INGEST_SOURCES)}; got {value!r}"
            )
        return ",".join(dict.fromkeys(names))

    @model_validator(mode="after")
    def _backoff_bounds(self) -> IngestorSettings:
        if self.dome_reconnect_max_s < self.dome_reconnect_min_s:
            raise ValueError("DOME_RECONNECT_MAX_S must be at least DOME_RECONNECT_MIN_S")
        return self

    def sources(self) -> tuple[IngestSource, ...]:
        """The feeds to run, with DOME_USE_WEBSOCKET=false turning dome_ws into dome_rest."""
        names: list[IngestSource] = []
        for name in self.ingest_sources.split(","):
            source: IngestSource = name  # type: ignore[assignment]
            if source == "dome_ws" and not self.dome_use_websocket:
                source = "dome_rest"
            if source not in names:
                names.append(source)
        return tuple(names)

    def websocket_key(self) -> str:
        own = {"polynode": self.polynode_api_key, "predexon": self.predexon_api_key}.get(
            self.dome_dialect
        )
        if own is not None and own.get_secret_value():
            return own.get_secret_value()
        return self.dome_api_key.get_secret_value()

    def pending_events(self) -> bool:
        """Whether this dialect's subscribes ask for pending (pre-block) events too."""
        if self.dome_dialect == "polynode":
            return self.polynode_status_all
        return self.dome_dialect == "predexon" and self.predexon_status_all

    def dome_ws_endpoint(self) -> str:
        """The URL to connect to, key included: pass it to the client only, never to a log."""
        key = self.websocket_key()
        if self.dome_dialect == "polynode":
            separator = "&" if "?" in self.dome_ws_url else "?"
            query = {"key": key} | ({"compress": "zlib"} if self.polynode_compress else {})
            return f"{self.dome_ws_url}{separator}{urlencode(query)}"
        return f"{self.dome_ws_url}/{key}"

    def exchange_time_bounds(self) -> ExchangeTimeBounds:
        return ExchangeTimeBounds(self.exchange_ts_max_future_s, self.exchange_ts_min)

    def polygon_urls(self) -> tuple[str, ...]:
        """The RPC endpoints, keys included: pass them to the client only, never to a log."""
        return tuple(self.polygon_ws_urls.get_secret_value().split(","))

    def secrets(self) -> list[str]:
        """Every key this configuration holds, to be scrubbed from logs."""
        values = [
            self.dome_api_key.get_secret_value(),
            self.polynode_api_key.get_secret_value(),
            self.predexon_api_key.get_secret_value(),
        ]
        for url in self.polygon_urls() if "polygon" in self.sources() else ():
            values += [url, *_key_like_parts(url)]
        # The polynode key travels URL-encoded in the query string.
        values += [urlencode({"k": value})[2:] for value in values]
        return [value for value in dict.fromkeys(values) if value]

    def wallets_path(self) -> Path:
        path = Path(self.wallets_file)
        if path.is_absolute() or path.exists():
            return path
        return PROJECT_ROOT / path


KEY_MIN_CHARS = 16


def _key_like_parts(url: str) -> list[str]:
    """The parts of an RPC URL long enough to be a provider key: path segments (Alchemy, Infura),
    query values and the first host label (QuickNode-style subdomains). Short words such as `v2`
    or `polygon` stay readable in logs."""
    parts = urlsplit(url)
    candidates = parts.path.split("/") + [value for _, value in parse_qsl(parts.query)]
    candidates.append((parts.hostname or "").split(".")[0])
    if parts.password:
        candidates.append(parts.password)
    return [part for part in candidates if len(part) >= KEY_MIN_CHARS]
