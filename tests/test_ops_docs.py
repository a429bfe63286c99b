"""docs/operations.md documents every setting of every service, with its real default, and its
internal links lead somewhere; docs/streams.md names files that exist."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from cli.settings import CliSettings
from services.detector.settings import DetectorSettings
from services.ingestor.settings import IngestorSettings
from services.notifier.settings import NotifierSettings
from services.simulator.settings import SimulatorSettings
from services.store.settings import StoreSettings

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
COMMON = "Common (every service)"
SECTIONS: dict[str, type[BaseSettings]] = {
    "ingestor": IngestorSettings,
    "detector": DetectorSettings,
    "store": StoreSettings,
    "notifier": NotifierSettings,
    "simulator": SimulatorSettings,
    "betterbot (CLI)": CliSettings,
}


def settings_tables() -> dict[str, dict[str, str]]:
    """Section title -> env name -> the default cell, from between the settings markers."""
    text = OPERATIONS.read_text()
    block = text.split("<!-- settings:begin -->")[1].split("<!-- settings:end -->")[0]
    tables: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in block.splitlines():
        if line.startswith("### "):
            current = tables.setdefault(line[4:].strip(), {})
        elif match := re.match(r"\| `([A-Z0-9_]+)` \| ([^|]*) \|", line):
            current[match[1]] = match[2].strip()
    return tables


def rendered(value: Any) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None or value in ((), ""):
        return "(empty)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return str(int(value)) if float(value).is_integer() else str(value)
    return f"`{value}`"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_setting_is_documented_with_its_default(section: str) -> None:
    tables = settings_tables()
    own, common = tables[section], tables[COMMON]
    cls = SECTIONS[section]
    for name, field in cls.model_fields.items():
        env = name.upper()
        factory: Any = field.default_factory
        default = factory() if factory else field.default
        # A service's own row wins; a common setting it does not override is in the common table.
        documented = own.get(env, common.get(env))
        assert documented is not None, f"{env} ({section}) is not in docs/operations.md"
        assert documented == rendered(default), (
            f"{env} ({section}): the doc says {documented}, the code {rendered(default)}"
        )


def test_internal_links_have_targets() -> None:
    text = OPERATIONS.read_text()
    headings = {
        re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    }
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in headings, f"link to #{anchor} has no heading"


def test_files_the_stream_docs_point_to_exist() -> None:
    text = (ROOT / "docs" / "streams.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / "docs" / target).resolve().exists(), target
