"""Webhook endpoints, from the file named by `WEBHOOKS_FILE` (JSON, or YAML for `.yaml`/`.yml`).

```yaml
webhooks:
  - name: trading-desk            # letters, digits, . _ -; used in logs, metrics, dead letters
    url: https://example.com/hooks/betterbot
    secret: "at least 16 characters, random"   # signs every request (required for generic)
    preset: generic               # generic | discord | slack | telegram
    filters: {kinds: [whale_order], min_confidence: 0.8}   # see services.notifier.filters
    max_backlog: 10000            # signals waiting for this endpoint; more are dead-lettered
  - name: alerts
    url: https://discord.com/api/webhooks/<id>/<token>
    preset: discord
  - name: desk-chat
    preset: telegram              # the Bot API's sendMessage
    bot_token: "123456789:<35 characters from BotFather>"
    chat_id: -1001234567890       # a user, group or channel id, or "@channelusername"
    filters: {min_confidence: 0.9}
```

A bare list (without the `webhooks:` key) works too. `name` defaults to `webhook-<n>` (1-based).
URLs and secrets are never logged (a Discord or Slack webhook URL is itself a credential); the
endpoint's name stands for it everywhere. The file is read once, at startup.

Telegram: `chat_id` and `bot_token` are required there and refused elsewhere. `url` is the Bot API
server, `https://api.telegram.org` unless given (a local Bot API server, or a test receiver); each
request goes to `<url>/bot<token>/sendMessage`, so that URL is a credential too: only `target()`
builds it, for the request itself. Every secret of an endpoint (its signing secret, its bot token)
is registered for scrubbing from log lines as the file is read (`shared.logs.register_secret`).
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import orjson
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from services.notifier.filters import MATCH_ALL, Filters
from shared.logs import register_secret

MIN_SECRET_CHARS = 16
# About 10 MB of Redis per endpoint at ~1 KB a signal: hours of backlog for a dead endpoint.
DEFAULT_MAX_BACKLOG = 10_000

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]

TELEGRAM_API = "https://api.telegram.org"
# BotFather's tokens are the bot's numeric id, a colon and 35 characters of [A-Za-z0-9_-] (the Bot
# API docs' own example has 34): a range, so that a real token is never refused for its length.
_BOT_TOKEN = re.compile(r"[0-9]{1,20}:[A-Za-z0-9_-]{30,64}")
# A public username: a letter, then letters, digits and underscores, 4 to 32 in all (Fragment
# sells 4-character ones).
_CHANNEL = re.compile(r"@[A-Za-z][A-Za-z0-9_]{3,31}")
_CHAT_NUMBER = re.compile(r"-?[0-9]{1,16}")
# "at most 52 significant bits" (the Bot API docs on chat ids).
_CHAT_ID_BOUND = 2**52


class Preset(StrEnum):
    GENERIC = "generic"
    DISCORD = "discord"
    SLACK = "slack"
    TELEGRAM = "telegram"


class WebhookConfigError(ValueError):
    """The webhooks file cannot be used; the message names the file and the entry at fault."""


class Webhook(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name
    url: str = Field(repr=False)
    secret: SecretStr | None = None
    preset: Preset = Preset.GENERIC
    filters: Filters = MATCH_ALL
    max_backlog: int = Field(default=DEFAULT_MAX_BACKLOG, ge=1)
    # Telegram only.
    chat_id: int | str | None = None
    bot_token: SecretStr | None = Field(default=None, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _telegram_url(cls, data: Any) -> Any:
        # Telegram's server is the one a bot posts to unless told otherwise.
        if isinstance(data, dict) and data.get("preset") == Preset.TELEGRAM and "url" not in data:
            return {**data, "url": TELEGRAM_API}
        return data

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(f"must be at least {MIN_SECRET_CHARS} characters")
        return value

    @field_validator("chat_id", mode="before")
    @classmethod
    def _chat(cls, value: Any) -> int | str | None:
        if value is None:
            return None
        if isinstance(value, str) and _CHAT_NUMBER.fullmatch(value):
            value = int(value)  # a quoted id, as YAML or an editor may leave it
        if type(value) is int and 0 < abs(value) < _CHAT_ID_BOUND:
            return value
        if isinstance(value, str) and _CHANNEL.fullmatch(value):
            return value
        raise ValueError(
            "must be a chat id (an integer, negative for groups and channels) or @channelusername"
        )

    @field_validator("bot_token")
    @classmethod
    def _token_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _BOT_TOKEN.fullmatch(value.get_secret_value()):
            # Never echoed: a token with a typo is still most of a token.
            raise ValueError("must look like <bot id>:<35 characters>, as BotFather gives it")
        return value

    @model_validator(mode="after")
    def _generic_is_signed(self) -> Webhook:
        # Discord, Slack and Telegram check nothing, so a secret is optional there; a generic
        # receiver has nothing but the signature to trust the request by.
        if self.preset is Preset.GENERIC and self.secret is None:
            raise ValueError("a generic webhook needs a secret (its requests are signed)")
        return self

    @model_validator(mode="after")
    def _telegram_fields(self) -> Webhook:
        if self.preset is not Preset.TELEGRAM:
            if self.chat_id is not None or self.bot_token is not None:
                raise ValueError("chat_id and bot_token are for preset telegram only")
            return self
        if self.chat_id is None or self.bot_token is None:
            raise ValueError("a telegram webhook needs chat_id and bot_token")
        parts = urlsplit(self.url)
        if parts.query or parts.fragment:
            # The method's path is appended to it: a query or fragment would swallow it.
            raise ValueError("url: a telegram webhook's url is a Bot API server, without ? or #")
        return self

    def target(self) -> str:
        """The URL requests go to. A telegram one carries the bot token: never log it."""
        if self.bot_token is None:
            return self.url
        return f"{self.url.rstrip('/')}/bot{self.bot_token.get_secret_value()}/sendMessage"

    def secrets(self) -> list[str]:
        """The endpoint's secret values, for scrubbing: its URL (a Discord or Slack webhook URL
        is a credential; Telegram's is the public API's), signing secret and bot token."""
        values = [value.get_secret_value() for value in (self.secret, self.bot_token) if value]
        return values if self.preset is Preset.TELEGRAM else [self.url, *values]


def load_webhooks(path: Path) -> list[Webhook]:
    """The endpoints of the file; WebhookConfigError naming the problem otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WebhookConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    document = _parse(path, text)
    items = document.get("webhooks") if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise WebhookConfigError(f"{path}: expected a list of webhooks (or {{webhooks: [...]}})")
    hooks = [_webhook(path, n, item) for n, item in enumerate(items, start=1)]
    names = [hook.name for hook in hooks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise WebhookConfigError(f"{path}: duplicate webhook names: {', '.join(duplicates)}")
    for hook in hooks:
        # Here rather than in each caller, so that no caller can forget a kind of secret.
        for value in hook.secrets():
            register_secret(value)
    return hooks


def _parse(path: Path, text: str) -> Any:
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            return yaml.safe_load(text)
        return orjson.loads(text)
    except (yaml.YAMLError, orjson.JSONDecodeError) as exc:
        raise WebhookConfigError(f"{path}: not valid {path.suffix or 'JSON'}: {exc}") from None


def _webhook(path: Path, n: int, item: Any) -> Webhook:
    if not isinstance(item, dict):
        raise WebhookConfigError(f"{path}: webhook {n}: expected a mapping")
    try:
        return Webhook.model_validate({"name": f"webhook-{n}", **item})
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = ".".join(str(part) for part in error["loc"])
        where = f"{loc}: " if loc else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        # Never echo the input: it may be the URL or the secret.
        raise WebhookConfigError(f"{path}: webhook {n}: {where}{message}") from None
