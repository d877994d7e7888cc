"""The ``flashsale`` command: up, demo, serve, consume, token, replay, status, dlq."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from pydantic import ValidationError
from redis.exceptions import RedisError

from api.connections import postgres_pool_for, redis_client_for
from api.operate import add_commands, run_operation
from api.web.app import create_app
from api.web.auth import USER_ID, issue_token
from consumers.expiry import ExpiryWorker
from consumers.projector import Projector
from consumers.pruning import PruningWorker
from consumers.retention import RetentionWorker
from core.durability import check_durability
from core.errors import ConfigurationError, FlashsaleError
from core.gateway import RedisGateway
from core.launcher import LauncherError, embedded_servers
from core.logs import configure_logging
from core.settings import Settings
from projections.rebuild import rebuild
from projections.repair import repair_redis
from projections.replay import ProgressLine, verify

log = structlog.get_logger(__name__)

T = TypeVar("T")


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (Linux, macOS), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


@dataclass
class Services:
    """Connections shared by the parts running in one process."""

    settings: Settings
    redis: aioredis.Redis
    pool: asyncpg.Pool
    gateway: RedisGateway


@contextlib.asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[Services]:
    """Redis client and migrated PostgreSQL pool for ``settings``."""
    assert settings.database_url
    client = redis_client_for(settings)
    pool = await postgres_pool_for(settings)
    gateway = RedisGateway(client, settings.partitions, settings.idempotency_ttl_seconds)
    try:
        await gateway.load_scripts()
        yield Services(settings, client, pool, gateway)
    finally:
        await pool.close()
        await client.aclose()


@contextlib.contextmanager
def resolved(settings: Settings, embedded: bool) -> Iterator[Settings]:
    """Settings with both URLs set, starting embedded servers for missing ones if allowed."""
    if settings.redis_url and settings.database_url:
        yield settings
        return
    if not embedded:
        raise ConfigurationError(
            "set FLASHSALE_REDIS_URL and FLASHSALE_DATABASE_URL "
            "(or use `flashsale up`, which starts embedded servers)"
        )
    with embedded_servers(settings.redis_url, settings.database_url) as urls:
        print(f"redis: {urls.redis_url}\npostgres: {urls.database_url}", file=sys.stderr)
        yield settings.model_copy(
            update={"redis_url": urls.redis_url, "database_url": urls.database_url}
        )


def refuse_default_secrets(settings: Settings, names: list[str] | None = None) -> None:
    """Raise unless the admin token and JWT secret (or just ``names``) are set and not the
    public built-in values, which would let anyone create sales and mint buyer tokens."""
    unset = [n for n in settings.default_secrets() if names is None or n in names]
    if unset:
        raise ConfigurationError(
            f"refusing to run with the public default {' and '.join(unset)}: "
            "set FLASHSALE_ADMIN_TOKEN (8+ characters) and FLASHSALE_JWT_SECRET "
            "(16+ characters) to secret values"
        )


def with_run_secrets(settings: Settings) -> Settings:
    """``settings`` with random secrets for this run in place of the built-in defaults,
    and a note on stderr saying how to use them."""
    unset = settings.default_secrets()
    if not unset:
        return settings
    update: dict[str, str] = {}
    if "FLASHSALE_ADMIN_TOKEN" in unset:
        update["admin_token"] = secrets.token_urlsafe(24)
        print(
            f"admin token for this run: {update['admin_token']}  "
            "(set FLASHSALE_ADMIN_TOKEN to choose it)",
            file=sys.stderr,
        )
    if "FLASHSALE_JWT_SECRET" in unset:
        update["jwt_secret"] = secrets.token_urlsafe(32)
        print(
            f"buyer tokens for this run: FLASHSALE_JWT_SECRET={update['jwt_secret']} "
            "flashsale token USER_ID",
            file=sys.stderr,
        )
    return settings.model_copy(update=update)


def _token(settings: Settings, user_id: str, ttl: int) -> int:
    """Print a buyer JWT for ``user_id`` signed with the configured secret."""
    refuse_default_secrets(settings, ["FLASHSALE_JWT_SECRET"])
    if not USER_ID.fullmatch(user_id):
        raise ConfigurationError("USER_ID must be 1-128 characters of [A-Za-z0-9_.@+-]")
    if ttl < 1:
        raise ConfigurationError("--ttl must be at least 1 second")
    print(issue_token(settings.jwt_secret, user_id, ttl))
    return 0


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def projector_for(services: Services, **overrides: int) -> Projector:
    """A projector configured from the settings."""
    s = services.settings
    return Projector(
        services.redis,
        services.pool,
        s.partitions,
        consumer=s.consumer_name,
        batch=overrides.get("batch", s.consumer_batch),
        block_ms=overrides.get("block_ms", s.consumer_block_ms),
        claim_idle_ms=overrides.get("claim_idle_ms", s.claim_idle_ms),
        max_deliveries=overrides.get("max_deliveries", s.max_deliveries),
    )


@contextlib.asynccontextmanager
async def running_api(services: Services, port: int) -> AsyncIterator[int]:
    """Serve the HTTP API until the block exits; yields the bound port."""
    app = create_app(services.settings, services.redis)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, services.settings.host, port)
    await site.start()
    bound = runner.addresses[0][1]
    log.info("api_listening", host=services.settings.host, port=bound)
    try:
        yield bound
    finally:
        await runner.cleanup()


async def _serve(settings: Settings) -> None:
    async with open_services(settings) as services:
        await check_durability(services.redis, settings)
        async with running_api(services, settings.port):
            await stop_on_signals().wait()


def expiry_worker_for(services: Services) -> ExpiryWorker:
    """An expiry worker configured from the settings."""
    s = services.settings
    return ExpiryWorker(services.gateway, s.expiry_interval_ms / 1000, s.expiry_batch)


async def run_consumers(
    services: Services, stop: asyncio.Event, *, retention: bool = False, **overrides: int
) -> None:
    """The projector and the expiry worker (and, with ``retention``, the stream trimmer and
    the reservation pruner, unless ``FLASHSALE_RETENTION_INTERVAL_MS`` /
    ``FLASHSALE_PRUNE_INTERVAL_MS`` is 0), side by side, until ``stop`` is set."""
    s = services.settings
    workers = [
        projector_for(services, **overrides).run(stop),
        expiry_worker_for(services).run(stop),
    ]
    if retention and s.retention_interval_ms:
        trimmer = RetentionWorker(
            services.redis, services.pool, s.partitions, s.retention_interval_ms / 1000
        )
        workers.append(trimmer.run(stop))
    if retention and s.prune_interval_ms:
        pruner = PruningWorker(
            services.gateway,
            services.pool,
            s.prune_interval_ms / 1000,
            s.prune_after_seconds,
            s.prune_batch,
        )
        workers.append(pruner.run(stop))
    await asyncio.gather(*workers)


async def _consume(settings: Settings) -> None:
    async with open_services(settings) as services:
        await check_durability(services.redis, settings)
        await run_consumers(services, stop_on_signals(), retention=True)


async def _up(settings: Settings) -> None:
    async with open_services(settings) as services:
        await check_durability(services.redis, settings)
        async with running_api(services, settings.port) as port:
            print(
                f"flashsale is up: http://{settings.host}:{port}  (Ctrl-C to stop)", file=sys.stderr
            )
            await run_consumers(services, stop_on_signals(), retention=True)


async def _verify(settings: Settings, sale_id: str | None, as_json: bool) -> int:
    async with open_services(settings) as services:
        report = await verify(services.gateway, services.pool, sale_id)
    print(report.to_json() if as_json else report.to_table())
    return 0 if report.clean else 1


async def _rebuild(settings: Settings, as_json: bool) -> int:
    async with open_services(settings) as services:
        progress = ProgressLine(sys.stderr)
        try:
            report = await rebuild(services.gateway, services.pool, progress=progress)
        finally:
            progress.close()  # so that an error is printed on a line of its own
    print(report.to_json() if as_json else report.summary())
    return 0


async def _repair(settings: Settings, sale_id: str | None, dry_run: bool, as_json: bool) -> int:
    async with open_services(settings) as services:
        report = await repair_redis(services.gateway, services.pool, sale_id, dry_run=dry_run)
    print(report.to_json() if as_json else report.to_table())
    return 0 if report.clean else 1


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    """Run a replay subcommand: exit 0 clean, 1 drift, 2 could not run.

    Any failure, expected or not, exits 2 with one line on stderr: a crash must never
    look like drift (1) to a script.
    """
    try:
        with resolved(settings, embedded=False) as s:
            if args.replay_command == "rebuild":
                return run_async(_rebuild(s, args.json))
            if args.replay_command == "repair":
                return run_async(_repair(s, args.sale, args.dry_run, args.json))
            return run_async(_verify(s, args.sale, args.json))
    except Exception as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        message = f"error: {type(e).__name__}: {detail}"
        red = sys.stderr.isatty()
        print(f"\x1b[1;31m{message}\x1b[0m" if red else message, file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="flashsale", description=(__doc__ or "").replace("``", "")
    )
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("up", "API + consumers in one process (embedded servers if no URLs are set)"),
        ("serve", "the HTTP API only"),
        ("consume", "the consumer daemons only: projector and expiry worker"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--port", type=int, default=None, help="HTTP port (FLASHSALE_PORT)")
    token = sub.add_parser(
        "token", help="print a buyer JWT signed with FLASHSALE_JWT_SECRET (tests, demos)"
    )
    token.add_argument("user_id", metavar="USER_ID", help="the buyer (the token's sub)")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    demo = sub.add_parser("demo", help="run a simulated flash sale on embedded servers")
    demo.add_argument("--stock", type=int, default=200)
    demo.add_argument("--buyers", type=int, default=5000)
    demo.add_argument("--hold-seconds", type=int, default=10, help="payment window")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    replay = sub.add_parser("replay", help="fold the log and compare with Redis and PostgreSQL")
    replay_sub = replay.add_subparsers(dest="replay_command", required=True)
    v = replay_sub.add_parser("verify", help="exit 0 when clean, 1 on drift, 2 if it cannot run")
    v.add_argument("--sale", default=None, help="only this sale")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    rb = replay_sub.add_parser(
        "rebuild", help="rebuild the PostgreSQL projections from the log and swap them in"
    )
    rb.add_argument("--json", action="store_true", help="machine-readable output")
    rp = replay_sub.add_parser(
        "repair", help="rewrite drifted sales in Redis from the log (exit 0 once it agrees)"
    )
    rp.add_argument("--redis", action="store_true", required=True, help="repair Redis")
    rp.add_argument("--sale", default=None, help="only this sale")
    rp.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flashsale`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as e:
        print(f"error: bad FLASHSALE_* configuration:\n{e}", file=sys.stderr)
        return 2
    if getattr(args, "port", None) is not None:
        settings = settings.model_copy(update={"port": args.port})
    level = args.log_level or (
        "warning" if args.command in ("demo", "replay", "status", "dlq") else settings.log_level
    )
    configure_logging(level, settings.log_json)
    try:
        if args.command == "token":
            return _token(settings, args.user_id, args.ttl)
        if args.command in ("serve", "consume"):
            refuse_default_secrets(settings)
        if args.command in ("up", "demo"):
            settings = with_run_secrets(settings)
        if args.command == "demo":
            from api.demo import run_demo

            with resolved(settings, embedded=True) as s:
                code: int = run_async(
                    run_demo(s, args.stock, args.buyers, args.hold_seconds, args.json)
                )
                return code
        if args.command in ("status", "dlq"):
            return run_async(run_operation(settings, args))
        if args.command == "replay":
            return _replay(settings, args)
        with resolved(settings, embedded=args.command == "up") as s:
            runner = {"up": _up, "serve": _serve, "consume": _consume}[args.command]
            run_async(runner(s))
        return 0
    except (FlashsaleError, LauncherError, RedisError, OSError, asyncpg.PostgresError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
