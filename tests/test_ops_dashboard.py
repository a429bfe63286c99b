"""The provisioned Grafana dashboard queries only metrics the code exports, through the
provisioned datasource, so no panel is silently empty after a rename."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "betterbot.json"
DATASOURCES = ROOT / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
METRIC_MODULES = [
    "services.ingestor.metrics",
    "services.detector.metrics",
    "services.store.metrics",
    "services.notifier.metrics",
    "services.simulator.app",
    "shared.stream_metrics",
    "shared.consumer",
]
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
BUILT_IN = {"up"}


def exported_series() -> set[str]:
    for module in METRIC_MODULES:
        importlib.import_module(module)
    names = set()
    for family in REGISTRY.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_every_query_uses_an_exported_metric() -> None:
    exported = exported_series() | BUILT_IN
    for panel in panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\b(betterbot_[a-z0-9_]+|up)\b", target["expr"]))
            assert used, (panel["title"], target["expr"])
            assert used <= exported, f"{panel['title']}: {sorted(used - exported)} not exported"


def test_panels_use_the_provisioned_datasource_and_do_not_overlap() -> None:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    cells: set[tuple[int, int]] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        pos = panel["gridPos"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        assert pos["x"] + pos["w"] <= 24
        cells |= area
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))
