"""The deployment files: secrets come from the environment (or a .env beside the compose file),
never from the image or the repository; the image runs as a non-root user; Redis and Postgres
are not reachable from outside the Compose network; published ports are on loopback only.

Read from the files themselves (YAML as written, `${...}` unresolved) so that a literal secret
cannot hide behind a resolved value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
SUBSTITUTION = re.compile(r"^\$\{[A-Z0-9_]+(:?-[^}]*)?\}$")
DOCKERFILE = (ROOT / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_every_secret_in_compose_comes_from_the_environment(compose: dict[str, Any]) -> None:
    literal = {
        f"{name}.{key}": value
        for name, service in compose["services"].items()
        for key, value in _environment(service).items()
        if SECRET_NAME.search(key) and not SUBSTITUTION.match(value)
    }
    assert literal == {}


def test_no_password_is_written_into_a_url_in_compose(compose: dict[str, Any]) -> None:
    written = {
        f"{name}.{key}": value
        for name, service in compose["services"].items()
        for key, value in _environment(service).items()
        for password in re.findall(r"://[^:/@]+:([^@]+)@", value)
        if not SUBSTITUTION.match(password)
    }
    assert written == {}


def test_redis_and_postgres_are_not_published(compose: dict[str, Any]) -> None:
    for name in ("redis", "postgres"):
        service = compose["services"][name]
        assert not service.get("ports"), f"{name} is published on the host"
        assert service.get("network_mode") != "host"


def test_published_ports_are_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports") or []:
            text = str(port.get("host_ip", "")) if isinstance(port, dict) else str(port)
            assert text.startswith("127.0.0.1:") or text == "127.0.0.1", f"{name}: {port}"


def test_the_image_runs_as_a_non_root_user() -> None:
    lines = [line.split(None, 1) for line in DOCKERFILE.splitlines() if line.strip()]
    instructions = [
        (words[0].upper(), words[1] if len(words) > 1 else "")
        for words in lines
        if not words[0].startswith("#")
    ]
    users = [i for i, (op, _) in enumerate(instructions) if op == "USER"]
    assert users, "no USER: the services would run as root"
    last = users[-1]
    assert instructions[last][1].strip() not in ("root", "0", "0:0")
    commands = [i for i, (op, _) in enumerate(instructions) if op in ("CMD", "ENTRYPOINT")]
    assert all(i > last for i in commands), "a CMD/ENTRYPOINT comes before the USER"


def test_no_secret_is_baked_into_the_image() -> None:
    for op, rest in re.findall(r"^(ENV|ARG)\s+(.+)$", DOCKERFILE, re.MULTILINE):
        assert not SECRET_NAME.search(rest.split("=")[0]), f"{op} {rest}"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".env", ".git"} <= ignored
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", DOCKERFILE, re.MULTILINE)
    sources = [Path(part) for line in copied for part in line.split()]
    assert Path(".") not in sources or ".env" in ignored
    for source in sources:
        path = ROOT / source
        files = [path] if path.is_file() else list(path.rglob("*"))
        leaked = [f for f in files if f.name == ".env" or f.suffix in (".pem", ".key")]
        assert leaked == [], f"would be copied into the image: {leaked}"


def test_the_env_file_is_never_committed() -> None:
    ignored = {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert ".env" in ignored
