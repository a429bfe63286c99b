"""The polygon source: Polymarket's OrderFilled logs read from the chain (source.py), decoded
with eth-abi (events.py), over JSON-RPC WebSockets (rpc.py), with market metadata from Gamma
(markets.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from services.ingestor.chain.source import PolygonSource
    from services.ingestor.publisher import Publisher
    from services.ingestor.settings import IngestorSettings

# Gamma is public and cached (one request per token a day): a pace that lets a cold start look
# up a few hundred markets in a minute without looking like abuse.
GAMMA_RATE_PER_S = 10.0
GAMMA_RATE_PER_10S = 100


def polygon_source(
    settings: IngestorSettings, wallets: list[str], publisher: Publisher, redis: aioredis.Redis
) -> PolygonSource:
    from services.ingestor.chain.markets import MarketDirectory
    from services.ingestor.chain.source import ChainSettings, PolygonSource
    from services.ingestor.http_api import JsonApi
    from services.ingestor.ratelimit import RateLimiter

    s = settings
    gamma = JsonApi(
        "gamma",
        s.gamma_api_url,
        RateLimiter(GAMMA_RATE_PER_S, GAMMA_RATE_PER_10S),
        timeout_s=s.http_timeout_s,
    )
    markets = MarketDirectory(
        redis,
        gamma,
        key_prefix=f"{s.stream_namespace}market:token:",
        timeout_s=s.market_lookup_timeout_s,
    )
    chain = ChainSettings(
        urls=s.polygon_urls(),
        exchanges=tuple(s.polygon_exchanges.split(",")),
        confirmations=s.polygon_confirmations,
        max_wallets_per_filter=s.polygon_max_wallets_per_filter,
        getlogs_max_blocks=s.polygon_getlogs_max_blocks,
        stall_timeout_s=s.polygon_stall_timeout_s,
        failback_after_s=s.polygon_failback_after_s,
        initial_lookback_blocks=s.polygon_initial_lookback_blocks,
        new_wallet_lookback_blocks=s.polygon_new_wallet_lookback_blocks,
        open_timeout_s=s.dome_open_timeout_s,
        call_timeout_s=s.polygon_call_timeout_s,
        reconnect_min_s=s.dome_reconnect_min_s,
        reconnect_max_s=s.dome_reconnect_max_s,
        # eth_getLogs answers can be large (a busy range); the range cap bounds them.
        max_frame_bytes=max(s.dome_max_frame_bytes, 16 << 20),
        max_lag_blocks=s.polygon_max_lag_blocks,
        time_bounds=s.exchange_time_bounds(),
    )
    return PolygonSource(chain, wallets, publisher, markets)
