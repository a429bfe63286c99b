"""The CLI's settings: the services' environment names, so one `.env` serves both.

- `REDIS_URL`, `STREAM_NAMESPACE`, `STREAM_MAXLEN`: as for every service (`shared.settings`);
  `--redis-url` and `--namespace` override the first two.
- `DATABASE_URL`: where `wallets add|remove` mirror the change (table `tracked_wallets`, when it
  exists); `--db off` skips Postgres, `--db require` makes its failure an error.
- `WALLETS_FILE` (`config/wallets.example.json`): the seed of the wallet registry, applied (as
  the services do) before the first change, so the CLI never leaves a registry holding only the
  wallet it added.
- `DATA_API_URL`, `GAMMA_API_URL` (the simulator's, `http://127.0.0.1:8765`): where `wallets
  discover` reads the leaderboard, the wallets' history and the markets' resolutions (the
  services' settings of the same names; Polymarket's are `https://data-api.polymarket.com` and
  `https://gamma-api.polymarket.com`).
- `DEDUPE_TTL_S` (604800): how long `replay-tape` and `dead replay` mark an order_key as seen,
  the ingestor's setting of the same name.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from shared.settings import DatabaseSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class CliSettings(DatabaseSettings):
    wallets_file: str = "config/wallets.example.json"
    data_api_url: str = "http://127.0.0.1:8765"
    gamma_api_url: str = "http://127.0.0.1:8765"
    dedupe_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    # The detector's, for `partitions move` to tell recent decisions from old ones.
    detector_done_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)

    def wallets_path(self) -> Path:
        path = Path(self.wallets_file)
        if path.is_absolute() or path.exists():
            return path
        return PROJECT_ROOT / path
