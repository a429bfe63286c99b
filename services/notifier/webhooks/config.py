"""Webhook endpoints, from the file named by `WEBHOOKS_FILE` (JSON, or YAML for `.yaml`/`.yml`).

```yaml
webhooks:
  - name: trading-desk            # letters, digits, . _ -; used in logs, metrics, dead letters
    url: https://example.com/hooks/betterbot
    secret: "at least 16 characters, random"   # signs every request (required for generic)
    preset: generic               # generic | discord | slack
    filters: {kinds: [whale_order], min_confidence: 0.8}   # see services.notifier.filters
    max_backlog: 10000            # signals waiting for this endpoint; more are dead-lettered
  - name: alerts
    url: https://discord.com/api/webhooks/<id>/<token>
    preset: discord
```

A bare list (without the `webhooks:` key) works too. `name` defaults to `webhook-<n>` (1-based).
URLs and secrets are never logged (a Discord or Slack webhook URL is itself a credential); the
endpoint's name stands for it everywhere. The file is read once, at startup.
"""

from __future__ import annotations

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

MIN_SECRET_CHARS = 16
# About 10 MB of Redis per endpoint at ~1 KB a signal: hours of backlog for a dead endpoint.
DEFAULT_MAX_BACKLOG = 10_000

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class Preset(StrEnum):
    GENERIC = "generic"
    DISCORD = "discord"
    SLACK = "slack"


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

    @model_validator(mode="after")
    def _generic_is_signed(self) -> Webhook:
        # Discord and Slack check nothing, so a secret is optional there; a generic receiver
        # has nothing but the signature to trust the request by.
        if self.preset is Preset.GENERIC and self.secret is None:
            raise ValueError("a generic webhook needs a secret (its requests are signed)")
        return self


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
