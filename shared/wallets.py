"""The tracked-wallets file: a JSON list of {"address", "label", "score"?}."""

from __future__ import annotations

from pathlib import Path

import orjson
from pydantic import TypeAdapter, ValidationError

from shared.models import TrackedWallet

_WALLET_LIST = TypeAdapter(list[TrackedWallet])


class WalletFileError(ValueError):
    pass


def load_wallets(path: str | Path) -> list[TrackedWallet]:
    """Read and validate the wallets file; duplicates keep their first entry."""
    file = Path(path)
    try:
        wallets = _WALLET_LIST.validate_json(file.read_bytes())
    except FileNotFoundError as exc:
        raise WalletFileError(f"wallets file not found: {file}") from exc
    except ValidationError as exc:
        raise WalletFileError(f"wallets file {file} is invalid: {exc}") from exc
    unique: dict[str, TrackedWallet] = {}
    for wallet in wallets:
        unique.setdefault(wallet.address, wallet)
    return list(unique.values())


def dump_wallets(wallets: list[TrackedWallet]) -> bytes:
    return orjson.dumps(
        [w.model_dump(exclude_none=True) for w in wallets], option=orjson.OPT_INDENT_2
    )
