"""The one Redis helper: connections, consumer groups and the plain entry format of public streams.

Public streams hold plain entries, one field `data` with the JSON payload, so a consumer in any
language reads them with a bare Redis client and a JSON decoder (FastStream's default binary format
could not be read that way). FastStream subscribers read this shape too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

DATA_FIELD = b"data"
T = TypeVar("T")

# Redis (or part of a cluster) out of reach for now: waited out, never an entry's fault. On a
# cluster that includes the seconds of a failover: the cluster down, a slot unserved, a write to
# a master just demoted.
UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
    ReadOnlyError,
    OSError,
)


def connect(url: str, *, cluster: bool = False, **options: Any) -> aioredis.Redis:
    """A client of one Redis, or of a Redis Cluster through any of its nodes.

    The cluster client speaks the same commands (every script and MULTI of the services keeps its
    keys in one slot, shared/streams.py) and is typed as the plain one, which it stands in for.
    """
    options = {"decode_responses": False, "health_check_interval": 30, **options}
    if not cluster:
        return aioredis.Redis.from_url(url, **options)
    return cast(aioredis.Redis, RedisCluster.from_url(url, **options))


class ClientTornDown(RedisConnectionError):
    """redis-py 8.1's cluster client, during a failover, can raise AttributeError from inside its
    connection code (a connection closed under a command: `'NoneType' object has no attribute
    'writelines'`); `torn_down` turns that into an outage like any other."""


def torn_down(exc: BaseException) -> BaseException:
    """`exc`, or a ClientTornDown in its place when it is that AttributeError of redis-py's."""
    if not isinstance(exc, AttributeError):
        return exc
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    where = last.tb_frame.f_code.co_filename if last is not None else ""
    if "/redis/" in where.replace("\\", "/"):
        return ClientTornDown(f"redis client torn down mid-command: {exc}")
    return exc


async def calling(call: Callable[[], Awaitable[T]]) -> T:
    """`await call()`, with redis-py's torn-down AttributeError raised as an outage."""
    try:
        return await call()
    except AttributeError as exc:
        raise torn_down(exc) from exc


async def server_identity(client: aioredis.Redis) -> frozenset[str]:
    """The run ids of the servers holding the data (a cluster's masters): another set means a
    server was restarted or a replica took a master's place."""
    if isinstance(client, RedisCluster):
        replies: Any = await client.info("server", target_nodes=RedisCluster.PRIMARIES)
        return frozenset(str(info["run_id"]) for info in replies.values())
    info: Any = await client.info("server")
    return frozenset({str(info["run_id"])})


def encode(payload: Mapping[str, Any] | Any) -> dict[FieldT, EncodableT]:
    """The entry fields for a payload (a dict or a pydantic model)."""
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump(mode="json")
    return {DATA_FIELD: orjson.dumps(payload)}


def decode(fields: Mapping[bytes, bytes]) -> Any:
    """The JSON payload of an entry; raises ValueError when the entry is not in our format."""
    raw = fields.get(DATA_FIELD)
    if raw is None:
        raise ValueError(
            f"entry has no 'data' field (fields: {sorted(k.decode() for k in fields)})"
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"entry 'data' is not JSON: {exc}") from exc


def entry_position(entry_id: str) -> tuple[int, int]:
    """A stream id as numbers, which compare in stream order ("9-0" sorts after "10-0" as text)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def entry_payload(fields: Mapping[bytes, bytes]) -> bytes:
    """What to keep of an entry for people to inspect: its `data`, else all its fields as JSON."""
    data = fields.get(DATA_FIELD)
    if data is not None:
        return data
    readable = {
        k.decode("utf-8", "backslashreplace"): v.decode("utf-8", "backslashreplace")
        for k, v in fields.items()
    }
    return orjson.dumps(readable)


async def ensure_group(client: aioredis.Redis, stream: str, group: str, start: str = "0") -> None:
    """Create the consumer group (and the stream) unless it exists."""
    try:
        await client.xgroup_create(stream, group, id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def dead_letter(
    client: aioredis.Redis,
    stream: str,
    raw: bytes | str,
    reason: str,
    *,
    origin: str,
    deliveries: int = 1,
    maxlen: int = 100_000,
) -> None:
    """Keep what could not be processed, with why, so people can inspect and replay it."""
    payload = raw if isinstance(raw, bytes) else raw.encode("utf-8", "backslashreplace")
    await client.xadd(
        stream,
        {
            b"raw": payload,
            b"reason": reason.encode()[:2000],
            b"origin": origin.encode(),
            b"deliveries": str(deliveries).encode(),
            b"at": f"{time.time():.6f}".encode(),
        },
        maxlen=maxlen,
        approximate=True,
    )
