"""The ``flashsale`` command: up, demo, serve, consume, token, replay, status, dlq."""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
from types import FrameType

import asyncpg
from pydantic import ValidationError
from redis.exceptions import RedisError

from api.cli import operate, replay
from api.cli.demo import run_demo
from api.cli.launcher import LauncherError
from api.cli.links import admin_token_hint
from api.cli.processes import (
    consume,
    refuse_redis_url_with_cluster,
    resolved,
    run_async,
    serve,
    up,
)
from api.web.auth import USER_ID, issue_token
from core.errors import ConfigurationError, FlashsaleError
from core.logs import configure_logging
from core.settings import Settings


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


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """Make SIGTERM stop the command as Ctrl-C does until its event loop takes the signal
    over: embedded servers started so far are then stopped and their data deleted (by
    default SIGTERM ends the process at once, and a Redis Cluster takes seconds to form)."""
    signal.signal(signal.SIGTERM, _interrupt)


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_redis_cluster_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="start an embedded Redis Cluster (3 primaries, a replica each) instead of the"
        " single embedded Redis (an error if FLASHSALE_REDIS_URL is set)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="flashsale", description=(__doc__ or "").replace("``", "")
    )
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("up", "API workers + consumers in one command (embedded servers if no URLs are set)"),
        ("serve", "the HTTP API only, in --workers processes on one port"),
        ("consume", "the consumer daemons only: projector and expiry worker"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--port", type=int, default=None, help="HTTP port (FLASHSALE_PORT)")
        p.add_argument(
            "--workers",
            type=_positive,
            default=None,
            help="projector processes sharing the partitions (FLASHSALE_CONSUMER_WORKERS;"
            " default: one per CPU)"
            if name == "consume"
            else "API processes sharing the port (FLASHSALE_WORKERS; default: one per CPU)",
        )
        if name == "up":
            _add_redis_cluster_flag(p)
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
    _add_redis_cluster_flag(demo)
    replay.add_commands(sub)
    operate.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flashsale`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as e:
        print(f"error: bad FLASHSALE_* configuration:\n{e}", file=sys.stderr)
        return 2
    # Flags override the environment; in the settings, they reach API worker processes too.
    workers = "consumer_workers" if args.command == "consume" else "workers"
    flags = {"port": getattr(args, "port", None), workers: getattr(args, "workers", None)}
    settings = settings.model_copy(
        update={k: v for k, v in flags.items() if v is not None}
        | ({"log_level": args.log_level} if args.log_level else {})
    )
    level = args.log_level or (
        "warning" if args.command in ("demo", "replay", "status", "dlq") else settings.log_level
    )
    configure_logging(level, settings.log_json)
    try:
        if args.command == "token":
            return _token(settings, args.user_id, args.ttl)
        if args.command in ("serve", "consume"):
            refuse_default_secrets(settings)
        admin_hint = ""
        if args.command in ("up", "demo"):
            # Before the secrets are printed: a refusal is one line.
            refuse_redis_url_with_cluster(settings, args.redis_cluster)
            interrupt_on_sigterm()
            admin_hint = admin_token_hint("FLASHSALE_ADMIN_TOKEN" in settings.default_secrets())
            settings = with_run_secrets(settings)
        if args.command == "demo":
            with resolved(settings, embedded=True, redis_cluster=args.redis_cluster) as s:
                code: int = run_async(
                    run_demo(s, args.stock, args.buyers, args.hold_seconds, args.json, admin_hint)
                )
                return code
        if args.command in ("status", "dlq"):
            return run_async(operate.run_operation(settings, args))
        if args.command == "replay":
            return replay.run_replay(settings, args)
        cluster = args.command == "up" and args.redis_cluster
        with resolved(settings, embedded=args.command == "up", redis_cluster=cluster) as s:
            if args.command == "up":
                run_async(up(s, admin_hint))
            else:
                run_async({"serve": serve, "consume": consume}[args.command](s))
        return 0
    except (FlashsaleError, LauncherError, RedisError, OSError, asyncpg.PostgresError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
