"""Webhooks without Redis: the endpoints file, bodies, signatures, retry rules, one delivery."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.notifier.webhooks.config import Preset, Webhook, WebhookConfigError, load_webhooks
from services.notifier.webhooks.delivery import RetryPolicy, Verdict, deliver, verdict
from services.notifier.webhooks.presets import discord_body, headline, render, slack_body
from services.notifier.webhooks.signing import signature, verify
from shared.models import Side
from tests.helpers.notifier import make_signal, variant

SECRET = "s3cret-" + "x" * 16
HOOK = Webhook(name="desk", url="http://127.0.0.1:9/hook", secret=SECRET)


def test_endpoints_from_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "hooks.yaml"
    yaml_file.write_text(f"""
webhooks:
  - name: desk
    url: https://example.com/hooks/betterbot
    secret: "{SECRET}"
    filters: {{kinds: [whale_order], min_confidence: 0.8}}
  - url: https://discord.com/api/webhooks/1/abc
    preset: discord
""")
    desk, second = load_webhooks(yaml_file)
    assert desk.name == "desk" and desk.preset is Preset.GENERIC
    assert desk.filters.describe()["kinds"] == ["whale_order"]
    assert second.name == "webhook-2" and second.preset is Preset.DISCORD
    assert second.secret is None and second.filters.matches_all
    assert "discord.com" not in repr(second) and SECRET not in repr(desk)

    json_file = tmp_path / "hooks.json"
    json_file.write_text(json.dumps([{"url": "http://127.0.0.1/x", "secret": SECRET}]))
    assert [hook.name for hook in load_webhooks(json_file)] == ["webhook-1"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('[{"url": "http://h/x"}]', "webhook 1: a generic webhook needs a secret"),
        ('[{"url": "ftp://h/x", "secret": "' + SECRET + '"}]', "webhook 1: url: must be an http"),
        (
            '[{"url": "http://h/x", "secret": "short-secret"}]',
            "webhook 1: secret: must be at least 16 characters",
        ),
        ('[{"url": "http://h/x", "preset": "teams"}]', "webhook 1: preset: Input should be"),
        (
            '[{"url": "http://h/x", "preset": "slack", "filters": {"kinds": ["x"]}}]',
            "webhook 1: filters.kinds.0: Input should be",
        ),
        (
            '[{"url": "http://h/x", "preset": "slack", "secrett": "' + SECRET + '"}]',
            "webhook 1: secrett: Extra inputs are not permitted",
        ),
        ('[{"name": "a b", "url": "http://h/x", "preset": "slack"}]', "webhook 1: name: String"),
        (
            '[{"name": "a", "url": "http://h/x", "preset": "slack"},'
            ' {"name": "a", "url": "http://h/y", "preset": "slack"}]',
            "duplicate webhook names: a",
        ),
        ('{"hooks": []}', "expected a list of webhooks"),
        ("[1]", "webhook 1: expected a mapping"),
        ("[", "not valid .json"),
    ],
)
def test_bad_endpoint_files_name_the_problem(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "hooks.json"
    path.write_text(content)
    with pytest.raises(WebhookConfigError) as caught:
        load_webhooks(path)
    assert problem in str(caught.value)
    assert SECRET not in str(caught.value)
    with pytest.raises(WebhookConfigError, match="cannot read"):
        load_webhooks(tmp_path / "missing.json")


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    # Recomputed independently: openssl dgst -sha256 -hmac key <<< "1700000000.{}" (no newline).
    assert signature("key", 1700000000, b"{}") == (
        "sha256=" + __import__("hmac").new(b"key", b"1700000000.{}", "sha256").hexdigest()
    )
    body = b'{"type":"signal"}'
    now = 1_700_000_000
    header = signature(SECRET, now, body)
    assert verify(SECRET, body, str(now), header, now=now + 10)
    assert not verify(SECRET, body + b" ", str(now), header, now=now)
    assert not verify("another-secret-value", body, str(now), header, now=now)
    assert not verify(SECRET, body, str(now + 1), header, now=now)
    assert not verify(SECRET, body, str(now), header, now=now + 301)
    assert not verify(SECRET, body, None, header, now=now)
    assert not verify(SECRET, body, "-5", header, now=now)


def test_status_verdicts() -> None:
    assert [verdict(s) for s in (200, 204, 299)] == [Verdict.DELIVERED] * 3
    assert [verdict(s) for s in (500, 502, 503, 408, 429)] == [Verdict.RETRY] * 5
    assert [verdict(s) for s in (301, 400, 401, 404, 410, 422)] == [Verdict.FINAL] * 6


def test_backoff_doubles_to_the_cap_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_attempts=6, first_s=0.5, cap_s=3.0)
    assert [policy.delay(n, rand=lambda: 0.0) for n in range(1, 6)] == [0.5, 1, 2, 3, 3]
    assert policy.delay(2, rand=lambda: 1.0) == 0.5
    assert policy.delay(1, retry_after=2.0, rand=lambda: 0.0) == 2.0
    assert policy.delay(1, retry_after=60.0, rand=lambda: 0.0) == 3.0


def test_generic_body_is_the_websocket_message() -> None:
    signal = make_signal(1)
    data = orjson.dumps(signal.model_dump(mode="json") | {"future": 1})
    body = render(Preset.GENERIC, "5-1", signal, data)
    message = orjson.loads(body)
    assert message["type"] == "signal" and message["id"] == "5-1"
    assert message["signal"] == signal.model_dump(mode="json") | {"future": 1}


def test_discord_body() -> None:
    signal = variant(
        7,
        title="Will <@everyone> win? " + "x" * 300,
        side=Side.SELL,
        wallet_label="cowcat",
        reasons=["entered a market", "size 3x usual"],
    )
    body = discord_body(signal)
    assert set(body) == {"content", "embeds", "allowed_mentions"}
    assert body["allowed_mentions"] == {"parse": []}
    assert body["content"].startswith("Whale order: cowcat SELL Yes at 42.0¢ · $423")
    (embed,) = body["embeds"]
    assert len(embed["title"]) == 256 and embed["title"].endswith("…")
    assert embed["url"] == "https://polymarket.com/market/nobel-peace-prize-2025"
    assert embed["description"] == "entered a market\nsize 3x usual"
    assert embed["color"] == 0xB3261E
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Confidence"] == "90%" and fields["Price"] == "42.0¢"
    assert fields["Wallet"] == f"cowcat ({signal.wallet})"
    assert embed["timestamp"].endswith("+00:00")
    assert len(orjson.dumps(body)) < 6000


def test_slack_body_escapes_control_characters() -> None:
    signal = variant(3, title="A & B <script>", wallet_label="")
    body = slack_body(signal)
    assert body["text"] == headline(signal).replace("&", "&amp;").replace("<", "&lt;").replace(
        ">", "&gt;"
    )
    header, title, facts, why = body["blocks"]
    assert header["type"] == "header" and len(header["text"]["text"]) <= 150
    assert title["text"]["text"] == (
        "*<https://polymarket.com/market/nobel-peace-prize-2025|A &amp; B &lt;script&gt;>*"
    )
    wallet = {"type": "mrkdwn", "text": f"*Wallet*\n{signal.wallet}", "verbatim": True}
    assert wallet in facts["fields"]
    assert why["type"] == "context"
    assert len(facts["fields"]) <= 10


class Script:
    """An httpx transport answering from a list (statuses or exceptions), recording requests."""

    def __init__(self, answers: list[int | Exception]) -> None:
        self.answers: Iterator[int | Exception] = iter(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = next(self.answers)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(
            answer,
            text="nope" if answer >= 300 else "",
            headers={"Retry-After": "0"} if answer == 429 else {},
        )


async def run(answers: list[int | Exception], attempts: int = 4) -> tuple[Any, Script]:
    script = Script(answers)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as http:
        outcome = await deliver(
            http, HOOK, b'{"n":1}', "sig-1", RetryPolicy(attempts, 0.1, 1.0), sleep=sleep
        )
    assert len(sleeps) == max(0, len(script.requests) - 1)
    return outcome, script


async def test_delivery_retries_5xx_and_timeouts_then_succeeds() -> None:
    outcome, script = await run([500, httpx.ReadTimeout("slow"), 429, 204])
    assert (outcome.delivered, outcome.attempts) == (True, 4)
    now = time.time()
    for n, request in enumerate(script.requests, start=1):
        assert request.content == b'{"n":1}'
        assert request.headers["idempotency-key"] == "sig-1"
        assert request.headers["x-betterbot-attempt"] == str(n)
        assert request.headers["content-type"] == "application/json"
        assert verify(
            SECRET,
            request.content,
            request.headers["x-betterbot-timestamp"],
            request.headers["x-betterbot-signature"],
            now=now,
        )


async def test_delivery_gives_up_on_4xx_at_once_and_after_the_last_try() -> None:
    outcome, script = await run([400])
    assert (outcome.delivered, outcome.attempts, len(script.requests)) == (False, 1, 1)
    assert outcome.reason == "HTTP 400: nope (final, not retried)"
    outcome, _ = await run([302])
    assert outcome.reason == "HTTP 302: nope (final, not retried)"
    outcome, _ = await run([503, httpx.ConnectError("refused http://127.0.0.1:9/hook")], 2)
    assert (outcome.delivered, outcome.attempts) == (False, 2)
    assert outcome.reason == "2 attempts, last: connection error (ConnectError)"
