"""The code in docs/notifier.md works: the example client and the signature check receivers copy."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
import websockets

from services.notifier.webhooks.signing import signature
from shared.streams import Streams
from tests.helpers.notifier import publish, running_notifier, variant, wallet, ws_url
from tests.helpers.processes import ROOT

DOC = ROOT / "docs" / "notifier.md"
TOKEN = "doc-token-" + "9" * 20


def snippet(marker: str) -> dict[str, Any]:
    """Run the code block that follows `<!-- marker -->` in the doc; its namespace."""
    match = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"no python block after <!-- {marker} --> in {DOC}"
    namespace: dict[str, Any] = {"__name__": "docs_snippet"}
    exec(compile(match[1], f"{DOC}:{marker}", "exec"), namespace)
    return namespace


def test_signature_check_for_receivers() -> None:
    verify_betterbot = snippet("verify-signature")["verify_betterbot"]
    secret, body, now = "receiver-secret-123456", b'{"type":"signal","id":"1-0"}', int(time.time())
    headers = {
        "X-BetterBot-Timestamp": str(now),
        "X-BetterBot-Signature": signature(secret, now, body),
    }
    assert verify_betterbot(secret, headers, body)
    assert not verify_betterbot(secret, headers, body + b" ")
    assert not verify_betterbot("another-secret-123456", headers, body)
    old = now - 600
    stale = {
        "X-BetterBot-Timestamp": str(old),
        "X-BetterBot-Signature": signature(secret, old, body),
    }
    assert not verify_betterbot(secret, stale, body)


@pytest.mark.integration
async def test_example_client_filters_and_resumes(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    follow = snippet("example-client")["follow"]
    filters = {"wallets": [wallet(1)], "min_confidence": 0.8}
    signals = [variant(n, wallet=wallet(n % 2), confidence=0.7 + (n % 3) / 10) for n in range(24)]
    wanted = [n for n, s in enumerate(signals) if s.wallet == wallet(1) and s.confidence >= 0.8]
    async with running_notifier(redis_url, namespace, notifier_tokens=(TOKEN,)) as notifier:
        ids = await publish(redis_client, streams.signals, signals[:12])
        seen: list[str] = []
        feed = follow(ws_url(notifier), token=TOKEN, filters=filters, last_id="0-0")
        async for stream_id, signal in feed:
            seen.append(stream_id)
            assert signal["wallet"] == wallet(1) and signal["confidence"] >= 0.8
            if len(seen) == 2:
                break
        await feed.aclose()
        ids += await publish(redis_client, streams.signals, signals[12:])
        feed = follow(ws_url(notifier), token=TOKEN, filters=filters, last_id=seen[-1])
        async for stream_id, _ in feed:
            seen.append(stream_id)
            if len(seen) == len(wanted):
                break
        await feed.aclose()

        # A wrong token is not retried: the client raises with the server's reason.
        with pytest.raises(websockets.ConnectionClosedError) as caught:
            await follow(ws_url(notifier), token="wrong", filters=filters).__anext__()
        assert caught.value.rcvd is not None
        assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (
            4401,
            "unauthorized: unknown token",
        )
    assert seen == [ids[n] for n in wanted]
