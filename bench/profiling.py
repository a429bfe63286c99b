"""Where a service spends its time under load: py-spy on the live process, summarised.

`python -m bench profile <service> [--rate R] [--seconds S]` starts the pipeline, feeds it R
orders/s, attaches `py-spy record` (raw collapsed stacks, non-blocking, idle samples left out) to
the service for S seconds and prints the top functions by own time and by inclusive time.
`--stage N` profiles the detector or the store alone instead, working through N pre-filled
entries (see `stages`): the stage at full speed with nothing else competing for the cores.
The collapsed stacks are kept in `.run/bench/profile-<service>[-stage].txt` (any flame-graph tool
reads them); the summary goes to `bench/results/profile-<service>[-stage].txt`.

py-spy is not a dependency of the services: `pip install py-spy` (or `pip install -e '.[bench]'`).
It needs ptrace rights on the process (root, or kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

from bench import stages
from bench.environment import LOG_DIR, BenchEnv
from bench.pipeline import Pipeline
from devtools.processes import ServiceProcess

_LINE = re.compile(r":\d+\)$")
SERVICES = ("ingestor", "detector", "store", "notifier", "simulator")


def frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (path/to/file.py)`, so lines of one function merge."""
    return _LINE.sub(")", frame.strip())


def package_of(name: str) -> str:
    """The library or project package a frame belongs to: `redis`, `asyncio`, `services/store`."""
    path = name[name.rfind("(") + 1 : -1]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    parts = [p for p in path.split("/") if p]
    if parts[:1] in (["services"], ["shared"]) and len(parts) > 2:
        return "/".join(parts[:2])
    if len(parts) > 1 and parts[0].startswith("python3"):
        parts = parts[1:]
    return parts[0].removesuffix(".py") if parts else path


def _ours(name: str) -> bool:
    return "(services/" in name or "(shared/" in name


def summarise(collapsed: str, top: int = 15) -> str:
    """Own (leaf) time by function and by package, and the project's functions inclusive."""
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        packages[package_of(frames[-1])] += count
        for name in {f for f in frames if _ours(f)}:
            inclusive[name] += count
    if not total:
        return "no samples (was the process idle, or py-spy denied?)\n"
    # Entry points sit under (nearly) every sample and say nothing.
    trunk = {
        name
        for name, n in inclusive.items()
        if n >= 0.95 * total or name.startswith(("<module> (", "main ("))
    }

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    lines = [f"{total} samples (non-idle)", "", "own time by function (where the CPU is):"]
    lines += [f"  {pct(n)}  {name}" for name, n in own.most_common(top)]
    lines += ["", "own time by package:"]
    lines += [f"  {pct(n)}  {name}" for name, n in packages.most_common(top)]
    lines += ["", "project functions, inclusive (the function and all it calls):"]
    ranked = [(name, n) for name, n in inclusive.most_common() if name not in trunk]
    lines += [f"  {pct(n)}  {name}" for name, n in ranked[:top]]
    return "\n".join(lines) + "\n"


async def record(proc: ServiceProcess, seconds: float, out: Path, rate_hz: int = 200) -> str:
    """py-spy record on a live process; the collapsed stacks as text."""
    # The venv's bin is not on PATH when the venv's python is run directly (as make does).
    binary = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.defpath}")
    binary = binary or shutil.which("py-spy")
    if binary is None:
        raise RuntimeError("py-spy not found: pip install py-spy")
    spy = await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(proc.pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        str(rate_hz),
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await spy.communicate()
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    return await asyncio.to_thread(out.read_text)


async def profile_stage(
    env: BenchEnv, service: str, items: int, seconds: float, results_dir: Path
) -> str:
    """py-spy on the service working through a pre-filled stream alone (detector or store)."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    out = LOG_DIR / f"profile-{service}-stage.txt"

    async def spy(procs: list[ServiceProcess]) -> str:
        return await record(procs[0], seconds, out)

    if service == "detector":
        result = await stages.detector(env, items, 1, watch=spy)
    elif service == "store":
        result = await stages.store(env, items, watch=spy)
    else:
        raise ValueError(f"no stage profile for {service}: use the pipeline profile (--rate)")
    header = (
        f"py-spy profile of the {service} stage alone: {result['items']:,} items pre-filled, "
        f"drained in {result['seconds']}s ({result['per_s']}/s); first {seconds:g}s sampled\n\n"
    )
    text = header + summarise(result["watched"])
    await asyncio.to_thread((results_dir / f"profile-{service}-stage.txt").write_text, text)
    return text


async def profile_service(
    pipe: Pipeline, service: str, rate: float, seconds: float, results_dir: Path
) -> str:
    await pipe.start_feed(rate, keep_history=False)
    await asyncio.sleep(2)  # past connection set-up and first batches
    proc = pipe.simulator if service == "simulator" else pipe.services[service]
    assert proc is not None
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    collapsed = await record(proc, seconds, LOG_DIR / f"profile-{service}.txt")
    snap = await pipe.snapshot()
    await pipe.stop_feed()
    backlog = snap.backlogs(0)
    header = (
        f"py-spy profile of {service} at {rate:,.0f} orders/s for {seconds:g}s "
        f"(backlogs at the end: detector {backlog['detector']:,}, store {backlog['store']:,}, "
        f"notifier {backlog['notifier']:,})\n\n"
    )
    text = header + summarise(collapsed)
    target = results_dir / f"profile-{service}.txt"
    await asyncio.to_thread(target.write_text, text)
    return text
