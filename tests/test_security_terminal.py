"""Feed text never reaches an operator's terminal with its control characters (security finding 8):
`betterbot signals tail`, `betterbot wallets list` and the signal lines `make run` prints."""

from __future__ import annotations

import re

import pytest
import redis.asyncio as aioredis

from devtools.run import format_signal as run_line
from shared import wallet_registry
from shared.models import Side, Signal, SignalKind, Source, TrackedWallet
from shared.redis_streams import encode
from shared.streams import Streams
from shared.terminal import printable
from tests.helpers.cli import Cli

pytestmark = pytest.mark.integration

# Clear the screen, retitle the window (OSC), an 8-bit CSI, a bidi override, a bell, a newline.
HOSTILE = "Will \x1b[2J\x1b]0;pwned\x07it \x9b31m rain\u202e?\n"
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
WALLET = "0x" + "a1" * 20


def _signal() -> Signal:
    return Signal(
        signal_id="s1",
        kind=SignalKind.WHALE_ORDER,
        wallet=WALLET,
        wallet_label=HOSTILE,
        market_slug=HOSTILE,
        title=HOSTILE,
        token_id="9",
        token_label=HOSTILE,
        side=Side.BUY,
        price=0.5,
        shares=3000,
        notional_usd=1500,
        confidence=0.9,
        source=Source.DOME_WS,
        exchange_ts=1760086772,
        received_at=1760086773.0,
        detected_at=1760086773.25,
    )


@pytest.fixture
def cli(redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(redis_url, namespace, capsys)


def test_printable_shows_every_control_character_as_an_escape() -> None:
    shown = printable(HOSTILE)
    assert not CONTROL.search(shown)
    assert shown == "Will \\x1b[2J\\x1b]0;pwned\\x07it \\x9b31m rain\\u202e?\\x0a"
    assert printable("Élection 2028: ‘oui’ ✓") == "Élection 2028: ‘oui’ ✓"  # noqa: RUF001


async def test_signals_tail_prints_no_control_character(
    cli: Cli, redis_client: aioredis.Redis, streams: Streams
) -> None:
    await redis_client.xadd(streams.signals, encode(_signal()))
    code, out, _ = await cli("signals", "tail", "--from", "0", "--count", "1", as_json=False)
    assert code == 0 and "pwned" in out
    assert not CONTROL.search(out.rstrip("\n"))


async def test_wallets_list_prints_no_control_character(
    cli: Cli, redis_client: aioredis.Redis, streams: Streams
) -> None:
    hostile = TrackedWallet(address=WALLET, label=HOSTILE)
    await wallet_registry.upsert(redis_client, streams, hostile)
    code, out, _ = await cli("wallets", "list", as_json=False)
    assert code == 0 and "pwned" in out
    assert not CONTROL.search(out.replace("\n", ""))


def test_make_runs_signal_line_prints_no_control_character() -> None:
    line = run_line({"type": "signal", "id": "1-0", "signal": _signal().model_dump(mode="json")})
    assert "rain" in line and not CONTROL.search(line)
