"""docker-compose.yml, checked by a real Compose parser since no Docker engine runs here."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = {"simulator", "ingestor", "detector", "store", "notifier"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    assert binary, (
        "docker-compose (the Compose parser) is not installed: apt-get install docker-compose"
    )
    result = subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    assert result.returncode == 0, f"compose file invalid: {result.stderr}"
    return dict(yaml.safe_load(result.stdout))


def test_every_service_is_declared_with_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == APP_SERVICES | {"redis", "postgres"}
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"


def test_commands_name_real_entry_points(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        command = compose["services"][name]["command"]
        assert command[:2] == ["python", "-m"], command
        module = command[2]
        assert module == f"services.{name}"
        assert importlib.util.find_spec(f"{module}.__main__") is not None, (
            f"{module} has no __main__"
        )


def test_app_services_wait_for_healthy_backing_services(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES - {"simulator"}:
        depends = compose["services"][name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["postgres"]["condition"] == "service_healthy", name
    assert (
        compose["services"]["ingestor"]["depends_on"]["simulator"]["condition"] == "service_healthy"
    )


def test_detector_scales(compose: dict[str, Any]) -> None:
    # `--scale detector=3` fails on a fixed container name or a published host port.
    detector = compose["services"]["detector"]
    assert "container_name" not in detector
    assert "ports" not in detector


def test_backing_services_not_published_and_app_ports_on_loopback(compose: dict[str, Any]) -> None:
    assert "ports" not in compose["services"]["redis"]
    assert "ports" not in compose["services"]["postgres"]
    for name in APP_SERVICES:
        for port in compose["services"][name].get("ports", []):
            # Compose v1 prints "127.0.0.1:8080:8080/tcp"; the v2 long form has host_ip.
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_healthchecks_probe_the_port_the_service_serves(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        service = compose["services"][name]
        env = service.get("environment", {})
        port = env.get("OPS_PORT") or env.get("NOTIFIER_PORT") or env.get("SIM_PORT")
        probe = " ".join(service["healthcheck"]["test"])
        assert re.search(rf"127\.0\.0\.1:{port}/health", probe), f"{name}: {probe}"


def test_image_runs_as_non_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
