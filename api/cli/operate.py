"""Operator commands of the ``flashsale`` CLI: ``status`` and ``dlq list|retry|drop``.

``status`` and ``dlq list|drop`` need only Redis; ``dlq retry`` also writes to PostgreSQL.
Each prints a table (or JSON with ``--json``) and returns the exit code.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

import asyncpg

from api.connections import postgres_pool_for, redis_client_for
from consumers.deadletter import ParkedEntry, drop_parked, list_parked, retry_parked
from consumers.health import read_health
from consumers.replicas import replica_check
from core.errors import ConfigurationError
from core.gateway.clients import RedisClient
from core.settings import Settings

_ERROR_CHARS = 70
_REDRIVEN = ("projected", "already_projected")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status`` and ``dlq`` to the ``flashsale`` subcommands."""
    status = sub.add_parser("status", help="consumer lag, pending entries and dead letters")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    dlq = sub.add_parser("dlq", help="the dead-letter stream: list, retry or drop entries")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = dlq_sub.add_parser("list", help="show parked entries with their error")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    retry = dlq_sub.add_parser(
        "retry", help="project parked entries again; exit 0 when every one went through"
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every parked entry")
    which.add_argument("ids", nargs="*", default=[], metavar="ID", help="dead-letter ids")
    retry.add_argument("--json", action="store_true", help="machine-readable output")
    drop = dlq_sub.add_parser("drop", help="delete parked entries for good (unparseable junk)")
    drop.add_argument("ids", nargs="+", metavar="ID", help="dead-letter ids")


@asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[RedisClient]:
    if not settings.redis_url:
        raise ConfigurationError("set FLASHSALE_REDIS_URL")
    client = redis_client_for(settings)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def _postgres(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    if not settings.database_url:
        raise ConfigurationError("set FLASHSALE_DATABASE_URL")
    pool = await postgres_pool_for(settings, 2)
    try:
        yield pool
    finally:
        await pool.close()


def parked_table(parked: list[ParkedEntry]) -> str:
    """One line per parked entry, for people."""
    if not parked:
        return "no parked entries"
    rows = [("id", "stream", "stream id", "deliveries", "parked at", "error")]
    for p in parked:
        error = p.error if len(p.error) <= _ERROR_CHARS else p.error[: _ERROR_CHARS - 3] + "..."
        rows.append(
            (
                p.id,
                p.stream,
                p.stream_id,
                str(p.deliveries),
                p.parked_at.strftime("%Y-%m-%d %H:%M:%S"),
                error,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([*lines, f"{len(parked)} parked"])


async def run_operation(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``status`` or a ``dlq`` subcommand; return the exit code."""
    async with _redis(settings) as client:
        if args.command == "status":
            health = await read_health(client, settings.partitions)
            print(health.to_json() if args.json else health.to_table())
            return 0
        if args.dlq_command == "list":
            parked = await list_parked(client)
            if args.json:
                print(json.dumps([p.to_dict() for p in parked], indent=2))
            else:
                print(parked_table(parked))
            return 0
        if args.dlq_command == "drop":
            dropped = await drop_parked(client, args.ids)
            print(f"dropped {dropped} of {len(args.ids)}")
            return 0 if dropped == len(set(args.ids)) else 1
        replicas = replica_check(
            client, settings.partitions, settings.wait_replicas, settings.wait_timeout_ms
        )
        async with _postgres(settings) as pool:
            outcomes = await retry_parked(client, pool, settings.partitions, args.ids, replicas)
    if args.json:
        print(json.dumps([asdict(o) for o in outcomes], indent=2))
    else:
        for o in outcomes:
            print(f"{o.parked_id}  {o.stream_id or '-'}  {o.result}  {o.detail}".rstrip())
    redriven = sum(o.result in _REDRIVEN for o in outcomes)
    if not args.json:
        print(f"{redriven} of {len(outcomes)} re-driven")
    return 0 if redriven == len(outcomes) else 1
