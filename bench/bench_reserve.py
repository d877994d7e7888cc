"""Benchmark: reservations per second through the reserve Lua script and over HTTP.

Run:  .venv/bin/python -m bench.bench_reserve [--clients 200] [--seconds 5]

Uses FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL when set, else embedded servers. Prints
figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
import uuid

import redis.asyncio as aioredis
from aiohttp import web

from api.cli.demo import fire_from_another_process
from api.cli.launcher import embedded_servers
from api.web.app import create_app
from api.web.auth import issue_token
from core.errors import RejectedError
from core.gateway import RedisGateway
from core.models import NewSale
from core.settings import Settings


async def script_rate(gateway: RedisGateway, clients: int, seconds: float) -> tuple[int, float]:
    """Placements per second by ``clients`` concurrent callers on one sale (one hot key)."""
    sale_id = f"bench-{uuid.uuid4().hex[:8]}"
    await gateway.create_sale(NewSale(sale_id=sale_id, stock=10**9, per_user_limit=10**9))
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await gateway.reserve(sale_id, f"user-{n}", 1, None)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return done, time.perf_counter() - started


async def rejection_rate(gateway: RedisGateway, clients: int, seconds: float) -> tuple[int, float]:
    """Refusals per second on a sold-out sale (the common case in a flash sale)."""
    sale_id = f"bench-{uuid.uuid4().hex[:8]}"
    await gateway.create_sale(NewSale(sale_id=sale_id, stock=0))
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            try:
                await gateway.reserve(sale_id, f"user-{n}", 1, None)
            except RejectedError:
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return done, time.perf_counter() - started


async def http_rate(settings: Settings, client: aioredis.Redis, attempts: int) -> None:
    """Reservation requests per second over HTTP, load generated from another process."""
    app = create_app(settings, client)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    gateway = RedisGateway.from_settings(client, settings)
    for label, stock in (("all placed", attempts), ("all sold out", 0)):
        sale_id = f"bench-{uuid.uuid4().hex[:8]}"
        await gateway.create_sale(NewSale(sale_id=sale_id, stock=stock))
        plan = [[issue_token(settings.jwt_secret, f"u{i}"), ""] for i in range(attempts)]
        url = f"http://127.0.0.1:{port}/v1/sales/{sale_id}/reservations"
        results, elapsed = await fire_from_another_process(url, plan)
        # Each result is (status, outcome code, seconds, reservation id): see api.cli.demo.Result.
        statuses = sorted({status for status, _, _, _ in results})
        latencies = sorted(seconds for _, _, seconds, _ in results)
        print(
            f"http ({label}): {attempts / elapsed:,.0f} req/s over {attempts} requests,"
            f" p50 {latencies[len(latencies) // 2] * 1000:.1f} ms,"
            f" p99 {latencies[len(latencies) * 99 // 100] * 1000:.1f} ms, statuses {statuses}"
        )
    await runner.cleanup()


async def main(clients: int, seconds: float, attempts: int) -> None:
    env = Settings()
    with embedded_servers(env.redis_url, env.database_url) as urls:
        # The app is built here, not by `serve`, so nothing refuses the public default
        # secrets: replace them anyway, as `up` and `demo` do.
        settings = env.model_copy(
            update={
                "redis_url": urls.redis_url,
                "database_url": urls.database_url,
                "max_inflight": 10**6,
                "admin_token": secrets.token_urlsafe(24),
                "jwt_secret": secrets.token_urlsafe(32),
            }
        )
        client = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                urls.redis_url, max_connections=clients
            )
        )
        # The script's own rates: no sold-out hint answers from memory here.
        gateway = RedisGateway(client, settings.partitions, settings.idempotency_ttl_seconds)
        done, elapsed = await script_rate(gateway, clients, seconds)
        print(f"reserve.lua placements: {done / elapsed:,.0f}/s ({clients} clients, one sale)")
        done, elapsed = await rejection_rate(gateway, clients, seconds)
        print(f"reserve.lua sold-out refusals: {done / elapsed:,.0f}/s ({clients} clients)")
        await http_rate(settings, client, attempts)
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--http-requests", type=int, default=10_000, help="HTTP attempts per case (at least 1)"
    )
    args = parser.parse_args()
    if args.http_requests < 1:
        parser.error("--http-requests must be at least 1")
    import uvloop

    uvloop.run(main(args.clients, args.seconds, args.http_requests))
