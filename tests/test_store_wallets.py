"""Tracked wallets on real Redis and Postgres: API changes reach the registry hash and the control
stream (what the ingestor and the detector follow); changes by other registry writers reach
Postgres; the startup sync seeds, catches up, and makes Postgres win."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from shared import wallet_registry
from shared.models import TrackedWallet
from shared.streams import Streams
from tests.test_store_api import AUTH, TOKEN, W1, W2, W3, Api, seed_file, serving, wallets_file
from tests.test_store_service import fetch, store_settings, wait_until

pytestmark = pytest.mark.integration

W4, W5 = "0x" + "4d" * 20, "0x" + "5e" * 20


async def registry(client: aioredis.Redis, streams: Streams) -> dict[str, dict[str, Any]]:
    raw = await client.hgetall(streams.wallets_key())
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


async def control(client: aioredis.Redis, streams: Streams) -> list[dict[str, Any]]:
    entries: Any = await client.xrange(streams.wallets_control)
    return [orjson.loads(fields[b"data"]) | {"id": i.decode()} for i, fields in entries]


async def listed(api: Api) -> dict[str, dict[str, Any]]:
    response = await api.client.get("/wallets")
    assert response.status_code == 200, response.text
    return {w["address"]: w for w in response.json()}


async def rows(database_url: str) -> dict[str, Any]:
    found = await fetch(database_url, "SELECT * FROM tracked_wallets")
    return {r["address"]: dict(r) for r in found}


def settings_for(redis_url: str, database_url: str, namespace: str, file: str) -> Any:
    return store_settings(
        redis_url, database_url, namespace, store_api_token=TOKEN, wallets_file=file
    )


async def test_api_changes_reach_postgres_the_registry_and_the_control_stream(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    async with serving(
        settings_for(redis_url, database_url, namespace, seed_file(tmp_path))
    ) as api:
        assert set(await listed(api)) == {W1, W2}  # seeded from the file on the first start
        before = len(await control(redis_client, streams))

        response = await api.client.put(
            f"/wallets/{W3.upper().replace('0X', '0x')}",
            json={"label": "three", "score": 0.25},
            headers=AUTH,
        )
        assert response.status_code == 201, response.text
        assert response.json()["address"] == W3 and response.json()["label"] == "three"
        assert (await registry(redis_client, streams))[W3] == {
            "address": W3,
            "label": "three",
            "score": 0.25,
        }
        *_, added = await control(redis_client, streams)
        assert added["op"] == "upsert" and added["v"] == 1
        assert added["wallet"] == {"address": W3, "label": "three", "score": 0.25}
        row = (await rows(database_url))[W3]
        assert (row["label"], row["score"], row["removed_at"]) == ("three", 0.25, None)
        assert f"{row['control_ms']}-{row['control_seq']}" == added["id"]

        response = await api.client.put(f"/wallets/{W3}", json={"label": "3"}, headers=AUTH)
        assert response.status_code == 200 and response.json()["score"] is None
        assert (await listed(api))[W3]["label"] == "3"
        assert (await registry(redis_client, streams))[W3]["label"] == "3"

        assert (await api.client.delete(f"/wallets/{W3}", headers=AUTH)).status_code == 204
        assert W3 not in await registry(redis_client, streams)
        assert W3 not in await listed(api)
        *_, removed = await control(redis_client, streams)
        assert removed["op"] == "remove" and removed["wallet"]["address"] == W3
        assert (await rows(database_url))[W3]["removed_at"] is not None  # a tombstone
        assert (await api.client.delete(f"/wallets/{W3}", headers=AUTH)).status_code == 404
        assert len(await control(redis_client, streams)) == before + 3

        # Tracked again after removal: a new wallet as far as the API is concerned.
        response = await api.client.put(f"/wallets/{W3}", json={}, headers=AUTH)
        assert response.status_code == 201


async def test_a_reader_of_the_registry_sees_an_api_change_live(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    """What the ingestor and the detector do: snapshot, then follow from its id."""
    async with serving(
        settings_for(redis_url, database_url, namespace, seed_file(tmp_path))
    ) as api:
        wallets, last_id = await wallet_registry.snapshot(redis_client, streams)
        assert {w.address for w in wallets} == {W1, W2}
        changes = wallet_registry.follow(redis_client, streams, last_id, block_ms=100)
        await api.client.put(f"/wallets/{W4}", json={"label": "four"}, headers=AUTH)
        change = await asyncio.wait_for(anext(changes), 10)
        assert (change.op, change.wallet) == ("upsert", TrackedWallet(address=W4, label="four"))
        await api.client.delete(f"/wallets/{W1}", headers=AUTH)
        change = await asyncio.wait_for(anext(changes), 10)
        assert (change.op, change.wallet.address) == ("remove", W1)
        await changes.aclose()


async def test_changes_by_other_registry_writers_are_persisted(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    async with serving(
        settings_for(redis_url, database_url, namespace, seed_file(tmp_path))
    ) as api:
        # An operator tool writing to the registry directly, not through the API.
        await wallet_registry.upsert(
            redis_client, streams, TrackedWallet(address=W4, label="by hand", score=0.5)
        )
        await wallet_registry.remove(redis_client, streams, W2)

        async def mirrored() -> bool:
            wallets = await listed(api)
            return W4 in wallets and W2 not in wallets

        await wait_until(mirrored, "the follower to apply both changes")
        assert (await listed(api))[W4]["label"] == "by hand"


async def test_concurrent_writers_of_one_wallet_agree_everywhere(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    async with serving(
        settings_for(redis_url, database_url, namespace, seed_file(tmp_path))
    ) as api:
        responses = await asyncio.gather(
            *(
                api.client.put(f"/wallets/{W5}", json={"label": f"v{i}"}, headers=AUTH)
                for i in range(12)
            )
        )
        assert sorted(r.status_code for r in responses) == [200] * 11 + [201]
        *_, last = await control(redis_client, streams)
        final = last["wallet"]["label"]
        assert (await registry(redis_client, streams))[W5]["label"] == final
        await asyncio.sleep(0.3)  # let the follower go over the same entries
        assert (await listed(api))[W5]["label"] == final
        assert (await rows(database_url))[W5]["control_ms"] == int(last["id"].split("-")[0])


async def test_startup_sync_catches_up_then_postgres_wins(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    settings = settings_for(redis_url, database_url, namespace, seed_file(tmp_path))
    async with serving(settings) as api:
        await api.client.put(f"/wallets/{W3}", json={"label": "three"}, headers=AUTH)

    # While no store runs: a proper change (with its control entry), and damage that bypassed
    # the control stream (a restored or hand-edited Redis).
    await wallet_registry.upsert(redis_client, streams, TrackedWallet(address=W4, label="four"))
    await redis_client.hdel(streams.wallets_key(), W1)
    await redis_client.hset(streams.wallets_key(), W5, TrackedWallet(address=W5).model_dump_json())
    await redis_client.hset(
        streams.wallets_key(), W2, orjson.dumps({"address": W2, "label": "edited", "score": None})
    )
    before = len(await control(redis_client, streams))
    # The file is only a seed: another one now changes nothing.
    other_file = wallets_file(tmp_path, TrackedWallet(address="0x" + "99" * 20))

    async with serving(settings_for(redis_url, database_url, namespace, other_file)) as api:
        expected = {W1: "one", W2: "two", W3: "three", W4: "four"}
        assert {a: w["label"] for a, w in (await listed(api)).items()} == expected
        live = await registry(redis_client, streams)
        assert {a: w["label"] for a, w in live.items()} == expected
        pushed = (await control(redis_client, streams))[before:]
        assert sorted((c["op"], c["wallet"]["address"]) for c in pushed) == sorted(
            [("upsert", W1), ("upsert", W2), ("remove", W5)]
        )


async def test_a_registry_that_lost_everything_is_rebuilt_from_postgres(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    settings = settings_for(redis_url, database_url, namespace, seed_file(tmp_path))
    async with serving(settings) as api:
        await api.client.put(f"/wallets/{W3}", json={"score": 1}, headers=AUTH)
        await api.client.delete(f"/wallets/{W2}", headers=AUTH)
    await redis_client.delete(streams.wallets_key(), streams.wallets_control)

    async with serving(settings) as api:
        assert set(await listed(api)) == {W1, W3}
        assert set(await registry(redis_client, streams)) == {W1, W3}
        assert (await registry(redis_client, streams))[W3]["score"] == 1


async def test_an_empty_postgres_takes_the_registry_as_it_is(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    """The ingestor may have seeded the registry (and had it edited) before the store's first
    start: the store copies what the registry holds, not the file."""
    await wallet_registry.load(redis_client, streams, [TrackedWallet(address=W4, label="x")])
    await wallet_registry.upsert(redis_client, streams, TrackedWallet(address=W5, label="y"))
    async with serving(
        settings_for(redis_url, database_url, namespace, seed_file(tmp_path))
    ) as api:
        assert {a: w["label"] for a, w in (await listed(api)).items()} == {W4: "x", W5: "y"}


async def test_a_bad_wallets_file_does_not_stop_the_store(
    redis_url: str,
    database_url: str,
    namespace: str,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"address": "nope"}]')
    async with serving(settings_for(redis_url, database_url, namespace, str(broken))) as api:
        assert await listed(api) == {}
        assert (await api.client.put(f"/wallets/{W1}", json={}, headers=AUTH)).status_code == 201
