"""Arguments and wiring of `betterbot`; each command's logic lives in its own module.

Exit codes: 0 done; 1 done in part (entries kept, items skipped, a required Postgres write
failed, nothing to remove); 2 bad input (arguments, an address, a file) or Redis unreachable
(`validate`: Postgres, which it reads).
Results go to stdout, problems to stderr; `--json` prints machine-readable output instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from cli import dead, lag, partitions, tape, validate, wallets, wallets_discover
from cli.settings import CliSettings
from cli.signals import SignalFilter, tail
from services.store.wallet_quality_source import QualitySource
from shared import layout
from shared.logs import redact_url
from shared.models import TrackedWallet, normalize_address
from shared.stream_metrics import public_streams
from shared.streams import MAX_PARTITIONS, Streams
from shared.terminal import printable
from shared.wallet_registry import load, snapshot
from shared.wallets import WalletFileError, load_wallets


class UsageError(ValueError):
    pass


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", help="default: REDIS_URL")
    common.add_argument("--namespace", help="stream prefix; default: STREAM_NAMESPACE")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="betterbot", description="Operate a BetterBot deployment (Redis Streams, Postgres)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    signals = commands.add_parser("signals", help="the signals stream").add_subparsers(
        dest="action", required=True
    )
    t = signals.add_parser("tail", parents=[common], help="follow signals, filtered")
    t.add_argument("--kind", action="append", default=[], help="repeatable: trader_entry, ...")
    t.add_argument("--wallet", action="append", default=[], help="repeatable: 0x address")
    t.add_argument("--min-confidence", type=float, default=0.0)
    t.add_argument("--from", dest="start", default="$", help="$ (new only), 0 (all kept), or an id")
    t.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")

    w = commands.add_parser("wallets", help="tracked wallets").add_subparsers(
        dest="action", required=True
    )
    db_help = "Postgres mirror: auto (if reachable), require, off"
    for name, help_text in (
        ("list", "the tracked wallets"),
        ("add", "track or relabel a wallet"),
        ("remove", "stop tracking a wallet"),
    ):
        sub = w.add_parser(name, parents=[common], help=help_text)
        sub.add_argument("--db", choices=("auto", "require", "off"), default="auto", help=db_help)
        if name != "list":
            sub.add_argument("address")
        if name == "add":
            sub.add_argument("--label", default="")
            sub.add_argument("--score", type=float, default=None, help="0..1")
    wallets_discover.add_arguments(
        w.add_parser(
            "discover", parents=[common], help="propose wallets from the leaderboard, scored"
        )
    )

    lag_cmd = commands.add_parser("lag", parents=[common], help="consumer lag and pending entries")
    lag_cmd.add_argument("--consumers", action="store_true", help="list each group's consumers")
    lag_cmd.add_argument("--stream", action="append", default=[], help="repeatable; default: all")

    d = commands.add_parser("dead", help="dead letters").add_subparsers(
        dest="action", required=True
    )
    dl = d.add_parser("list", parents=[common], help="oldest first")
    dl.add_argument("stream", help="orders.dead, signals.dead, ...")
    dl.add_argument("--count", type=int, default=20)
    dl.add_argument("--after", default="-", help="start at this id (inclusive)")
    dr = d.add_parser("replay", parents=[common], help="send dead letters back to their stream")
    dr.add_argument("stream")
    which = dr.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="ids", action="append", default=[], help="repeatable")
    which.add_argument("--all", action="store_true")
    dr.add_argument("--to", help="target stream (default: the one the dead stream belongs to)")
    dr.add_argument("--force", action="store_true", help="replay even if the payload is invalid")

    rt = commands.add_parser("replay-tape", parents=[common], help="feed a Data-API trades file")
    rt.add_argument("file", type=Path)
    rt.add_argument("--all-wallets", action="store_true", help="not only tracked wallets' trades")
    rt.add_argument("--batch", type=int, default=500)

    parts = commands.add_parser(
        "partitions", help="the partition count of orders.raw (STREAM_PARTITIONS)"
    ).add_subparsers(dest="action", required=True)
    parts.add_parser("status", parents=[common], help="lanes, lengths, what is not drained yet")
    mv = parts.add_parser(
        "move", parents=[common], help="move the state of a drained pipeline to another count"
    )
    mv.add_argument("--to", type=int, required=True, help="the new STREAM_PARTITIONS")
    mv.add_argument(
        "--recent-s",
        type=int,
        default=3600,
        help="decisions younger than this move (those a fill can still change status in)",
    )
    mv.add_argument("--done-ttl-s", type=int, default=0, help="default: DETECTOR_DONE_TTL_S")

    val = commands.add_parser(
        "validate", parents=[common], help="does following the signals pay? (markouts, settlement)"
    )
    val.add_argument("--by", choices=("kind", "wallet", "source"), default="kind")
    val.add_argument("--since", help="signals detected from: RFC 3339, Unix seconds, or 7d, 24h")
    val.add_argument("--until", help="signals detected before; as --since")
    return parser


def _stream(streams: Streams, name: str) -> str:
    ns = streams.namespace
    return name if ns and name.startswith(ns) else ns + name


def _emit(args: argparse.Namespace, data: Any, lines: Sequence[str]) -> None:
    if args.json:
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        for line in lines:
            print(printable(line))


def _seed(settings: CliSettings) -> list[TrackedWallet]:
    try:
        return load_wallets(settings.wallets_path())
    except WalletFileError as exc:
        raise UsageError(f"{exc} (WALLETS_FILE seeds an empty registry)") from None


async def cmd_signals(args: argparse.Namespace, client: aioredis.Redis, s: CliSettings) -> int:
    try:
        matcher = SignalFilter.build(args.kind, args.wallet, args.min_confidence)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    await tail(
        client, s.streams.signals, matcher, start=args.start, limit=args.count, as_json=args.json
    )
    return 0


async def cmd_wallets(args: argparse.Namespace, client: aioredis.Redis, s: CliSettings) -> int:
    if args.action == "list":
        return await _wallets_list(args, client, s)
    if args.action == "discover":
        return await _wallets_discover(args, client, s)
    try:
        address = normalize_address(args.address)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    seed = _seed(s)
    if args.action == "add":
        try:
            wallet = TrackedWallet(address=address, label=args.label, score=args.score)
        except ValidationError as exc:
            raise UsageError(f"invalid wallet: {exc.errors(include_url=False)[0]['msg']}") from None
        control_id = await wallets.add(client, s.streams, wallet, seed)
        op: Literal["upsert", "remove"] = "upsert"
        done = f"tracking {address}" + (f" ({wallet.label})" if wallet.label else "")
    else:
        previous, removed_id = await wallets.remove(client, s.streams, address, seed)
        if previous is None or removed_id is None:
            print(f"{address} is not tracked", file=sys.stderr)
            return 1
        wallet, control_id, op, done = previous, removed_id, "remove", f"stopped tracking {address}"
    try:
        mirrored = await wallets.mirror(s.database_url, args.db, op, wallet, control_id)
    except wallets.MirrorError as exc:
        print(f"{done}; control entry {control_id}; {exc}", file=sys.stderr)
        return 1
    _emit(
        args,
        {
            "op": op,
            "wallet": wallet.model_dump(mode="json"),
            "control_id": control_id,
            "postgres": mirrored.detail,
            "postgres_written": mirrored.done,
        },
        [f"{done}; control entry {control_id}; postgres: {mirrored.detail}"],
    )
    return 0


async def _wallets_list(args: argparse.Namespace, client: aioredis.Redis, s: CliSettings) -> int:
    tracked, last_id = await snapshot(client, s.streams)
    try:
        in_db = await wallets.db_addresses(s.database_url, args.db)
    except wallets.MirrorError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    addresses = {w.address for w in tracked}
    lines = [f"{w.address}  {_score(w):<5}  {w.label}" for w in tracked]
    if not tracked:
        lines.append("(registry empty: services seed it from WALLETS_FILE when they start)")
    lines.append(f"{len(tracked)} tracked; last change {last_id}")
    if in_db is not None:
        only_db, only_redis = sorted(in_db - addresses), sorted(addresses - in_db)
        lines.append(
            "postgres agrees"
            if not (only_db or only_redis)
            else f"postgres differs: only in postgres {only_db}, only in the registry {only_redis}"
        )
    _emit(
        args,
        {
            "wallets": [w.model_dump(mode="json") for w in tracked],
            "last_change": last_id,
            "postgres": sorted(in_db) if in_db is not None else None,
        },
        lines,
    )
    return 0


async def _wallets_discover(
    args: argparse.Namespace, client: aioredis.Redis, s: CliSettings
) -> int:
    source = QualitySource(s.data_api_url, s.gamma_api_url)
    try:
        found = await wallets_discover.candidates(args, client, s, source)
        picked = wallets_discover.chosen(args.add, found)
        added = await wallets_discover.track(args, client, s, picked, _seed(s) if picked else [])
    except wallets_discover.DiscoverError as exc:
        raise UsageError(str(exc)) from None
    except wallets.MirrorError as exc:
        print(f"betterbot: {exc}", file=sys.stderr)
        return 1
    finally:
        await source.aclose()
    data = {"candidates": wallets_discover.as_json(found), "added": added}
    _emit(args, data, wallets_discover.render(found, added))
    return 0


def _score(wallet: TrackedWallet) -> str:
    return "-" if wallet.score is None else f"{wallet.score:.2f}"


async def cmd_lag(args: argparse.Namespace, client: aioredis.Redis, s: CliSettings) -> int:
    names = [_stream(s.streams, n) for n in args.stream] or public_streams(s.streams)
    report = await lag.collect(client, names, args.consumers)
    _emit(args, report, lag.render(report))
    return 0


async def cmd_dead(args: argparse.Namespace, client: aioredis.Redis, s: CliSettings) -> int:
    stream = _stream(s.streams, args.stream)
    if args.action == "list":
        entries = await dead.list_entries(client, stream, args.count, args.after)
        total = await client.xlen(stream)
        _emit(
            args,
            {"stream": stream, "length": total, "entries": [e.as_json() for e in entries]},
            [e.line() for e in entries] + [f"{len(entries)} shown of {total} in {stream}"],
        )
        return 0
    target = _stream(s.streams, args.to) if args.to else dead.origin_stream(s.streams, stream)
    if target is None:
        raise UsageError(f"{stream} has no known origin stream: name one with --to")
    await layout.claim(client, s.streams)
    entries, missing = await dead.select(client, stream, args.ids, args.all)
    replayer = dead.Replayer(
        client,
        s.streams,
        stream_maxlen=s.stream_maxlen,
        dedupe_ttl_s=s.dedupe_ttl_s,
        force=args.force,
    )
    outcomes = [await replayer.replay(stream, entry, target) for entry in entries]
    lines = [f"{o.entry_id}: {o.detail}" for o in outcomes] + [f"{i}: not found" for i in missing]
    replayed = sum(o.replayed for o in outcomes)
    kept = len(outcomes) - replayed + len(missing)
    lines.append(f"{replayed} replayed to {target}, {kept} not")
    _emit(
        args,
        {
            "target": target,
            "missing": missing,
            "outcomes": [
                {"id": o.entry_id, "replayed": o.replayed, "detail": o.detail} for o in outcomes
            ],
        },
        lines,
    )
    return 1 if kept else 0


async def cmd_replay_tape(args: argparse.Namespace, client: aioredis.Redis, s: CliSettings) -> int:
    await layout.claim(client, s.streams)
    try:
        items = tape.read_tape(args.file)
    except tape.TapeFileError as exc:
        raise UsageError(str(exc)) from None
    tracked: set[str] | None = None
    if not args.all_wallets:
        current, _ = await load(client, s.streams, _seed(s))
        tracked = {w.address for w in current}
    report = tape.TapeReport()
    fills = tape.to_fills(items, tracked, report)
    await tape.replay(
        client,
        s.streams,
        fills,
        report,
        stream_maxlen=s.stream_maxlen,
        dedupe_ttl_s=s.dedupe_ttl_s,
        batch=args.batch,
    )
    for problem in report.invalid:
        print(problem, file=sys.stderr)
    _emit(
        args,
        {
            "read": report.read,
            "invalid": len(report.invalid),
            "untracked": report.skipped_untracked,
            "added": report.added,
            "duplicates": report.duplicates,
            "streams": s.streams.order_streams(),
        },
        [
            f"{report.read} trades read: {report.added} added to "
            f"{', '.join(s.streams.order_streams())}, "
            f"{report.duplicates} already there, {report.skipped_untracked} of untracked wallets, "
            f"{len(report.invalid)} invalid"
        ],
    )
    return 1 if report.invalid else 0


async def cmd_partitions(args: argparse.Namespace, client: aioredis.Redis, s: CliSettings) -> int:
    streams = s.streams
    problems = await partitions.undrained(client, streams)
    if args.action == "status":
        data, lines = await partitions.status(client, streams, problems)
        _emit(args, data, lines)
        return 1 if problems else 0
    if not 1 <= args.to <= MAX_PARTITIONS or args.to == streams.partitions:
        raise UsageError(
            f"--to must be 1..{MAX_PARTITIONS} and not the current {streams.partitions}"
        )
    await layout.claim(client, streams)
    if problems:
        raise UsageError(
            "the pipeline is not drained (stop the ingestors, let every group catch up): "
            + "; ".join(problems[:5])
        )
    new = Streams(streams.namespace, args.to)
    done_ttl_s = args.done_ttl_s or s.detector_done_ttl_s
    report = await partitions.move(
        client, streams, new, recent_s=args.recent_s, done_ttl_s=done_ttl_s
    )
    await layout.record(client, new)
    _emit(
        args,
        {"from": streams.partitions, "to": args.to, **vars(report)},
        [
            f"moved {streams.partitions} -> {args.to} partitions: {report.units} detector units, "
            f"{report.decisions} recent decisions ({report.decisions_too_old} older left), "
            f"{report.dedupe_keys} dedupe keys, {report.watermarks} watermarks",
            f"now start every service with STREAM_PARTITIONS={args.to}",
        ],
    )
    return 0


async def cmd_validate(args: argparse.Namespace, client: aioredis.Redis, s: CliSettings) -> int:
    try:
        since = validate.parse_when(args.since) if args.since else None
        until = validate.parse_when(args.until) if args.until else None
    except ValueError as exc:
        raise UsageError(f"--since/--until: {exc}") from None
    try:
        tallies = await validate.collect(s.database_url, args.by, since, until)
    except validate.ValidateError as exc:
        print(f"betterbot: {exc}", file=sys.stderr)
        return 2
    data, lines = validate.report(tallies, args.by, since, until)
    _emit(args, data, lines)
    return 0


COMMANDS = {
    "signals": cmd_signals,
    "wallets": cmd_wallets,
    "lag": cmd_lag,
    "dead": cmd_dead,
    "replay-tape": cmd_replay_tape,
    "partitions": cmd_partitions,
    "validate": cmd_validate,
}


def settings_for(args: argparse.Namespace) -> CliSettings:
    overrides: dict[str, Any] = {}
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    if args.namespace is not None:
        overrides["stream_namespace"] = args.namespace
    return CliSettings(**overrides)


async def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_for(args)
    client = settings.redis()
    try:
        return await COMMANDS[args.command](args, client, settings)
    except (UsageError, layout.LayoutMismatch) as exc:
        print(f"betterbot: {exc}", file=sys.stderr)
        return 2
    except (RedisError, OSError) as exc:
        print(
            f"betterbot: Redis at {redact_url(settings.redis_url)} failed: {type(exc).__name__}",
            file=sys.stderr,
        )
        return 2
    finally:
        await client.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    code = 130  # interrupted (Ctrl-C ends `signals tail`)
    with contextlib.suppress(KeyboardInterrupt):
        code = asyncio.run(run(argv))
    sys.exit(code)
