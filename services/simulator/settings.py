"""Settings of the simulator, from the environment (unprefixed names such as SIM_PORT) or `.env`.

| env | default | meaning |
|---|---|---|
| SIM_HOST / SIM_PORT | 127.0.0.1 / 8765 | WebSocket, REST, /health, /metrics and /_sim (0: any) |
| SIM_API_KEY | empty | the one accepted key; empty accepts any non-empty key |
| SIM_MODE | tape | `tape` (replay SIM_TAPE) or `synthetic` (random trades at SIM_RATE) |
| SIM_TAPE | data/polymarket_trades_nobel2025.json | Data-API trades (a JSON list) |
| SIM_SPEED | 30 | tape seconds played per real second |
| SIM_LOOP | true | replay the tape again, with fresh hashes, when it ends |
| SIM_SEED / SIM_RATE | 42 / 100 | synthetic mode: random seed, orders per second |
| SIM_WALLETS_FILE | config/wallets.example.json | synthetic mode: the wallets that trade |
| SIM_WAIT_FOR_SUBSCRIBER | true | start the clock at the first WebSocket subscription |
| SIM_BLOCK_TIME_S | 2 | seconds between blocks of the simulated Polygon node (`/rpc`) |
| SIM_HISTORY_MAX | 1000000 | emitted trades kept for REST and the ground truth (oldest dropped) |
| SIM_SEND_QUEUE_MAX | 10000 | frames queued per client before it is cut off (close 1013) |
| SIM_MAX_SUBSCRIPTIONS | 500 | subscriptions per connection (Dome's Dev tier) |
| SIM_MAX_FILTER_VALUES | 500 | values per filter list (Dome's Dev tier: 500 wallets) |
| LOG_LEVEL | INFO | |

Relative paths are read from the working directory, else from the project root, so the defaults
work from anywhere inside the checkout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from shared.settings import CommonSettings

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: Path) -> Path:
    if path.is_absolute() or path.exists():
        return path
    return PROJECT_ROOT / path


class SimulatorSettings(CommonSettings):
    sim_host: str = "127.0.0.1"
    sim_port: int = Field(default=8765, ge=0, le=65535)
    sim_api_key: SecretStr = SecretStr("")
    sim_mode: Literal["tape", "synthetic"] = "tape"
    sim_tape: Path = Path("data/polymarket_trades_nobel2025.json")
    sim_speed: float = Field(default=30.0, gt=0)
    sim_loop: bool = True
    sim_seed: int = 42
    sim_rate: float = Field(default=100.0, gt=0)
    sim_wallets_file: Path = Path("config/wallets.example.json")
    sim_wait_for_subscriber: bool = True
    # Seconds between two blocks of the simulated Polygon chain (`/rpc`); Polygon's is about 2.
    sim_block_time_s: float = Field(default=2.0, gt=0)
    sim_history_max: int = Field(default=1_000_000, ge=1)
    sim_send_queue_max: int = Field(default=10_000, ge=1)
    sim_max_subscriptions: int = Field(default=500, ge=1)
    sim_max_filter_values: int = Field(default=500, ge=1)
