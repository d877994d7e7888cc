"""Benchmark: Redis memory per live reservation, and what reservations leave behind.

Run:  .venv/bin/python -m bench.bench_memory [--reservations 10000] [--cycles 10000]
      [--no-prune]

On embedded servers of its own (INFO memory must see only this run), it measures

1. live: ``--reservations`` buyers each hold one pending reservation; Redis memory per
   reservation, once projected and the streams trimmed (a pending one must stay in Redis);
2. loop: one buyer reserves and cancels ``--cycles`` times; memory per cycle once projected
   and the streams trimmed, then again after pruning the final reservations, and after a
   second loop of as many cycles, pruned too (skipped with ``--no-prune``, or where the
   pruning worker does not exist).

Each figure is given twice: ``used_memory`` from INFO memory (the whole server, allocator
included) and the sum of MEMORY USAGE over every key except the streams. Prints figures
only.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib

import redis.asyncio as aioredis

from api.cli.launcher import embedded_servers
from consumers.projector import Projector
from consumers.retention import trim_streams
from core.gateway import RedisGateway
from core.models import NewSale
from projections.db import open_pool

PARTITIONS = 16


async def key_bytes(client: aioredis.Redis) -> int:
    """MEMORY USAGE over every key but the streams (retention bounds those)."""
    total = 0
    async for key in client.scan_iter(count=1000):
        if (await client.type(key)) != b"stream":
            total += int(await client.memory_usage(key, samples=0) or 0)
    return total


async def used_memory(client: aioredis.Redis) -> int:
    """INFO memory's used_memory, bytes."""
    return int((await client.info("memory"))["used_memory"])


async def measure(client: aioredis.Redis) -> tuple[int, int]:
    return await used_memory(client), await key_bytes(client)


async def run(reservations: int, cycles: int, prune: bool) -> None:
    with embedded_servers(None, None) as urls:
        client = aioredis.Redis.from_url(urls.redis_url)
        pool = await open_pool(urls.database_url, 4)
        gateway = RedisGateway(client, PARTITIONS, 86_400)
        projector = Projector(client, pool, PARTITIONS, consumer="bench", batch=1000)
        await projector.ensure_groups()
        pruning = None
        if prune:
            try:
                pruning = importlib.import_module("consumers.pruning")
            except ModuleNotFoundError:  # the code before pruning existed
                prune = False

        async def settle() -> tuple[int, int]:
            while await projector.handle(await projector.read_new(block_ms=10)):
                pass
            await trim_streams(client, pool, PARTITIONS)
            return await measure(client)

        async def pruned() -> tuple[int, int]:
            assert pruning is not None
            await pruning.prune_reservations(gateway, pool, 0)
            return await measure(client)

        await gateway.create_sale(NewSale(sale_id="live", stock=reservations))
        await gateway.create_sale(NewSale(sale_id="loop", stock=1))
        rid = (await gateway.reserve("loop", "warm-up", 1, None)).reservation_id
        await gateway.cancel(rid, "warm-up")
        base = await settle()
        if prune:
            base = await pruned()

        for i in range(reservations):
            await gateway.reserve("live", f"buyer-{i}", 1, None)
        live = await settle()
        print(f"live: {reservations} pending reservations")
        print(f"  used_memory        {(live[0] - base[0]) / reservations:8.1f} B/reservation")
        print(f"  MEMORY USAGE keys  {(live[1] - base[1]) / reservations:8.1f} B/reservation")

        for _ in range(cycles):
            rid = (await gateway.reserve("loop", "looper", 1, None)).reservation_id
            await gateway.cancel(rid, "looper")
        looped = await settle()
        print(f"loop: one buyer, {cycles} x reserve + cancel, projected, streams trimmed")
        print(f"  used_memory        {(looped[0] - live[0]) / cycles:8.1f} B/cycle before pruning")
        print(f"  MEMORY USAGE keys  {(looped[1] - live[1]) / cycles:8.1f} B/cycle before pruning")
        if prune:
            after = await pruned()
            print(
                f"  used_memory        {(after[0] - live[0]) / cycles:8.1f} B/cycle after pruning"
            )
            print(
                f"  MEMORY USAGE keys  {(after[1] - live[1]) / cycles:8.1f} B/cycle after pruning"
            )
        if prune:
            # The keyspace's bucket array grew with the unpruned keys and shrinks only
            # when far emptier: a one-off step, not growth. A second loop shows that.
            for _ in range(cycles):
                rid = (await gateway.reserve("loop", "looper", 1, None)).reservation_id
                await gateway.cancel(rid, "looper")
            await settle()
            again = await pruned()
            print(f"loop again: {cycles} more cycles, pruned")
            print(f"  used_memory        {(again[0] - after[0]) / cycles:8.1f} B/cycle")
            print(f"  MEMORY USAGE keys  {(again[1] - after[1]) / cycles:8.1f} B/cycle")
        await pool.close()
        await client.aclose()


def main() -> None:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reservations", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--no-prune", action="store_true")
    args = parser.parse_args()
    asyncio.run(run(args.reservations, args.cycles, not args.no_prune))


if __name__ == "__main__":
    main()
