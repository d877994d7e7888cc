"""``flashsale consume --workers N``: N projector processes sharing the partitions through
leases, stopping together, and nothing lost or doubled when one of them dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from api.cli.workers import available_cpus, consumer_worker_count
from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP, PartitionKeys
from core.settings import Settings
from tests.daemons import (
    caught_up,
    children_of,
    cli,
    env_of,
    eventually,
    group_pending,
    kill_all,
    logged,
    order_ids,
    running,
    sale_in_partition,
    start,
    stop_all,
    table_count,
    terminate,
    wait_exit,
    wait_gone,
)
from tests.helpers import open_sale, place, text


@pytest.fixture
def env(settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool) -> dict[str, str]:
    """A ``flashsale consume`` environment on the test servers (reset), two processes."""
    return env_of(settings, FLASHSALE_CONSUMER_WORKERS="2", FLASHSALE_CONSUMER_NAME="cw")


@asynccontextmanager
async def consuming(
    env: dict[str, str], log_path: Path, *args: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """``flashsale consume`` once its workers run: the parent and the workers' pids; all
    killed when the block exits."""
    proc = start(["consume", *args], env, log_path)
    pids: list[int] = []
    try:

        def record() -> dict[str, Any] | None:
            return next(iter(logged(log_path, "consumer_workers_started")), None)

        async def started() -> bool:
            return record() is not None and len(logged(log_path, "projector_started")) == 2

        await eventually(started, 60, "consumer workers did not start", running((proc, log_path)))
        found = record()
        assert found is not None
        pids = list(found["pids"])
        yield proc, pids
    finally:
        stop_all(proc)
        kill_all(pids)


async def lease_holders(client: aioredis.Redis, partitions: int) -> list[str]:
    """Who holds each partition's lease ("" for none)."""
    holders = [
        await client.get(PartitionKeys(p, partitions).lease(CONSUMER_GROUP))
        for p in range(partitions)
    ]
    return [text(h) if h is not None else "" for h in holders]


async def place_in_every_partition(
    gateway: RedisGateway, partitions: int, users: range
) -> list[str]:
    """One reservation per user in each partition's sale (opened on first use); their ids."""
    placed: list[str] = []
    for p in range(partitions):
        sale = sale_in_partition(p, partitions, "cw")
        if users.start == 0:
            await open_sale(gateway, sale, stock=10_000)
        placed += await place(gateway, sale, [f"u{u}" for u in users])
    return placed


async def kill_holding(pid: int, pending: Callable[[], Awaitable[int]]) -> None:
    """Freeze ``pid`` again and again until it holds entries it has not acknowledged, then
    kill it there outright."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        os.kill(pid, signal.SIGSTOP)
        if await pending():
            os.kill(pid, signal.SIGKILL)
            return
        os.kill(pid, signal.SIGCONT)
    raise AssertionError(f"consumer worker {pid} never held an entry")


async def exactly_once(
    client: aioredis.Redis, pool: asyncpg.Pool, partitions: int, placed: list[str]
) -> None:
    """PostgreSQL holds every logged event once and an order per placement, nothing else."""
    await eventually(lambda: caught_up(client, pool, partitions), 30, "consumers lag behind")
    assert await order_ids(pool) == set(placed)
    assert await table_count(pool, "events") == len(placed) + partitions  # + SaleCreated


async def test_workers_share_the_partitions_and_stop_together_on_sigterm(
    env: dict[str, str],
    settings: Settings,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    tmp_path: Path,
):
    partitions = settings.partitions
    log_path = tmp_path / "consume.log"
    async with consuming(env, log_path) as (proc, pids):
        assert len(pids) == 2 and sorted(children_of(proc.pid)) == sorted(pids)

        async def shared() -> bool:
            holders = await lease_holders(redis_client, partitions)
            return sorted(holders) == sorted(["cw-0", "cw-1"] * (partitions // 2))

        await eventually(shared, 20, "the workers did not share the partitions")
        placed = await place_in_every_partition(gateway, partitions, range(30))
        await exactly_once(redis_client, pool, partitions, placed)
        # One process runs the expiry worker (and the trimmer, the pruner) for all.
        assert len(logged(log_path, "expiry_worker_started")) == 1
        assert await terminate(proc, within=20) == 0
        await wait_gone(pids, 5, "a consumer worker outlived its parent's stop")
    assert await lease_holders(redis_client, partitions) == [""] * partitions  # given back


async def test_a_worker_that_dies_stops_the_others_and_a_restart_loses_nothing(
    env: dict[str, str],
    settings: Settings,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    tmp_path: Path,
):
    partitions = settings.partitions
    async with consuming(env, tmp_path / "first.log") as (proc, pids):
        placing = asyncio.create_task(place_in_every_partition(gateway, partitions, range(150)))
        dead, other = pids  # cw-0, cw-1
        await kill_holding(dead, lambda: group_pending(redis_client, partitions, "cw-0"))
        placed = await placing
        assert await wait_exit(proc, within=20) == 2
        await wait_gone([other], 5, "the other worker was not stopped")
        text_ = (tmp_path / "first.log").read_text()
        assert f"WorkerFailed: consumer worker {dead} killed by SIGKILL on its own" in text_
        assert "stopped the other 1" in text_
    placed += await place_in_every_partition(gateway, partitions, range(150, 160))  # while down
    async with consuming(env, tmp_path / "second.log") as (proc, _):
        await exactly_once(redis_client, pool, partitions, placed)
        assert await terminate(proc, within=20) == 0


async def test_a_parent_killed_outright_takes_its_consumer_workers_with_it(
    env: dict[str, str], tmp_path: Path
):
    async with consuming(env, tmp_path / "consume.log") as (proc, pids):
        proc.kill()
        proc.wait()
        await wait_gone(pids, 10, "a consumer worker outlived its parent killed by SIGKILL")


async def test_consumer_workers_default_to_the_cpus_and_must_be_positive(env: dict[str, str]):
    assert consumer_worker_count(Settings(consumer_workers=None)) == available_cpus()
    assert consumer_worker_count(Settings(consumer_workers=3)) == 3
    rc, out = await cli(env, "consume", "--workers", "0", within=30)
    assert rc == 2 and "must be at least 1" in out, out
