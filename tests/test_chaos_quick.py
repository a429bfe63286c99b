"""The short chaos run of `make test`: 400 trades of the tape, every fault at once.

Detector replica and store killed while holding pending entries, the feed dropped and stalled,
Postgres cut, Redis (the suite's own, append-only) killed and restarted, the ingestor killed and
restarted: every tracked trade must still be stored once, every signal the rules give stored,
delivered to a resuming WebSocket subscriber and to a webhook, none twice, nothing left pending.
`make chaos` runs each fault alone on the whole tape, see chaos/.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from chaos import report
from chaos.main import TOGETHER, SuiteOptions, run_suite

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.integration]

OUTPUT = Path(__file__).resolve().parent / "output" / "chaos-quick"


async def test_every_fault_at_once_loses_and_doubles_nothing(postgres_admin_url: str) -> None:
    # A directory of this run's own: several test runs may share the checkout at once.
    run_dir = OUTPUT / f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    options = SuiteOptions(
        scenarios=[TOGETHER], trades=400, speed=60.0, detectors=2, log_dir=run_dir
    )
    document = await run_suite(options, postgres_admin_url, progress=False)
    report.write_json(run_dir / "results.json", document)
    (row,) = document["rows"]
    summary = report.table([row]) + "\n" + report.details([row])
    assert "error" not in row, summary
    assert all(fault["supported"] for fault in row["faults"]), summary
    assert row["orders_expected"] > 150 and row["signals_expected"] > 10, summary
    assert row["lost_total"] == 0 and row["duplicated_total"] == 0, summary
    assert row["pending_total"] == 0, summary
    assert row["orders_unexpected"] == 0 and row["signals_unexpected"] == 0, summary
    assert row["webhook_receiver"]["bad_signatures"] == 0, summary
    assert row["logs"]["key_in_logs"] == [], summary
    assert row["verdict"] == "ok", summary
    shutil.rmtree(run_dir, ignore_errors=True)  # kept (logs, results.json) only when failing
