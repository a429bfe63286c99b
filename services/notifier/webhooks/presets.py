"""Request bodies: `generic` for programs, `discord` and `slack` for their incoming webhooks,
`telegram` for the Bot API's `sendMessage`.

- `generic`: exactly the WebSocket `signal` message, `{"type":"signal","id":...,"signal":{...}}`,
  with the entry's JSON as the producer wrote it (unknown fields included).
- `discord`: `{"content": one line, "embeds": [one embed with the details]}`.
- `slack`: `{"text": one line (notifications, fallback), "blocks": [header, title, fields, why]}`.
- `telegram`: `{"chat_id", "text", "parse_mode": "HTML", "link_preview_options": {"is_disabled":
  true}}`; the text is the one line in bold, the status, the title linked to the market, the facts
  and the reasons in italics, one per line.

A signal that is not confirmed shows it (a retraction repeats the signal it retracts, with
`status` and `status_reason`, see docs/streams.md): in Discord, Slack and Telegram its one line,
Discord's title and Slack's header start with `RETRACTED: ` or `PENDING: `, the line ends with the
reason, and a "Status" field (Discord), section (Slack, after the header) or line (Telegram, after
the first) says it with the reason; a retraction is grey in Discord. The reason is feed text like
the rest, escaped the same way, and kept whole when a long title must be cut. `generic` needs
nothing: the signal carries its status.

Every text that comes from the feed (title, slug, labels, reasons) is hostile: a market can be
named `<!channel>` or `[Polymarket](https://evil.example)`. So:
- Slack: `& < >` are escaped (`&amp; &lt; &gt;`, Slack's documented rule) in every mrkdwn text and
  in the fallback `text`, which Slack formats too; mrkdwn objects are `verbatim`, so bare URLs,
  `#channels` and `@here` are not parsed either. The header is plain_text, which parses nothing.
- Discord: `allowed_mentions: {"parse": []}` (Discord's documented switch) so nothing pings, and
  markdown / mention characters are escaped with a backslash wherever Discord renders markdown
  (content, title, description, field values), so no masked link or mention pill either.
- Telegram: HTML rather than MarkdownV2, because HTML has three characters to escape (`& < >` as
  `&amp; &lt; &gt;`; `"` goes too, as `&quot;`, which the link's `href` attribute needs) where
  MarkdownV2 has eighteen (_ * [ ] ( ) ~ backtick > # + - = | { } . !) with other rules inside
  links and code: the shorter rule is the one that stays right. Our tags are never nested, so that
  a cut can close each one where it stands. Link previews are off (`link_preview_options`), so no
  title can make Telegram fetch a page and show it. Telegram still finds bare URLs, @usernames
  and #hashtags in plain text by itself (the Bot API has no switch for that): a title can show a
  clickable bare URL or name a user, but never a masked link, a tag or a formatting of its own.
- The market link is ours alone: `MARKET_URL` with the slug percent-encoded as one path segment
  (`quote(..., safe="")`), so no slug can leave polymarket.com, break out of Slack's `<url|label>`
  (`|`, `>`) or make an invalid URL (a space) that Discord would refuse with a 400. A slug that is
  empty, a dot segment or absurdly long gets no link.

Discord and Slack cap lengths (embed title 256, field 1024, all of an embed 6000, Slack header
150, ...): texts are escaped first and then cut with an ellipsis, never inside an escape, rather
than rejected. Telegram takes 4096 characters "after entities parsing": the HTML itself, tags and
entities included, is kept within 4096 UTF-16 code units (how Telegram counts, an emoji is two),
which is never less than the text it shows; a cut comes inside the tag it falls in, which is then
closed, never inside a tag or an entity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson

from services.notifier.protocol import signal_message
from services.notifier.webhooks.config import Preset
from shared.models import REASON_MAX, FillStatus, Side, Signal

MARKET_URL = "https://polymarket.com/market/{slug}"
# Real slugs are a few dozen characters of [a-z0-9-]; a longer one is not a market worth linking.
MAX_SLUG_CHARS = 200
_BUY_COLOR, _SELL_COLOR, _RETRACTED_COLOR = 0x0F7B3F, 0xB3261E, 0x6B6B66
_MARKS = {FillStatus.PENDING: "PENDING: ", FillStatus.RETRACTED: "RETRACTED: "}
# A reason fits its bound even if every character is escaped (Slack's `&` takes five).
_REASON_CHARS = 5 * REASON_MAX
# Discord: the whole embed (title, description, field names and values, footer) is capped too.
_DISCORD_EMBED_CHARS = 6000

_SLACK_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# Markdown (* _ ~ ` | > # - [ ]), mentions and custom emoji (< @), and the escape itself.
_DISCORD_ESCAPES = {char: "\\" + char for char in "\\*_~`|<>#-[]@"}
# Telegram's HTML: `& < >` in text; `"` too, for the one attribute we write (href).
_TELEGRAM_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
# One character of escaped Telegram text: an entity we wrote, or any single character.
_TELEGRAM_TOKEN = re.compile(r"&(?:amp|lt|gt|quot);|.", re.DOTALL)
TELEGRAM_TEXT_UNITS = 4096
# Caps of each part, so that one long feed text cannot crowd out the rest.
_TELEGRAM_LINE_UNITS, _TELEGRAM_TITLE_UNITS, _TELEGRAM_FACT_UNITS = 2048, 1024, 512


def render(
    preset: Preset,
    stream_id: str,
    signal: Signal,
    data: bytes,
    *,
    chat_id: int | str | None = None,
) -> bytes:
    """The body to POST for one signal (`data`: the entry's JSON as stored on the stream;
    `chat_id`: the endpoint's, for telegram)."""
    if preset is Preset.DISCORD:
        return orjson.dumps(discord_body(signal))
    if preset is Preset.SLACK:
        return orjson.dumps(slack_body(signal))
    if preset is Preset.TELEGRAM:
        if chat_id is None:
            raise ValueError("a telegram body needs the endpoint's chat_id")
        return orjson.dumps(telegram_body(signal, chat_id))
    return signal_message(stream_id, data).encode()


def discord_body(signal: Signal) -> dict[str, Any]:
    fields: list[dict[str, Any]] = [
        {"name": name, "value": _discord(value, 512), "inline": True}
        for name, value in _facts(signal)
    ]
    status = _status(signal)
    if status:
        fields.insert(0, {"name": "Status", "value": _discord(status, 1024), "inline": False})
    title = _discord(_MARKS.get(signal.status, "") + _title(signal), 256)
    # The footer renders no markdown: cut, not escaped.
    footer = _cut(f"BetterBot · signal {signal.signal_id}", 256)
    # Fields and footer are capped so that the description always has room left in the 6000.
    used = len(title) + len(footer) + sum(len(f["name"]) + len(f["value"]) for f in fields)
    room = min(4096, _DISCORD_EMBED_CHARS - used)
    embed: dict[str, Any] = {
        "title": title,
        "description": _discord("\n".join(signal.reasons), room),
        "color": _color(signal),
        "fields": fields,
        "timestamp": datetime.fromtimestamp(signal.exchange_ts, UTC).isoformat(),
        "footer": {"text": footer},
    }
    url = market_url(signal.market_slug)
    if url is not None:
        embed["url"] = url
    return {
        "content": _line(signal, _discord, 2000),
        "embeds": [embed],
        "allowed_mentions": {"parse": []},
    }


def slack_body(signal: Signal) -> dict[str, Any]:
    title = _slack(_title(signal), 1000)
    url = market_url(signal.market_slug)
    if url is not None:
        title = f"<{url}|{title}>"
    blocks: list[dict[str, Any]] = [
        # plain_text parses no mention or link: nothing to escape there.
        {"type": "header", "text": {"type": "plain_text", "text": _cut(_header(signal), 150)}},
    ]
    if signal.status is not FillStatus.CONFIRMED:
        blocks.append({"type": "section", "text": _mrkdwn(_slack_status(signal))})
    blocks += [
        {"type": "section", "text": _mrkdwn(f"*{title}*")},
        {
            "type": "section",
            "fields": [
                _mrkdwn(f"*{name}*\n{_slack(value, 1900)}") for name, value in _facts(signal)
            ],
        },
    ]
    if signal.reasons:
        why = _slack(" · ".join(signal.reasons), 2900)
        blocks.append({"type": "context", "elements": [_mrkdwn(why)]})
    # The fallback `text` shows in notifications and is mrkdwn as well.
    return {"text": _line(signal, _slack, 3000), "blocks": blocks}


def telegram_body(signal: Signal, chat_id: int | str) -> dict[str, Any]:
    return {
        "chat_id": chat_id,
        "text": telegram_html(signal),
        "parse_mode": "HTML",
        # No preview: the market link needs none, and no feed text makes Telegram fetch a page.
        "link_preview_options": {"is_disabled": True},
    }


def telegram_html(signal: Signal) -> str:
    """The message in Telegram's HTML, within its 4096 units, every feed text escaped."""
    newline = _Html("\n")
    parts = [_Html(_line(signal, _telegram, _TELEGRAM_LINE_UNITS), "<b>", "</b>"), newline]
    status = _status(signal)
    if status:
        parts += [_Html(_telegram(f"Status: {status}", _TELEGRAM_LINE_UNITS)), newline]
    parts += [_telegram_title(signal), newline]
    for name, value in _facts(signal):
        parts += [_Html(_telegram(f"{name}: {value}", _TELEGRAM_FACT_UNITS)), newline]
    parts.append(_Html(f"Signal {_telegram(signal.signal_id, 64)}"))
    if signal.reasons:
        why = _telegram("\n".join(signal.reasons), TELEGRAM_TEXT_UNITS)
        parts += [newline, _Html(why, "<i>", "</i>")]
    return _fit(parts, TELEGRAM_TEXT_UNITS)


def market_url(slug: str) -> str | None:
    """The market's page, the slug encoded as one path segment; None when it names no page."""
    if not slug or len(slug) > MAX_SLUG_CHARS or not slug.strip("."):
        # Empty, `.` or `..` (a dot segment would climb out of /market/), or not a real slug.
        return None
    return MARKET_URL.format(slug=quote(slug, safe=""))


def headline(signal: Signal) -> str:
    """One line for notifications: who did what, where."""
    outcome = f" {signal.token_label}" if signal.token_label else ""
    return (
        f"{_kind(signal)}: {_wallet(signal)} {signal.side.value}{outcome} at "
        f"{_cents(signal.price)} · {_money(signal.notional_usd)} · {_title(signal)}"
    )


def _line(signal: Signal, escape: Callable[[str, int], str], limit: int) -> str:
    """The headline, marked with the status and ending with its reason when not confirmed.

    The reason is short and is the news: the headline is cut to leave room for it.
    """
    line = _MARKS.get(signal.status, "") + headline(signal)
    reason = _reason(signal)
    if not reason:
        return escape(line, limit)
    tail = " — " + escape(reason, _REASON_CHARS)
    return escape(line, limit - len(tail)) + tail


def _header(signal: Signal) -> str:
    outcome = f" {signal.token_label}" if signal.token_label else ""
    mark = _MARKS.get(signal.status, "")
    return f"{mark}{_kind(signal)}: {signal.side.value}{outcome} at {_cents(signal.price)}"


def _reason(signal: Signal) -> str:
    """Why the status changed; none for a confirmed signal, whose bodies stay as they were."""
    return "" if signal.status is FillStatus.CONFIRMED else signal.status_reason


def _status(signal: Signal) -> str:
    """`Retracted: <reason>`, `Pending`, ...; empty for a confirmed signal."""
    if signal.status is FillStatus.CONFIRMED:
        return ""
    word = signal.status.value.capitalize()
    reason = _reason(signal)
    return f"{word}: {reason}" if reason else word


def _slack_status(signal: Signal) -> str:
    word = signal.status.value.capitalize()
    reason = _reason(signal)
    return f"*{word}:* {_slack(reason, _REASON_CHARS)}" if reason else f"*{word}*"


def _color(signal: Signal) -> int:
    if signal.status is FillStatus.RETRACTED:
        return _RETRACTED_COLOR
    return _BUY_COLOR if signal.side is Side.BUY else _SELL_COLOR


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


def _mrkdwn(text: str) -> dict[str, Any]:
    # verbatim: Slack parses our explicit <url|label> only, no bare URL, #channel or @here.
    return {"type": "mrkdwn", "text": text, "verbatim": True}


def _slack(text: str, limit: int) -> str:
    return _escaped(text, _SLACK_ESCAPES, limit)


def _discord(text: str, limit: int) -> str:
    return _escaped(text, _DISCORD_ESCAPES, limit)


@dataclass(frozen=True, slots=True)
class _Html:
    """A part of a Telegram message: escaped text, inside one tag or none. Tags are never nested,
    so a part cut short still closes its own tag and leaves none open."""

    body: str
    open: str = ""
    close: str = ""


def _telegram_title(signal: Signal) -> _Html:
    title = _telegram(_title(signal), _TELEGRAM_TITLE_UNITS)
    url = market_url(signal.market_slug)
    if url is None:
        return _Html(title)
    # Percent-encoded already, so nothing changes; escaped all the same, as an attribute must be.
    # Never cut: a shortened URL is another URL.
    return _Html(title, f'<a href="{_telegram_escape(url)}">', "</a>")


def _telegram(text: str, limit: int) -> str:
    """`text` escaped for Telegram's HTML, then cut to `limit` UTF-16 units with an ellipsis."""
    escaped = _telegram_escape(text)
    if _units(escaped) <= limit:
        return escaped
    return _trim(escaped, limit - 1) + "…"


def _telegram_escape(text: str) -> str:
    return "".join(_TELEGRAM_ESCAPES.get(char, char) for char in text)


def _fit(parts: list[_Html], limit: int) -> str:
    """The parts joined, within `limit` UTF-16 units: when they are longer, the part that crosses
    the limit is cut (an ellipsis last, inside its tag, which is closed) and the rest left out."""
    whole = ["".join((part.open, part.body, part.close)) for part in parts]
    if sum(map(_units, whole)) <= limit:
        return "".join(whole)
    kept: list[str] = []
    room = limit - 1  # the ellipsis
    for part, text in zip(parts, whole, strict=True):
        if _units(text) <= room:
            kept.append(text)
            room -= _units(text)
            continue
        inner = room - _units(part.open) - _units(part.close)
        if inner < 0:
            kept.append("…")
        else:
            kept.append(part.open + _trim(part.body, inner) + "…" + part.close)
        break
    return "".join(kept)


def _trim(escaped: str, limit: int) -> str:
    """The longest start of escaped text within `limit` UTF-16 units, never cutting an entity."""
    size = 0
    for match in _TELEGRAM_TOKEN.finditer(escaped):
        size += _units(match.group())
        if size > limit:
            return escaped[: match.start()]
    return escaped


def _units(text: str) -> int:
    """Length in UTF-16 code units, as Telegram counts (a character beyond U+FFFF is two)."""
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


def _escaped(text: str, escapes: Mapping[str, str], limit: int) -> str:
    """`text` escaped, then cut to `limit` characters (an ellipsis last), never inside an escape."""
    pieces = [escapes.get(char, char) for char in text]
    if sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    kept: list[str] = []
    size = 0
    for piece in pieces:
        if size + len(piece) > limit - 1:
            break
        kept.append(piece)
        size += len(piece)
    return "".join(kept) + "…"
