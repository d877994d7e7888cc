"""Pruning: Redis forgets reservations that reached a final state, once PostgreSQL has them.

A reservation's hash and its ids in the sale's and the buyer's sets would otherwise stay in
Redis forever. Redis needs a reservation only while it can still change: a pending one can
be confirmed, cancelled or expired, a final one (confirmed, cancelled, expired) never again.
Once the ``events`` archive holds its final event, the log and PostgreSQL's ``orders`` keep
it, and the API answers it from ``orders``.

Per partition, the worker reads the archive's final events (``ReservationConfirmed``,
``ReservationCancelled``, ``ReservationExpired``) after its own checkpoint
(``prune_checkpoints``) and below a bound: every consumer group of the stream acknowledged
everything below it (so the archive holds every event there, except parked ones), and it is
``keep_seconds`` old (stream ids are the times of the events). It removes those
reservations with ``core/lua/prune_reservations.lua`` in calls of at most ``batch`` ids
(only a hash that says final goes), then advances the checkpoint. The counters, the
holders (the per-buyer quantities that enforce the limit) and the stream are not touched,
and no event is appended: pruning changes no domain state. A reservation whose final
event was parked on the dead-letter stream is not archived below the bound and stays in
Redis.

Every step is safe to repeat: a round that dies before its checkpoint moves prunes the same
ids again, which changes nothing, and two daemons pruning at once only repeat each other.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg
import structlog

from consumers.faults import is_transient
from consumers.periodic import run_periodically
from consumers.retention import Position, acknowledged_below
from core.errors import InfrastructureError
from core.gateway import RedisGateway
from projections.tables import checkpoints, events

log = structlog.get_logger(__name__)

FINAL_EVENT_TYPES = ["ReservationConfirmed", "ReservationCancelled", "ReservationExpired"]

_PAGE = 1000


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What one pruning round did on one partition.

    ``pruned``: final reservations now absent from Redis; ``kept``: ids whose final event
    is archived but whose hash still says pending (drift that ``replay verify`` reports);
    ``done_below``: the checkpoint after the round ("m-s"; every final event below it is
    handled), None when the stream has no consumer group yet.
    """

    partition: int
    pruned: int
    kept: int
    done_below: str | None


async def checkpoint_of(pool: asyncpg.Pool, partition: int) -> Position:
    """The position below which the partition's final reservations were pruned."""
    async with pool.acquire() as conn:
        return await checkpoints.pruned_below(conn, partition)


async def prune_partition(
    gateway: RedisGateway,
    pool: asyncpg.Pool,
    partition: int,
    keep_seconds: float,
    batch: int = 100,
    page: int = _PAGE,
) -> PruneResult:
    """Prune the final reservations of one partition as far as the rules above allow."""
    bound = await acknowledged_below(gateway.client, gateway.keys_for_partition(partition).events)
    if bound is None:
        return PruneResult(partition, 0, 0, None)
    # Stream ids are Redis's clock; a skew between the two clocks shifts the grace by as much.
    bound = min(bound, (int((time.time() - keep_seconds) * 1000), 0))
    start = await checkpoint_of(pool, partition)
    pruned = kept = 0
    while start < bound:
        async with pool.acquire() as conn:
            rows = await events.reservation_events(
                conn, partition, FINAL_EVENT_TYPES, start, bound, page
            )
        by_sale: dict[str, dict[str, str]] = {}
        for row in rows:
            by_sale.setdefault(row["sale_id"], {})[row["reservation_id"]] = row["user_id"]
        for sale_id, owners in sorted(by_sale.items()):
            items = sorted(owners.items())
            for i in range(0, len(items), batch):
                gone, left = await gateway.prune_reservations(sale_id, items[i : i + batch])
                pruned += gone
                kept += left
        start = bound if len(rows) < page else (rows[-1]["stream_ms"], rows[-1]["stream_seq"] + 1)
        async with pool.acquire() as conn:
            await checkpoints.advance_pruned(conn, partition, start)
    if kept:
        log.warning("final_reservations_pending_in_redis", partition=partition, count=kept)
    return PruneResult(partition, pruned, kept, f"{start[0]}-{start[1]}")


async def prune_reservations(
    gateway: RedisGateway, pool: asyncpg.Pool, keep_seconds: float, batch: int = 100
) -> list[PruneResult]:
    """Prune every partition; see the module docstring for what goes."""
    return [
        await prune_partition(gateway, pool, p, keep_seconds, batch)
        for p in range(gateway.partitions)
    ]


class PruningWorker:
    """Runs :func:`prune_reservations` every ``interval`` seconds, the first time one
    interval in."""

    def __init__(
        self,
        gateway: RedisGateway,
        pool: asyncpg.Pool,
        interval: float,
        keep_seconds: float,
        batch: int = 100,
    ) -> None:
        self.gateway = gateway
        self.pool = pool
        self.interval = interval
        self.keep_seconds = keep_seconds
        self.batch = batch
        self.pruned = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Prune until ``stop`` is set; a failed round is logged and the next one tries again."""
        log.info("pruning_started", interval=self.interval, keep_seconds=self.keep_seconds)
        await run_periodically(
            "pruning",
            self.prune_once,
            stop,
            self.interval,
            retry=lambda e: is_transient(e) or isinstance(e, InfrastructureError),
        )
        log.info("pruning_stopped", pruned=self.pruned)

    async def prune_once(self) -> None:
        """One round over every partition."""
        results = await prune_reservations(self.gateway, self.pool, self.keep_seconds, self.batch)
        round_pruned = sum(r.pruned for r in results)
        if round_pruned:
            log.info("reservations_pruned", count=round_pruned)
        self.pruned += round_pruned
