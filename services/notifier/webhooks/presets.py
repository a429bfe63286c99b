"""Request bodies: `generic` for programs, `discord` and `slack` for their incoming webhooks.

- `generic`: exactly the WebSocket `signal` message, `{"type":"signal","id":...,"signal":{...}}`,
  with the entry's JSON as the producer wrote it (unknown fields included).
- `discord`: `{"content": one line, "embeds": [one embed with the details]}`; mentions are
  disabled, so a market title can never ping a channel.
- `slack`: `{"text": one line (notifications, fallback), "blocks": [header, title, fields, why]}`.

Discord and Slack cap lengths (embed title 256, field 1024, Slack header 150, ...): long texts are
cut with an ellipsis rather than rejected.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from services.notifier.protocol import signal_message
from services.notifier.webhooks.config import Preset
from shared.models import Side, Signal

MARKET_URL = "https://polymarket.com/market/{slug}"
_BUY_COLOR, _SELL_COLOR = 0x0F7B3F, 0xB3261E


def render(preset: Preset, stream_id: str, signal: Signal, data: bytes) -> bytes:
    """The body to POST for one signal (`data`: the entry's JSON as stored on the stream)."""
    if preset is Preset.DISCORD:
        return orjson.dumps(discord_body(signal))
    if preset is Preset.SLACK:
        return orjson.dumps(slack_body(signal))
    return signal_message(stream_id, data).encode()


def discord_body(signal: Signal) -> dict[str, Any]:
    embed: dict[str, Any] = {
        "title": _cut(_title(signal), 256),
        "description": _cut("\n".join(signal.reasons), 4096),
        "color": _BUY_COLOR if signal.side is Side.BUY else _SELL_COLOR,
        "fields": [
            {"name": name, "value": _cut(value, 1024), "inline": True}
            for name, value in _facts(signal)
        ],
        "timestamp": datetime.fromtimestamp(signal.exchange_ts, UTC).isoformat(),
        "footer": {"text": f"BetterBot · signal {signal.signal_id}"},
    }
    if signal.market_slug:
        embed["url"] = MARKET_URL.format(slug=signal.market_slug)
    return {
        "content": _cut(headline(signal), 2000),
        "embeds": [embed],
        "allowed_mentions": {"parse": []},
    }


def slack_body(signal: Signal) -> dict[str, Any]:
    title = _slack_escape(_cut(_title(signal), 1000))
    if signal.market_slug:
        title = f"<{MARKET_URL.format(slug=signal.market_slug)}|{title}>"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(_header(signal), 150)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{title}*"}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": _cut(f"*{name}*\n{_slack_escape(value)}", 2000)}
                for name, value in _facts(signal)
            ],
        },
    ]
    if signal.reasons:
        why = _slack_escape(_cut(" · ".join(signal.reasons), 2900))
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": why}]})
    return {"text": _cut(headline(signal), 3000), "blocks": blocks}


def headline(signal: Signal) -> str:
    """One line for notifications: who did what, where."""
    outcome = f" {signal.token_label}" if signal.token_label else ""
    return (
        f"{_kind(signal)}: {_wallet(signal)} {signal.side.value}{outcome} at "
        f"{_cents(signal.price)} · {_money(signal.notional_usd)} · {_title(signal)}"
    )


def _header(signal: Signal) -> str:
    outcome = f" {signal.token_label}" if signal.token_label else ""
    return f"{_kind(signal)}: {signal.side.value}{outcome} at {_cents(signal.price)}"


def _facts(signal: Signal) -> list[tuple[str, str]]:
    wallet = f"{_wallet(signal)} ({signal.wallet})" if signal.wallet_label else signal.wallet
    return [
        ("Wallet", wallet),
        ("Side", f"{signal.side.value} {signal.token_label}".strip()),
        ("Price", _cents(signal.price)),
        ("Size", f"{signal.shares:,.0f} shares · {_money(signal.notional_usd)}"),
        ("Confidence", f"{signal.confidence:.0%}"),
        ("Kind", _kind(signal)),
    ]


def _title(signal: Signal) -> str:
    return signal.title or signal.market_slug or signal.condition_id or signal.token_id


def _kind(signal: Signal) -> str:
    return signal.kind.value.replace("_", " ").capitalize()


def _wallet(signal: Signal) -> str:
    return signal.wallet_label or f"{signal.wallet[:6]}…{signal.wallet[-4:]}"


def _cents(price: float) -> str:
    return f"{price * 100:.1f}¢"


def _money(amount: float) -> str:
    return f"${amount:,.2f}" if amount < 100 else f"${amount:,.0f}"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn treats these three as control characters (links, mentions).
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
