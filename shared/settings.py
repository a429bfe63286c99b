"""One settings loader for every service: pydantic-settings from the environment and .env.

Each service subclasses `CommonSettings` with its own fields. Every field has a default that works
with the bundled simulator and the local Redis/Postgres, so `make run` needs no configuration.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any

import redis.asyncio as aioredis
from pydantic import Field, field_serializer, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.logs import redact_url
from shared.redis_streams import connect
from shared.streams import MAX_PARTITIONS, Streams

# URLs that carry a password: plain strings for the client libraries, shown only redacted.
CREDENTIAL_URLS = frozenset({"redis_url", "database_url"})


class CommonSettings(BaseSettings):
    # hide_input_in_errors: a validation error must never echo a value, since values include keys.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    # A Redis Cluster: REDIS_URL names any node and the client discovers the rest.
    redis_cluster: bool = False
    # Partitions of `orders.raw` (shared/streams.py): the same in every service; changing it is
    # an operation (docs/operations.md, "Changing the partition count").
    stream_partitions: int = Field(1, ge=1, le=MAX_PARTITIONS)
    # Prefix of every stream and key; lets tests and several deployments share one Redis.
    stream_namespace: str = ""
    # Approximate MAXLEN of the streams: sized so a group that keeps up never loses an unread entry.
    stream_maxlen: int = 1_000_000
    log_level: str = "INFO"
    # Host and port of the service's /health and /metrics; port 0 picks a free one.
    ops_host: str = "127.0.0.1"
    ops_port: int = 0

    @field_validator("stream_namespace")
    @classmethod
    def _no_braces(cls, value: str) -> str:
        # A brace would change the Redis Cluster hash tag of every key (shared/streams.py).
        if "{" in value or "}" in value:
            raise ValueError("must not contain { or }")
        return value

    @cached_property
    def streams(self) -> Streams:
        return Streams(self.stream_namespace, self.stream_partitions, self.redis_cluster)

    def redis(self) -> aioredis.Redis:
        """A client of the configured Redis (a cluster client with REDIS_CLUSTER)."""
        return connect(self.redis_url, cluster=self.redis_cluster)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name in CREDENTIAL_URLS else value

    @field_serializer("redis_url")
    def _redis_url_shown(self, value: str) -> str:
        return redact_url(value)


class DatabaseSettings(CommonSettings):
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"

    @field_serializer("database_url")
    def _database_url_shown(self, value: str) -> str:
        return redact_url(value)
