"""Benchmark: how fast projection recovers from a poison entry and from a killed consumer.

Run:  FLASHSALE_REDIS_URL=... FLASHSALE_DATABASE_URL=... \\
      .venv/bin/python -m bench.bench_recovery bad-bytes|kill [--survivor] [--live] [--env K=V]

Both scenarios EMPTY the Redis database and the PostgreSQL ``public`` schema they are given,
then run real ``flashsale consume`` processes (default settings but one projector process
each, ``FLASHSALE_CONSUMER_WORKERS=1``, 4 partitions, plus any ``--env``) while this process
places reservations straight through the gateway:

- ``bad-bytes``: 150 reservations, one entry ``{"event": b"\\xff\\xfe..."}`` written into a
  partition stream, 150 more, then the consumer starts (with ``--live`` it runs from the
  start); prints how many reached PostgreSQL, how long that took, and how many entries
  were dead-lettered.
- ``kill``: reservations at about 500/s for 8 s; 3 s in, the consumer is killed (kill -9)
  while it holds a batch it has not committed (a lock on ``orders`` stalls it there); it
  is started again at once, or with ``--survivor`` a second consumer that ran all along
  has to take over. Prints the time from the kill until PostgreSQL holds every reservation
  accepted before it, and from the end of the load until it holds every one.

Prints figures only; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP, PartitionKeys, dead_letter_stream, partition_of
from core.models import NewSale
from core.settings import Settings

FLASHSALE = Path(sys.executable).parent / "flashsale"
PARTITIONS = 4


def sale_in(partition: int) -> str:
    k = 0
    while partition_of(f"bench-{k}", PARTITIONS) != partition:
        k += 1
    return f"bench-{k}"


class Consumers:
    """``flashsale consume`` processes started with one environment, logs in a temp dir."""

    def __init__(self, redis_url: str, database_url: str, extra: dict[str, str]) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
        self.env.update(
            FLASHSALE_REDIS_URL=redis_url,
            FLASHSALE_DATABASE_URL=database_url,
            FLASHSALE_PARTITIONS=str(PARTITIONS),
            FLASHSALE_LOG_JSON="true",
            # One process per consumer: the one killed is the one named.
            FLASHSALE_CONSUMER_WORKERS="1",
            # ``consume`` refuses the public default secrets; these consumers check no token.
            FLASHSALE_ADMIN_TOKEN=secrets.token_urlsafe(24),
            FLASHSALE_JWT_SECRET=secrets.token_urlsafe(32),
            **extra,
        )
        self.dir = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def name(self, proc: subprocess.Popen[bytes]) -> str:
        """The consumer name of a process started here."""
        return self.env.get("FLASHSALE_CONSUMER_NAME") or f"{socket.gethostname()}-{proc.pid}"

    def _spawn(self, log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                [str(FLASHSALE), "consume"], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        return proc

    async def start(self) -> subprocess.Popen[bytes]:
        """Start one more consumer and wait until its projector runs."""
        log_path = self.dir / f"consume-{len(self.procs)}.log"
        proc = self._spawn(log_path)
        deadline = time.monotonic() + 30
        while "projector_started" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "consumer did not start"
            await asyncio.sleep(0.05)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def pending_of(client: aioredis.Redis, consumer: str) -> int:
    """Entries pending on ``consumer`` in the projector group, every partition."""
    total = 0
    for p in range(PARTITIONS):
        try:
            consumers = await client.xinfo_consumers(
                PartitionKeys(p, PARTITIONS).events, CONSUMER_GROUP
            )
        except ResponseError:
            continue
        total += sum(
            int(c["pending"]) for c in consumers if c["name"] in (consumer, consumer.encode())
        )
    return total


async def until_pending(client: aioredis.Redis, consumer: str) -> None:
    """Poll until ``consumer`` holds entries it has not acknowledged."""
    while True:
        if await pending_of(client, consumer):
            return
        await asyncio.sleep(0.01)


async def orders(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        try:
            return int(await conn.fetchval("SELECT count(*) FROM orders"))
        except asyncpg.UndefinedTableError:
            return 0


async def until_orders(pool: asyncpg.Pool, count: int, within: float) -> None:
    """Poll until PostgreSQL holds ``count`` orders, or ``within`` seconds passed."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await orders(pool) >= count:
            return
        await asyncio.sleep(0.1)


async def bad_bytes(
    gateway: RedisGateway, pool: asyncpg.Pool, consumers: Consumers, live: bool
) -> None:
    sales = [sale_in(p) for p in range(PARTITIONS)]
    for sale in sales:
        await gateway.create_sale(NewSale(sale_id=sale, stock=10_000, hold_seconds=600))
    if live:
        await consumers.start()
    for i in range(150):
        await gateway.reserve(sales[i % PARTITIONS], f"u{i}", 1, None)
    await gateway.client.xadd(PartitionKeys(0, PARTITIONS).events, {"event": b"\xff\xfe not utf-8"})
    for i in range(150, 300):
        await gateway.reserve(sales[i % PARTITIONS], f"u{i}", 1, None)
    if not live:
        await consumers.start()
    written = time.monotonic()
    await until_orders(pool, 300, 60)
    took = time.monotonic() - written
    done = await orders(pool)
    parked = int(await gateway.client.xlen(dead_letter_stream()))
    print(f"bad-bytes: {done} of 300 accepted reservations in PostgreSQL after {took:.1f} s")
    print(f"bad-bytes: {parked} entries dead-lettered")


async def order_ids(pool: asyncpg.Pool) -> set[str]:
    async with pool.acquire() as conn:
        return {r[0] for r in await conn.fetch("SELECT reservation_id FROM orders")}


async def until_projected(pool: asyncpg.Pool, rids: set[str], within: float) -> None:
    """Poll until PostgreSQL holds every one of ``rids`` (or ``within`` seconds passed)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if rids <= await order_ids(pool):
            return
        await asyncio.sleep(0.05)


async def kill(
    gateway: RedisGateway, pool: asyncpg.Pool, consumers: Consumers, survivor: bool
) -> None:
    sales = [sale_in(p) for p in range(PARTITIONS)]
    for sale in sales:
        await gateway.create_sale(NewSale(sale_id=sale, stock=100_000, hold_seconds=600))
    victim = await consumers.start()
    if survivor:
        await consumers.start()
    accepted: list[str] = []
    started = time.monotonic()
    load_end = started + 8

    async def load() -> None:
        nonlocal load_end
        n = 0
        while time.monotonic() - started < 8:
            placed = await asyncio.gather(
                *(
                    gateway.reserve(sales[(n + j) % PARTITIONS], f"u{n + j}", 1, None)
                    for j in range(25)
                )
            )
            accepted.extend(p.reservation_id for p in placed)
            n += 25
            await asyncio.sleep(0.02)
        load_end = time.monotonic()

    loading = asyncio.create_task(load())
    await asyncio.sleep(3)
    # Make sure the victim dies holding a batch it has not committed: a lock on ``orders``
    # stalls its transaction; kill it there, then let go of the lock.
    async with pool.acquire() as blocker:
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        await until_pending(gateway.client, consumers.name(victim))
        await asyncio.sleep(0.3)
        victim.kill()
        killed_at = time.monotonic()
        before_kill = set(accepted)
        held = await pending_of(gateway.client, consumers.name(victim))
        await lock.rollback()
    victim.wait()
    if not survivor:
        await consumers.start()
    await until_projected(pool, before_kill, 90)
    orphans = time.monotonic() - killed_at
    await loading
    await until_projected(pool, set(accepted), 90)
    rest = time.monotonic() - load_end
    done = len(set(accepted) & await order_ids(pool))
    print(f"kill: {len(accepted)} accepted, {done} in PostgreSQL; the victim held {held}")
    print(
        f"kill: every reservation accepted before the kill in PostgreSQL {orphans:.1f} s after it"
    )
    print(f"kill: every accepted reservation in PostgreSQL {rest:.1f} s after the load ended")
    print(f"kill: (the load ended {load_end - killed_at:.1f} s after the kill)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["bad-bytes", "kill"])
    parser.add_argument("--survivor", action="store_true", help="kill: no restart")
    parser.add_argument("--live", action="store_true", help="bad-bytes: consumer runs meanwhile")
    parser.add_argument("--env", action="append", default=[], help="K=V for the consumers")
    args = parser.parse_args()
    settings = Settings()
    assert settings.redis_url and settings.database_url, "set both URLs"
    client = aioredis.Redis.from_url(settings.redis_url)
    await client.flushdb()
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;")
    await conn.close()
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    extra = dict(kv.split("=", 1) for kv in args.env)
    consumers = Consumers(settings.redis_url, settings.database_url, extra)
    gateway = RedisGateway(client, PARTITIONS, settings.idempotency_ttl_seconds)
    try:
        if args.scenario == "bad-bytes":
            await bad_bytes(gateway, pool, consumers, args.live)
        else:
            await kill(gateway, pool, consumers, args.survivor)
    finally:
        consumers.stop()
        await pool.close()
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
