"""`python -m services.ingestor`: configure logging, load settings, ingest until SIGTERM.

Exit codes: 0 after a clean stop with everything flushed; 1 when fills could not be flushed to
Redis before the shutdown timeout; 2 on a configuration it cannot run with (the log says why).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic import ValidationError

from services.ingestor.service import Ingestor, StartupError
from services.ingestor.settings import IngestorSettings
from shared.logs import configure_logging, register_secret
from shared.ops import settle_heap, stop_event

log = logging.getLogger(__name__)


def main() -> None:
    try:
        settings = IngestorSettings()
    except ValidationError as exc:
        configure_logging("ingestor")
        log.error("startup_failed", extra={"reason": f"invalid settings: {exc}"})
        sys.exit(2)
    configure_logging("ingestor", settings.log_level)
    for secret in settings.secrets():
        register_secret(secret)
    try:
        settle_heap()
        left = asyncio.run(_serve(settings))
    except StartupError as exc:
        log.error("startup_failed", extra={"reason": str(exc)})
        sys.exit(2)
    sys.exit(0 if left == 0 else 1)


async def _serve(settings: IngestorSettings) -> int:
    ingestor = Ingestor(settings)
    log.info(
        "starting",
        extra={
            "sources": ",".join(settings.sources()),
            "dialect": settings.dome_dialect,
            "seed_wallets": len(ingestor.seed),
            "streams": settings.streams.order_streams(),
        },
    )
    return await ingestor.run(stop_event())
