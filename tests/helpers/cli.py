"""Run `betterbot` commands in-process (tests/test_cli_*.py): exit code, JSON output, stderr."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from cli.main import run


class Cli:
    def __init__(self, redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.base = ["--redis-url", redis_url, "--namespace", namespace]
        self.capsys = capsys

    async def __call__(self, *args: str, as_json: bool = True) -> tuple[int, Any, str]:
        """Exit code, stdout (parsed when `as_json`), stderr."""
        self.capsys.readouterr()
        code = await run([*args, *self.base, *(["--json"] if as_json else [])])
        out, err = self.capsys.readouterr()
        if as_json:
            return code, orjson.loads(out) if out.strip() else None, err
        return code, out, err
