"""docker-compose.yml (and docker-compose.cluster.yml over it), checked by a real Compose parser
since no Docker engine runs here; the cluster profile's init script runs for real."""

from __future__ import annotations

import importlib.util
import random
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from devtools.servers import port_open

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = {"simulator", "ingestor", "detector", "store", "notifier"}
MONITORING = {"prometheus", "grafana"}
MONITORING_DIR = ROOT / "monitoring"
CLUSTER_NODES = {f"redis-cluster-{n}" for n in range(1, 7)}
CLUSTER_INIT = "redis-cluster-init"
REDIS_CLIENTS = APP_SERVICES - {"simulator"}


def _config(*files: str) -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    assert binary, (
        "docker-compose (the Compose parser) missing: `make test` installs it (devtools/prereqs.sh)"
    )
    result = subprocess.run(
        [binary, *(arg for name in files for arg in ("-f", str(ROOT / name))), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    assert result.returncode == 0, f"compose file invalid: {result.stderr}"
    return dict(yaml.safe_load(result.stdout))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _config("docker-compose.yml")


@pytest.fixture(scope="module")
def cluster_compose() -> dict[str, Any]:
    return _config("docker-compose.yml", "docker-compose.cluster.yml")


def test_every_service_is_declared_with_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = APP_SERVICES | MONITORING | {"redis", "postgres"} | CLUSTER_NODES | {CLUSTER_INIT}
    assert set(services) == expected
    # The init is one-shot: what waits for it waits for it to exit 0, not to be healthy.
    for name, service in services.items():
        assert "healthcheck" in service or name == CLUSTER_INIT, f"{name} has no healthcheck"


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


def _environment(service: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (service.get("environment") or {}).items()}


def _init_script(compose: dict[str, Any]) -> str:
    command = compose["services"][CLUSTER_INIT]["command"]
    assert command[:2] == ["sh", "-ec"], command
    return str(command[2]).replace("$$", "$")  # Compose's escape of a literal $


def test_the_cluster_profile_holds_the_cluster_and_nothing_else(compose: dict[str, Any]) -> None:
    profiled = {name for name, service in compose["services"].items() if service.get("profiles")}
    assert profiled == CLUSTER_NODES | {CLUSTER_INIT}
    for name in profiled:
        assert compose["services"][name]["profiles"] == ["cluster"], name


def test_cluster_nodes_announce_their_service_names(compose: dict[str, Any]) -> None:
    for name in CLUSTER_NODES:
        node = compose["services"][name]
        assert node["image"] == "redis:7" and "ports" not in node, name
        # $HOSTNAME is what `hostname:` sets: the name other services resolve.
        assert node["hostname"] == name
        command = " ".join(node["entrypoint"])
        for option in (
            "--cluster-enabled yes",
            '--cluster-announce-hostname "$$HOSTNAME"',
            "--cluster-preferred-endpoint-type hostname",
        ):
            assert option in command, (name, option)
        assert node["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_cluster_init_waits_for_every_node_and_asks_for_three_masters(
    compose: dict[str, Any],
) -> None:
    init = compose["services"][CLUSTER_INIT]
    assert init["depends_on"] == {name: {"condition": "service_healthy"} for name in CLUSTER_NODES}
    script = _init_script(compose)
    (names,) = re.findall(r"^for node in (.+); do$", script, re.MULTILINE)
    assert sorted(names.split()) == sorted(CLUSTER_NODES)
    (replicas,) = re.findall(r"--cluster-replicas (\d+)", script)
    assert len(CLUSTER_NODES) // (int(replicas) + 1) == 3
    # The idempotence guard comes before the create.
    assert script.index("cluster_slots_assigned:16384") < script.index("--cluster create")


def test_the_pipeline_runs_on_the_cluster_with_the_override(
    compose: dict[str, Any], cluster_compose: dict[str, Any]
) -> None:
    talks_to_redis = {
        name
        for name, service in compose["services"].items()
        if "REDIS_URL" in _environment(service)
    }
    assert talks_to_redis == REDIS_CLIENTS
    for name in REDIS_CLIENTS:
        alone = _environment(compose["services"][name])
        assert urlsplit(alone["REDIS_URL"]).hostname == "redis" and "REDIS_CLUSTER" not in alone
        service = cluster_compose["services"][name]
        env = _environment(service)
        url = urlsplit(env["REDIS_URL"])
        assert env["REDIS_CLUSTER"] == "true", name
        # Every service must route fills to the same partitions.
        assert env["STREAM_PARTITIONS"] == "4", name
        assert url.hostname in CLUSTER_NODES and url.port == 6379 and url.path == "/0", name
        init = service["depends_on"][CLUSTER_INIT]
        assert init["condition"] == "service_completed_successfully", name


def _without_cluster(service: dict[str, Any]) -> dict[str, Any]:
    service = dict(service)
    service["environment"] = {
        k: v
        for k, v in _environment(service).items()
        if k not in ("REDIS_URL", "REDIS_CLUSTER", "STREAM_PARTITIONS")
    }
    service["depends_on"] = {
        k: v for k, v in (service.get("depends_on") or {}).items() if k != CLUSTER_INIT
    }
    # Compose v1 prints the volumes of a merged service in another order.
    service["volumes"] = sorted(map(str, service.get("volumes") or []))
    return service


def test_the_override_changes_nothing_but_where_redis_is(
    compose: dict[str, Any], cluster_compose: dict[str, Any]
) -> None:
    assert cluster_compose["services"].keys() == compose["services"].keys()
    for name, service in compose["services"].items():
        assert _without_cluster(cluster_compose["services"][name]) == _without_cluster(service)


@pytest.fixture
def node_addresses(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Six empty cluster-enabled nodes, each on port 6379 of an address of its own, as in
    Compose: 127.0.0.0/8 is all loopback; a random /24 of it keeps concurrent runs apart."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server missing: `make test` installs it (devtools/prereqs.sh)"
    prefix = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}"
    addresses = {name: f"{prefix}.{n}" for n, name in enumerate(sorted(CLUSTER_NODES), 2)}
    procs = []
    for name, address in addresses.items():
        (tmp_path / name).mkdir()
        options = ["--bind", address, "--port", "6379", "--dir", str(tmp_path / name)]
        # Containers have addresses of their own; here the bus would connect from 127.0.0.1.
        options += ["--cluster-announce-ip", address]
        cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        light = ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
        procs.append(
            subprocess.Popen([binary, *options, *cluster, *light], stdout=subprocess.DEVNULL)
        )
    try:
        for address in addresses.values():
            _wait_answers(address)
        yield addresses
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def _wait_answers(address: str) -> None:
    deadline = time.monotonic() + 20
    while not port_open(address, 6379):
        assert time.monotonic() < deadline, f"redis-server on {address}:6379 did not start"
        time.sleep(0.05)


def _run_init(script: str, addresses: dict[str, str], tmp_path: Path) -> str:
    # Compose's DNS is the one thing missing here: getent answers as it would.
    stub = tmp_path / "bin" / "getent"
    stub.parent.mkdir(exist_ok=True)
    cases = "".join(f'  {name}) echo "{ip}      STREAM $2";;\n' for name, ip in addresses.items())
    stub.write_text(f'#!/bin/sh\ncase "$2" in\n{cases}esac\n')
    stub.chmod(0o755)
    result = subprocess.run(
        ["sh", "-ec", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": f"{stub.parent}:/usr/bin:/bin", "HOME": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.integration
def test_cluster_init_forms_three_masters_and_three_replicas_once(
    compose: dict[str, Any], node_addresses: dict[str, str], tmp_path: Path
) -> None:
    script = _init_script(compose)
    _run_init(script, node_addresses, tmp_path)
    # The script returns once the slots are served; the replicas attach a moment later.
    deadline = time.monotonic() + 20
    while _roles(node_addresses["redis-cluster-1"]) != {"master": 3, "slave": 3}:
        assert time.monotonic() < deadline, _roles(node_addresses["redis-cluster-1"])
        time.sleep(0.1)
    assert "already formed" in _run_init(script, node_addresses, tmp_path)


def _roles(address: str) -> Counter[str]:
    nodes = subprocess.run(
        ["redis-cli", "-h", address, "cluster", "nodes"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return Counter(
        role for line in nodes for role in ("master", "slave") if role in line.split()[2]
    )
