"""The one consumer-group runtime (shared/consumer.py) on a real Redis, with plain handlers: acks,
failures and their dead letters, reclaiming, keeping slow work claimed, trimmed pending entries,
draining and leaving on stop, and a Redis that restarts empty under it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from chaos.redis_server import ThrowawayRedis
from devtools.servers import free_port
from services.notifier.webhooks.config import Webhook
from services.notifier.webhooks.dead import DeadLetters
from services.notifier.webhooks.delivery import RetryPolicy
from services.notifier.webhooks.endpoint import Endpoint
from services.notifier.webhooks.handoff import Route, queue_key
from shared.consumer import (
    DELETED,
    ConsumerGroup,
    Entry,
    GroupConfig,
    Handled,
    errors_key,
)
from shared.redis_streams import ClientTornDown, calling, encode
from shared.streams import Streams

pytestmark = pytest.mark.integration

GROUP = "g"


def config(streams: Streams, consumer: str = "c1", **overrides: Any) -> GroupConfig:
    values: dict[str, Any] = {
        "stream": streams.namespace + "in",
        "group": GROUP,
        "consumer": consumer,
        "dead_stream": streams.namespace + "in.dead",
        "origin": "test",
        "batch_size": 10,
        "block_ms": 50,
        "claim_min_idle_ms": 150,
        "reclaim_every_s": 0.05,
        "max_deliveries": 2,
        "drain_s": 2.0,
    }
    return GroupConfig(**{**values, **overrides})


class Recorder:
    """A plain handler: settles every entry except those whose payload says `fail`."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.seen: list[str] = []
        self.delay_s = delay_s

    async def __call__(self, batch: list[Entry]) -> Handled:
        await asyncio.sleep(self.delay_s)
        settled, failed = [], {}
        for entry_id, fields in batch:
            payload = orjson.loads(fields[b"data"])
            self.seen.append(payload["n"])
            if payload.get("fail"):
                failed[entry_id] = f"cannot handle {payload['n']}"
            else:
                settled.append(entry_id)
        return Handled(settled, failed)


async def add(client: aioredis.Redis, stream: str, *payloads: dict[str, Any]) -> list[str]:
    ids: list[Any] = [await client.xadd(stream, encode(p)) for p in payloads]
    return [entry_id.decode() for entry_id in ids]


async def until(check: Callable[[], Awaitable[bool]], within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(group: ConsumerGroup) -> AsyncIterator[asyncio.Task[None]]:
    await group.ensure_group()  # so the test's own XPENDING never races the group's creation
    stop = asyncio.Event()
    task = asyncio.create_task(group.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def pending(client: aioredis.Redis, stream: str) -> int:
    return int((await client.xpending(stream, GROUP))["pending"])


async def test_settled_entries_are_acked_and_a_failing_one_is_dead_lettered_with_its_reason(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    cfg = config(streams)
    handler = Recorder()
    group = ConsumerGroup(redis_client, cfg, handler)
    async with running(group):
        await add(redis_client, cfg.stream, {"n": "a"}, {"n": "b", "fail": True}, {"n": "c"})
        await until(lambda: _xlen(redis_client, cfg.dead_stream, 1))
        await until(lambda: _pending_is(redis_client, cfg.stream, 0))
    entries: Any = await redis_client.xrange(cfg.dead_stream)
    ((_, dead),) = entries
    assert orjson.loads(dead[b"raw"])["n"] == "b"
    assert b"cannot handle b" in dead[b"reason"] and b"delivered 3 times" in dead[b"reason"]
    assert dead[b"origin"] == b"test" and dead[b"deliveries"] == b"3"
    # First delivery, then two reclaims (deliveries 2 and 3 > max 2: dead-lettered unhandled).
    assert handler.seen.count("b") == 2 and handler.seen.count("a") == 1
    assert await redis_client.hlen(errors_key(cfg.stream, GROUP)) == 0


async def test_a_raising_handler_settles_nothing_and_its_error_is_kept(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    cfg = config(streams, claim_min_idle_ms=60_000)

    async def broken(batch: list[Entry]) -> Handled:
        raise KeyError("no such field")

    group = ConsumerGroup(redis_client, cfg, broken)
    await group.ensure_group()
    ids = await add(redis_client, cfg.stream, {"n": "a"}, {"n": "b"})
    assert await group.handle(await group.read_batch()) == []
    assert await pending(redis_client, cfg.stream) == 2
    errors: Any = await redis_client.hgetall(errors_key(cfg.stream, GROUP))
    assert {k.decode(): v for k, v in errors.items()} == dict.fromkeys(
        ids, b"KeyError: 'no such field'"
    )


async def test_a_dead_consumers_entries_are_reclaimed(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    cfg = config(streams, consumer="live")
    handler = Recorder()
    group = ConsumerGroup(redis_client, cfg, handler)
    await group.ensure_group()
    await add(redis_client, cfg.stream, {"n": "a"}, {"n": "b"})
    await redis_client.xreadgroup(GROUP, "dead", {cfg.stream: ">"})
    assert await group.reclaim() == 0  # not idle long enough yet
    await asyncio.sleep(0.2)
    assert await group.reclaim() == 2
    assert sorted(handler.seen) == ["a", "b"]
    assert await pending(redis_client, cfg.stream) == 0


async def test_slow_work_stays_claimed_by_its_consumer(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """A handler busy for five times the claim bound: another replica's sweeps take nothing."""
    cfg = config(streams)
    slow = ConsumerGroup(redis_client, cfg, Recorder(delay_s=0.75))
    other = ConsumerGroup(redis_client, config(streams, consumer="c2"), Recorder())
    await slow.ensure_group()
    await add(redis_client, cfg.stream, {"n": "a"})
    work = asyncio.create_task(slow.handle(await slow.read_batch()))
    taken = 0
    while not work.done():
        taken += await other.reclaim()
        await asyncio.sleep(0.05)
    assert taken == 0 and len(await work) == 1


async def test_pending_entries_trimmed_from_the_stream_are_counted_and_dead_lettered(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    cfg = config(streams)
    group = ConsumerGroup(redis_client, cfg, Recorder())
    await group.ensure_group()
    ids = await add(redis_client, cfg.stream, {"n": "a"}, {"n": "b"})
    await redis_client.xreadgroup(GROUP, "dead", {cfg.stream: ">"})
    await redis_client.xdel(cfg.stream, *ids)
    before = DELETED.labels(GROUP, cfg.stream)._value.get()
    await asyncio.sleep(0.2)
    await group.reclaim()
    assert DELETED.labels(GROUP, cfg.stream)._value.get() - before == 2
    assert await pending(redis_client, cfg.stream) == 0
    dead = await redis_client.xrange(cfg.dead_stream)
    assert [fields[b"reason"].decode() for _, fields in dead] == [
        f"trimmed from {cfg.stream} (MAXLEN) before group {GROUP} settled it; its content is "
        f"lost (entry {entry_id}): raise STREAM_MAXLEN or add consumers"
        for entry_id in ids
    ]
    assert [orjson.loads(fields[b"raw"])["trimmed_entry"] for _, fields in dead] == ids


async def test_a_trimmed_entry_whose_dead_letter_fails_once_is_still_dead_lettered(
    redis_client: aioredis.Redis, streams: Streams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis drops a trimmed id from the pending list as it reports it: a dead letter that fails
    to be written (Redis away for a moment) is retried, not lost with the ids after it."""
    cfg = config(streams)
    group = ConsumerGroup(redis_client, cfg, Recorder())
    await group.ensure_group()
    ids = await add(redis_client, cfg.stream, {"n": "a"}, {"n": "b"}, {"n": "c"})
    await redis_client.xreadgroup(GROUP, "dead", {cfg.stream: ">"})
    await redis_client.xdel(cfg.stream, *ids)
    real = group.dead_letter
    failures = iter([True])

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if next(failures, False):
            raise ConnectionError("Redis went away")
        return await real(*args, **kwargs)

    monkeypatch.setattr(group, "dead_letter", flaky)
    await asyncio.sleep(0.2)
    await group.reclaim()
    dead = await redis_client.xrange(cfg.dead_stream)
    assert [orjson.loads(fields[b"raw"])["trimmed_entry"] for _, fields in dead] == ids


async def test_stop_handles_what_was_delivered_here_then_leaves_the_group(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    cfg = config(streams, consumer="c1", claim_min_idle_ms=60_000)
    handler = Recorder()
    group = ConsumerGroup(redis_client, cfg, handler)
    await group.ensure_group()
    await add(redis_client, cfg.stream, {"n": "a"}, {"n": "b"})
    # A read whose batch never reached the handler (cut short by the stop).
    await redis_client.xreadgroup(GROUP, "c1", {cfg.stream: ">"})
    stop = asyncio.Event()
    stop.set()
    await group.run(stop)
    assert sorted(handler.seen) == ["a", "b"]
    assert await redis_client.xinfo_consumers(cfg.stream, GROUP) == []


async def test_stop_keeps_the_consumer_while_it_holds_an_unsettled_entry(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    cfg = config(streams, consumer="c1", claim_min_idle_ms=60_000)
    group = ConsumerGroup(redis_client, cfg, Recorder())
    async with running(group):
        await add(redis_client, cfg.stream, {"n": "a", "fail": True})
        await until(lambda: _pending_is(redis_client, cfg.stream, 1))
    consumers = await redis_client.xinfo_consumers(cfg.stream, GROUP)
    assert [(c["name"], c["pending"]) for c in consumers] == [(b"c1", 1)]


async def test_a_redis_that_restarts_empty_is_waited_out_and_the_group_made_again(
    tmp_path: Path,
) -> None:
    server = ThrowawayRedis(tmp_path)
    server.start()
    client = aioredis.Redis.from_url(server.url)
    try:
        cfg = config(Streams(""), block_ms=100)
        handler = Recorder()
        group = ConsumerGroup(client, cfg, handler)
        async with running(group) as task:
            await add(client, cfg.stream, {"n": "before"})
            await until(lambda: _seen(handler, "before"))
            server.kill()
            for item in server.data_dir.iterdir():  # it comes back with nothing
                shutil.rmtree(item) if item.is_dir() else item.unlink()
            await asyncio.sleep(0.5)
            assert group.health.redis_down_since is not None and not task.done()
            await asyncio.to_thread(server.start)
            await until(lambda: _group_exists(client, cfg.stream))
            await add(client, cfg.stream, {"n": "after"})
            await until(lambda: _seen(handler, "after"))
            assert group.health.redis_down_since is None
    finally:
        await client.aclose()
        server.stop()


async def _xlen(client: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await client.xlen(stream)) >= n


async def _pending_is(client: aioredis.Redis, stream: str, n: int) -> bool:
    return await pending(client, stream) == n


async def _seen(handler: Recorder, n: str) -> bool:
    return n in handler.seen


async def _group_exists(client: aioredis.Redis, stream: str) -> bool:
    with contextlib.suppress(Exception):
        return any(g["name"] == GROUP.encode() for g in await client.xinfo_groups(stream))
    return False


async def test_independent_work_runs_side_by_side_and_a_stop_does_not_wait_for_a_hung_one(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """A work queue: one entry per call, three at once, settled entries deleted; a call that
    never ends is cut at the drain bound and its entry stays pending for the next owner."""
    cfg = config(streams, batch_size=1, max_in_flight=3, delete_on_settle=True, drain_s=0.5)
    started: list[str] = []

    async def work(batch: list[Entry]) -> Handled:
        n = orjson.loads(batch[0][1][b"data"])["n"]
        started.append(n)
        await asyncio.sleep(3600 if n == "hung" else 0.3)
        return Handled([batch[0][0]])

    group = ConsumerGroup(redis_client, cfg, work)
    async with running(group):
        await add(redis_client, cfg.stream, {"n": "hung"}, {"n": "a"}, {"n": "b"}, {"n": "c"})
        await until(lambda: _xlen_is(redis_client, cfg.stream, 1), within_s=5)
        # "a" and "b" ran beside the hung call, "c" in the slot one of them freed.
        assert sorted(started) == ["a", "b", "c", "hung"]
    assert await pending(redis_client, cfg.stream) == 1
    assert int(await redis_client.xlen(cfg.stream)) == 1  # only the unsettled entry is left


async def test_a_custom_dead_letter_gets_the_entry_and_why(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    cfg = config(streams, max_deliveries=1)
    letters: list[tuple[str, str, int]] = []

    async def letter(entry: Entry, reason: str, deliveries: int) -> None:
        letters.append((orjson.loads(entry[1][b"data"])["n"], reason, deliveries))

    group = ConsumerGroup(redis_client, cfg, Recorder(), dead_letter=letter)
    await group.ensure_group()
    await add(redis_client, cfg.stream, {"n": "x"})
    await redis_client.xreadgroup(GROUP, "dead", {cfg.stream: ">"})
    await redis_client.xclaim(cfg.stream, GROUP, "dead", 0, [(await _first_id(redis_client, cfg))])
    await asyncio.sleep(0.2)
    await group.reclaim()
    ((n, reason, deliveries),) = letters
    assert (
        n == "x" and deliveries == 3 and reason.startswith("delivered 3 times (MAX_DELIVERIES 1)")
    )
    assert await redis_client.xlen(cfg.dead_stream) == 0


async def _first_id(client: aioredis.Redis, cfg: GroupConfig) -> str:
    entries: Any = await client.xrange(cfg.stream, count=1)
    return str(entries[0][0].decode())


async def _xlen_is(client: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await client.xlen(stream)) == n


async def test_a_stop_while_redis_is_away_at_start_ends_the_run(streams: Streams) -> None:
    """Nothing answers at the address: the join waits, and a stop ends it (no hang)."""
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    group = ConsumerGroup(client, config(streams), Recorder())
    stop = asyncio.Event()
    run = asyncio.create_task(group.run(stop))
    await asyncio.sleep(0.5)
    assert not run.done() and group.health.redis_down_since is not None
    stop.set()
    await asyncio.wait_for(run, 10)
    assert group.health.stopped
    await client.aclose()


async def test_a_group_lost_with_the_data_is_made_again_from_the_start(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """A group that starts at `$` the first time still reads what was written after Redis lost
    its data and before the group was made again."""
    cfg = config(streams, start_id="$")
    handler = Recorder()
    group = ConsumerGroup(redis_client, cfg, handler)
    await group.ensure_group()
    await redis_client.delete(cfg.stream)
    await add(redis_client, cfg.stream, {"n": "after-the-loss"})
    assert await group.read_batch() == []  # NOGROUP: made again
    batch = await group.read_batch()
    await group.handle(batch)
    assert handler.seen == ["after-the-loss"]


async def test_a_webhook_queue_entry_trimmed_while_pending_is_dead_lettered(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """The webhook endpoints' own dead-letter hook keeps a trimmed entry too, not only a signal."""
    hook = Webhook(name="desk", url="http://127.0.0.1:9/hook", secret="s3cret-" + "x" * 16)
    queue = queue_key(streams, hook.name)
    async with httpx.AsyncClient() as http:
        endpoint = Endpoint(
            Route(hook, queue),
            http,
            RetryPolicy(1, 0.1, 0.1),
            DeadLetters(redis_client, streams.webhooks_dead),
        )
        cfg = config(streams, stream=queue, dead_stream=streams.webhooks_dead)
        group = ConsumerGroup(redis_client, cfg, endpoint, dead_letter=endpoint.dead_letter)
        await group.ensure_group()
        ids = await add(redis_client, queue, {"n": "a"})
        await redis_client.xreadgroup(GROUP, "dead", {queue: ">"})
        await redis_client.xdel(queue, *ids)
        await asyncio.sleep(0.2)
        await group.reclaim()
    dead = await redis_client.xrange(streams.webhooks_dead)
    assert len(dead) == 1
    assert b"trimmed from" in dead[0][1][b"reason"]
    assert orjson.loads(dead[0][1][b"raw"])["trimmed_entry"] == ids[0]


async def test_redis_clients_torn_down_attribute_error_counts_as_an_outage() -> None:
    """redis-py 8.1's cluster client raises AttributeError from its connection code during a
    failover; the runtime, the registry follower and the publisher wait it out as an outage. One
    of our own AttributeErrors stays a bug."""

    async def torn() -> None:
        exec(compile("None.writelines([])", "/venv/redis/asyncio/connection.py", "exec"))

    async def ours() -> None:
        exec(compile("None.writelines([])", "/work/shared/consumer.py", "exec"))

    with pytest.raises(ClientTornDown, match="torn down mid-command"):
        await calling(torn)
    with pytest.raises(AttributeError) as raised:
        await calling(ours)
    assert not isinstance(raised.value, ClientTornDown)
