"""The projector daemon: reads the partition streams through a consumer group and projects
them into PostgreSQL.

Delivery is at-least-once: an entry is acknowledged (XACK) only after the PostgreSQL
transaction that archived and applied it has committed. Entries left pending by a consumer
that died are reclaimed with XAUTOCLAIM once idle for ``claim_idle_ms``. An entry that
cannot be parsed, or whose data PostgreSQL refuses, is parked on the dead-letter stream with
the error, then acknowledged; the rest of its batch is projected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from core.events import parse_event
from core.keys import CONSUMER_GROUP, PartitionKeys, dead_letter_stream
from projections.projector import LogEntry, project

log = structlog.get_logger(__name__)

RawEntry = tuple[bytes | str, dict[bytes | str, bytes | str]]

# PostgreSQL refusing an entry's data (SQLSTATE classes 22 and 23, or a value asyncpg cannot
# encode) fails the same way on every retry; retrying the batch would stall every partition
# behind one entry forever, so such entries are parked like unparseable ones.
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def default_consumer_name() -> str:
    """A name unique to this process: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Delivery:
    """A raw stream entry delivered to this consumer."""

    partition: int
    stream_id: str
    fields: dict[str, str]


class Projector:
    """One consumer of the ``projector`` group, covering every partition stream."""

    def __init__(
        self,
        client: aioredis.Redis,
        pool: asyncpg.Pool,
        partitions: int,
        *,
        consumer: str | None = None,
        batch: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        group: str = CONSUMER_GROUP,
    ) -> None:
        self.client = client
        self.pool = pool
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.streams = {PartitionKeys(p).events: p for p in range(partitions)}
        self.projected = 0
        self.dead_lettered = 0

    async def ensure_groups(self) -> None:
        """Create the consumer group on every stream (idempotent)."""
        for stream in self.streams:
            try:
                await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def _deliveries(self, stream: bytes | str, entries: Sequence[RawEntry]) -> list[Delivery]:
        partition = self.streams[_text(stream)]
        return [
            Delivery(
                partition=partition,
                stream_id=_text(entry_id),
                fields={_text(k): _text(v) for k, v in fields.items()},
            )
            for entry_id, fields in entries
            if fields is not None  # a deleted entry still pending comes back as None
        ]

    async def read_new(self, block_ms: int | None = None) -> list[Delivery]:
        """XREADGROUP new entries from every partition (blocks up to ``block_ms``)."""
        reply: Any = await self.client.xreadgroup(
            self.group,
            self.consumer,
            dict.fromkeys(self.streams, ">"),
            count=self.batch,
            block=(self.block_ms if block_ms is None else block_ms) or None,  # 0: do not block
        )
        deliveries: list[Delivery] = []
        for stream, entries in reply or []:
            deliveries.extend(self._deliveries(stream, entries))
        return deliveries

    async def claim_stale(self) -> list[Delivery]:
        """XAUTOCLAIM entries idle longer than ``claim_idle_ms`` on any consumer."""
        deliveries: list[Delivery] = []
        for stream in self.streams:
            start = "0-0"
            while len(deliveries) < self.batch:
                reply = await self.client.xautoclaim(
                    stream,
                    self.group,
                    self.consumer,
                    self.claim_idle_ms,
                    start_id=start,
                    count=self.batch,
                )
                next_start, entries = _text(reply[0]), reply[1]
                deliveries.extend(self._deliveries(stream, entries))
                if next_start == "0-0":
                    break
                start = next_start
        if deliveries:
            log.info("entries_reclaimed", consumer=self.consumer, count=len(deliveries))
        return deliveries

    async def handle(self, deliveries: Sequence[Delivery]) -> int:
        """Project deliveries, park the ones that can never be projected, then XACK all.

        Returns how many events were new to PostgreSQL.
        """
        if not deliveries:
            return 0
        entries: list[LogEntry] = []
        by_position: dict[tuple[int, str], Delivery] = {}
        poison: list[tuple[Delivery, str]] = []
        for d in deliveries:
            try:
                event = parse_event(d.fields.get("event", ""))
            except ValueError as e:
                # Parsing is pure, so it fails the same way on every delivery: the entry
                # is poison, not a transient fault.
                poison.append((d, f"{type(e).__name__}: {e}"[:500]))
                continue
            entries.append(LogEntry(d.partition, d.stream_id, event))
            by_position[(d.partition, d.stream_id)] = d
        new, refused = await self._project(entries)
        poison += [(by_position[(e.partition, e.stream_id)], error) for e, error in refused]
        for d, error in poison:
            await self.client.xadd(
                dead_letter_stream(),
                {
                    "stream": PartitionKeys(d.partition).events,
                    "stream_id": d.stream_id,
                    "group": self.group,
                    "error": error,
                    **{f"field:{k}": v for k, v in d.fields.items()},
                },
            )
            log.warning("event_dead_lettered", stream_id=d.stream_id, error=error)
        await self.ack(deliveries)
        self.projected += new
        self.dead_lettered += len(poison)
        return new

    async def _project(self, entries: Sequence[LogEntry]) -> tuple[int, list[tuple[LogEntry, str]]]:
        """Project ``entries`` in one transaction; if PostgreSQL refuses the data itself,
        project them one by one instead and return the refused ones with the error."""
        async with self.pool.acquire() as conn:
            try:
                return await project(conn, self.group, entries), []
            except _REFUSED as e:
                log.warning("batch_refused", size=len(entries), error=str(e))
            new = 0
            refused: list[tuple[LogEntry, str]] = []
            for entry in entries:
                try:
                    new += await project(conn, self.group, [entry])
                except _REFUSED as e:
                    refused.append((entry, f"{type(e).__name__}: {e}"[:500]))
            return new, refused

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """XACK deliveries, one pipeline for all partitions."""
        by_stream: dict[str, list[str]] = {}
        for d in deliveries:
            by_stream.setdefault(PartitionKeys(d.partition).events, []).append(d.stream_id)
        async with self.client.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
            await pipe.execute()

    async def run(self, stop: asyncio.Event, claim_every: float = 5.0) -> None:
        """Consume until ``stop`` is set, then finish the batch in hand and return.

        On a Redis or PostgreSQL failure the batch in hand is kept (nothing was
        acknowledged) and retried with exponential back-off until it goes through.
        """
        await self.ensure_groups()
        log.info("projector_started", consumer=self.consumer, streams=len(self.streams))
        next_claim = 0.0
        in_hand: list[Delivery] = []
        backoff = 0.1
        while not stop.is_set():
            try:
                if not in_hand and time.monotonic() >= next_claim:
                    in_hand = await self.claim_stale()
                    # A full claim means more stale entries may be waiting (a dead consumer
                    # can hold a batch per partition): claim again at once, not in 5 s.
                    full = len(in_hand) >= self.batch
                    next_claim = 0.0 if full else time.monotonic() + claim_every
                if not in_hand:
                    in_hand = await self.read_new()
                await self.handle(in_hand)
                in_hand = []
                backoff = 0.1
            except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning(
                    "projector_retry",
                    error=str(e),
                    error_type=type(e).__name__,
                    in_hand=len(in_hand),
                    retry_in=backoff,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
        log.info("projector_stopped", consumer=self.consumer, projected=self.projected)
