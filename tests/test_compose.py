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
MONITORING = {"prometheus", "grafana"}
MONITORING_DIR = ROOT / "monitoring"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    assert binary, (
        "docker-compose (the Compose parser) missing: `make test` installs it (devtools/prereqs.sh)"
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
    assert set(services) == APP_SERVICES | MONITORING | {"redis", "postgres"}
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
    for name in APP_SERVICES | MONITORING:
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


def _port_of(service: dict[str, Any]) -> int:
    env = service.get("environment", {})
    return int(env.get("OPS_PORT") or env.get("NOTIFIER_PORT") or env.get("SIM_PORT"))


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of every bind mount (Compose v1 prints `src:dst:mode`)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts[volume["target"]] = Path(volume["source"])
            continue
        source, target = volume.split(":")[:2]
        if source.startswith("/"):
            mounts[target] = Path(source)
    return mounts


def test_monitoring_mounts_the_files_in_the_repository(compose: dict[str, Any]) -> None:
    for name in MONITORING:
        mounts = _bind_mounts(compose["services"][name])
        assert mounts, f"{name} mounts nothing from monitoring/"
        for target, source in mounts.items():
            assert source.resolve().is_relative_to(MONITORING_DIR), (name, target, source)
            assert source.exists(), f"{name} mounts {source}, which does not exist"


def test_prometheus_scrapes_every_app_service_at_its_port(compose: dict[str, Any]) -> None:
    mounts = _bind_mounts(compose["services"]["prometheus"])
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    command = " ".join(compose["services"]["prometheus"]["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    scraped = {
        (sd["names"][0], sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
    }
    expected = {(name, _port_of(compose["services"][name])) for name in APP_SERVICES}
    assert scraped == expected


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    prometheus_port = compose["services"]["prometheus"]["ports"][0]
    assert datasource["url"] == "http://prometheus:9090" and ":9090:" in str(prometheus_port)
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "betterbot.yml").read_text())[
        "providers"
    ]
    dashboards = mounts[provider["options"]["path"]]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).name).exists()
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
