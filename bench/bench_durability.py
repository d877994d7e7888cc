"""Benchmark: what durability costs a reservation, measured on private Redis servers.

Run:  .venv/bin/python -m bench.bench_durability [--seconds 5] [--clients 1,50]

For each setting (no persistence; AOF with ``appendfsync everysec``; AOF with
``appendfsync always``, what ``FLASHSALE_DURABILITY=strict`` demands; and AOF always plus
``FLASHSALE_WAIT_REPLICAS=1`` with one replica) it starts a fresh embedded Redis (the data
directory is under the system temp dir, so the disk there is what is measured) and runs the
reserve script from N concurrent callers on one sale for a few seconds. Prints placements
per second and the p50 / p99 latency of a placement; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import redis.asyncio as aioredis

from api.cli.launcher import EmbeddedRedis
from core.gateway import RedisGateway
from core.models import NewSale

AOF_ALWAYS = ["--appendonly", "yes", "--appendfsync", "always"]
SETTINGS: dict[str, tuple[list[str], bool]] = {
    "no persistence": ([], False),
    "AOF everysec": (["--appendonly", "yes", "--appendfsync", "everysec"], False),
    "AOF always (strict)": (AOF_ALWAYS, False),
    "AOF always + WAIT 1 replica": (AOF_ALWAYS, True),
}


@dataclass(frozen=True)
class Result:
    """Placements per second and latency percentiles of one run."""

    rate: float
    p50_ms: float
    p99_ms: float


@contextlib.contextmanager
def servers(args: list[str], with_replica: bool) -> Iterator[str]:
    """A primary (and a replica when asked) with ``args``; yields the primary's URL."""
    primary = EmbeddedRedis(extra_args=[*args, "--repl-diskless-sync-delay", "0"])
    url = primary.start()
    replica = None
    try:
        if with_replica:
            replica = EmbeddedRedis(extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
            replica.start()
        yield url
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()


async def wait_for_replica(client: aioredis.Redis) -> None:
    """Until a write on one connection is acknowledged by a replica."""
    for _ in range(200):
        async with client.client() as conn:
            await conn.set("bench-probe", "1")
            if int(await conn.wait(1, 100)) == 1:
                return
    raise RuntimeError("the replica never acknowledged a write")


async def placement_rate(url: str, wait_replicas: int, clients: int, seconds: float) -> Result:
    """Reservations per second by ``clients`` concurrent callers on one sale."""
    client = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(url, max_connections=clients + 2)
    )
    try:
        if wait_replicas:
            await wait_for_replica(client)
        gateway = RedisGateway(client, 16, 86400, wait_replicas=wait_replicas, wait_timeout_ms=5000)
        await gateway.load_scripts()
        sale_id = f"bench-{uuid.uuid4().hex[:8]}"
        await gateway.create_sale(NewSale(sale_id=sale_id, stock=10**9, per_user_limit=10**9))
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def caller(n: int) -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await gateway.reserve(sale_id, f"user-{n}", 1, None)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller(n) for n in range(clients)))
        elapsed = time.perf_counter() - started
    finally:
        await client.aclose()
    latencies.sort()
    return Result(
        rate=len(latencies) / elapsed,
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[len(latencies) * 99 // 100] * 1000,
    )


async def main(seconds: float, client_counts: list[int]) -> None:
    print(f"{'setting':<30} {'clients':>7} {'placements/s':>13} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (args, with_replica) in SETTINGS.items():
        for clients in client_counts:
            with servers(args, with_replica) as url:
                r = await placement_rate(url, 1 if with_replica else 0, clients, seconds)
            print(
                f"{name:<30} {clients:>7} {r.rate:>13,.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,50", help="comma-separated caller counts")
    options = parser.parse_args()
    import uvloop

    uvloop.run(main(options.seconds, [int(c) for c in options.clients.split(",")]))
