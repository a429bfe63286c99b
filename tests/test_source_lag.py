"""Each source's lag behind the first one to deliver a fill, counted by the publishing script in
real Redis and read back as the dashboard reads it."""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.models import FillStatus, OrderFill, Source
from shared.orders_raw import Delivery, OrdersRaw, Outgoing
from shared.source_lag import BUCKETS_MS, SourceLag, lag_hash, quantile, read_source_lag
from shared.streams import Streams
from tests.test_detector_rules import make_order

T0 = 1_760_000_000.0


def copy(fill: OrderFill, source: Source, received_at: float) -> OrderFill:
    return fill.model_copy(update={"source": source, "received_at": received_at})


def by_source(lags: list[SourceLag]) -> dict[str, SourceLag]:
    return {lag.source: lag for lag in lags}


async def test_the_second_source_is_measured_against_the_first(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    streams = Streams(namespace, 1)
    orders = OrdersRaw(redis_client, streams, stream_maxlen=100, dedupe_ttl_s=60)
    fills = [make_order(received_at=T0 + i) for i in range(4)]
    first = await orders.deliver(
        [Outgoing(copy(f, Source.POLYGON, T0 + i)) for i, f in enumerate(fills)]
    )
    assert [d.added for d in first] == [True] * 4 and {d.lag_s for d in first} == {None}
    lags_s = [0.2, 1.5, 4.0, 200.0]
    later = [
        Outgoing(copy(f, Source.DATA_API, T0 + i + lag))
        for i, (f, lag) in enumerate(zip(fills, lags_s, strict=True))
    ]
    second = await orders.deliver(later)
    assert [d.added for d in second] == [False] * 4
    assert [d.lag_s for d in second] == lags_s
    # The same source again (a resend, a backfill reading again) is not behind itself.
    again = await orders.deliver([Outgoing(copy(fills[0], Source.POLYGON, T0 + 30))])
    assert again[0].lag_s is None and not again[0].added
    # Nor is a poller reading the same fill again behind a second time.
    reread = await orders.deliver([Outgoing(copy(fills[1], Source.DATA_API, T0 + 60))])
    assert reread[0].lag_s is None and not reread[0].added

    figures = by_source(await read_source_lag(redis_client, streams))
    assert figures["polygon"] == SourceLag("polygon", 4, 0, None, None, None, None)
    data_api = figures["data_api"]
    assert (data_api.first, data_api.behind) == (0, 4)
    assert data_api.lag_max_s == 200.0
    assert data_api.lag_mean_s == round(sum(lags_s) / 4, 3)
    # Two of four lags are at or under 2 s (buckets 250 ms and 2 s): the median's bound is 2 s.
    assert data_api.lag_p50_s == 2.0
    assert data_api.lag_p90_s == 200.0  # past the 120 s bound: the 300 s bucket, capped at the max


async def test_statuses_count_apart_and_a_held_back_fill_counts_nothing(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    streams = Streams(namespace, 1)
    orders = OrdersRaw(redis_client, streams, stream_maxlen=100, dedupe_ttl_s=60)
    fill = make_order()
    pending = copy(fill, Source.POLYNODE, T0).model_copy(update={"status": FillStatus.PENDING})
    confirmed_chain = copy(fill, Source.POLYGON, T0 + 5)
    confirmed_polynode = copy(fill, Source.POLYNODE, T0 + 6)
    deliveries = await orders.deliver(
        [Outgoing(pending), Outgoing(confirmed_chain), Outgoing(confirmed_polynode)]
    )
    assert [d.added for d in deliveries] == [True, True, False]
    assert deliveries[2].lag_s == 1.0
    retracted = confirmed_chain.model_copy(update={"status": FillStatus.RETRACTED})
    await orders.deliver([Outgoing(retracted)])
    # A late copy from a source other than the chain stays out, and is not a lag.
    late = await orders.deliver([Outgoing(copy(fill, Source.DATA_API, T0 + 60))])
    assert late[0] == Delivery(False, None)
    figures = by_source(await read_source_lag(redis_client, streams))
    assert (figures["polynode"].first, figures["polynode"].behind) == (1, 1)
    # The confirmed sight only: a retraction is nobody's delivery of the fill.
    assert (figures["polygon"].first, figures["polygon"].behind) == (1, 0)
    assert "data_api" not in figures


async def test_partitions_are_summed_and_token_copies_not_counted(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    streams = Streams(namespace, 4)
    orders = OrdersRaw(redis_client, streams, stream_maxlen=100, dedupe_ttl_s=60)
    fills = [make_order(user="0x" + f"{n:02x}" * 20, token_id=f"t{n}") for n in range(12)]
    await orders.deliver([Outgoing(copy(f, Source.POLYGON, T0)) for f in fills])
    await orders.deliver([Outgoing(copy(f, Source.RTDS, T0 + 0.65)) for f in fills])
    used = {streams.wallet_stream(f.user) for f in fills}
    assert len(used) > 1  # the fills spread over partitions, so the sum is a real sum
    for stream in streams.token_streams():
        assert await redis_client.exists(lag_hash(stream)) == 0
    figures = by_source(await read_source_lag(redis_client, streams))
    assert (figures["polygon"].first, figures["rtds"].behind) == (12, 12)
    # Every lag is in the 1 s bucket, and no quantile is reported past the largest lag seen.
    assert figures["rtds"].lag_p50_s == 0.65 == figures["rtds"].lag_max_s


async def test_seen_keys_from_before_the_lag_count_are_left_alone(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    streams = Streams(namespace, 1)
    orders = OrdersRaw(redis_client, streams, stream_maxlen=100, dedupe_ttl_s=60)
    fill = make_order()
    await redis_client.set(streams.seen_order_prefix() + fill.order_key, "1")
    delivery = (await orders.deliver([Outgoing(fill)]))[0]
    assert not delivery.added and delivery.lag_s is None
    assert await read_source_lag(redis_client, streams) == []


def test_quantiles_are_upper_bounds_capped_by_the_maximum() -> None:
    buckets = [(bound, 0) for bound in BUCKETS_MS]
    assert quantile(buckets, 0, 0.5, None) is None
    buckets[0] = (250, 9)
    buckets[5] = (5_000, 1)
    assert quantile(buckets, 10, 0.5, 4_100) == 0.25
    assert quantile(buckets, 10, 0.9, 4_100) == 0.25
    assert quantile(buckets, 10, 0.95, 4_100) == 4.1
    # Past the last bound: only the maximum is known.
    assert quantile([(b, 0) for b in BUCKETS_MS], 1, 0.5, 2_000_000) == 2_000.0


async def test_every_later_source_counts_once_per_fill(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    streams = Streams(namespace, 1)
    orders = OrdersRaw(redis_client, streams, stream_maxlen=100, dedupe_ttl_s=60)
    fill = make_order()
    arrivals = [(Source.POLYGON, 0.0), (Source.RTDS, 0.5), (Source.DATA_API, 40.0)]
    arrivals += [(Source.RTDS, 41.0), (Source.DATA_API, 42.0), (Source.DATA_API, 44.0)]
    lags = []
    for source, after in arrivals:
        (delivery,) = await orders.deliver([Outgoing(copy(fill, source, T0 + after))])
        lags.append(delivery.lag_s)
    assert lags == [None, 0.5, 40.0, None, None, None]
    figures = by_source(await read_source_lag(redis_client, streams))
    assert [(f.source, f.first, f.behind) for f in figures.values()] == [
        ("polygon", 1, 0),
        ("data_api", 0, 1),
        ("rtds", 0, 1),
    ]
    ttl = await redis_client.ttl(streams.seen_order_prefix() + fill.order_key)
    assert 0 < ttl <= 60  # the appended sources kept the dedupe key's expiry
