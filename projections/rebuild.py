"""``flashsale replay rebuild``: rebuild the PostgreSQL projections from the log, online.

The live ``orders`` and ``stock_view`` keep serving, and the projector keeps writing them,
while the rebuild works in three steps:

1. Load: fold the whole log (archive + stream, see ``projections.log``) in memory and COPY
   the final rows into ``orders_rebuild`` and ``stock_view_rebuild``, created like the live
   tables; then give them the live tables' constraints and indexes.
2. Catch up: fold what was appended meanwhile and rewrite the rows it touched, until a
   round brings little. Then archive the folded events that the archive lacks although
   the projector group acknowledged them: lost between Redis and PostgreSQL, they will
   never be delivered again.
3. Swap, in one transaction: lock the archive against writes and the live tables against
   everything (the projector waits), fold the last events, archive the folded events the
   archive still lacks (ones the projector has not projected yet: it skips them when they
   are delivered), then drop the live tables and rename the new ones in, with the live
   tables' index and constraint names.

The new tables then reflect exactly the events in the archive, which is what verify checks;
events appended after the swap are projected by the projector as usual. The table
``rebuild_checkpoints`` records, in the same transactions as the rows, the log position per
partition that the rebuilt tables reflect.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
import structlog

from core.errors import FlashsaleError
from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP
from projections.entries import LogEntry, parse_stream_id
from projections.log import LogChunk, LogReader, acknowledged
from projections.rows import ORDER_COLUMNS, STOCK_COLUMNS, RowFold
from projections.tables import checkpoints, events, staging

log = structlog.get_logger(__name__)

# Any constant works; it only has to be the same for every process rebuilding this database.
_REBUILD_LOCK = 7_401_953

Rows = tuple[list[str], list[tuple[Any, ...]]]
"""The keys of some rows, and the rows (some keys may have none: unknown reservations)."""

Progress = Callable[[str, int, int | None], None]
"""Called as ``progress(phase, done, total)``; ``total`` is None when unknown."""


class RebuildError(FlashsaleError):
    """The rebuild could not run or was refused; the live tables were not changed."""

    code = "rebuild_failed"


@dataclass
class RebuildReport:
    """What a rebuild did."""

    events: int = 0
    sales: int = 0
    orders: int = 0
    caught_up: int = 0
    rearchived: int = 0
    malformed: int = 0
    seconds: float = 0.0
    positions: dict[int, str] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Events folded per second, over the whole rebuild."""
        return self.events / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        """One paragraph for people."""
        return (
            f"rebuilt orders and stock_view from {self.events:,} events: {self.sales:,} sales,"
            f" {self.orders:,} orders in {self.seconds:.1f} s ({self.rate:,.0f} events/s)\n"
            f"caught up {self.caught_up:,} events that arrived meanwhile; archived"
            f" {self.rearchived:,} events the archive lacked; skipped {self.malformed:,}"
            " malformed entries"
        )

    def to_json(self) -> str:
        """The report for machines."""
        return json.dumps(asdict(self) | {"rate": round(self.rate, 1)}, indent=2)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: folding a large log allocates millions of
    objects and no cycles, and the collections it would trigger take a third of the time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Rebuild:
    """One run of the rebuild (see the module docstring)."""

    def __init__(
        self,
        gateway: RedisGateway,
        pool: asyncpg.Pool,
        *,
        chunk: int = 1_000,
        progress: Progress | None = None,
        catch_up_rounds: int = 5,
        catch_up_enough: int = 2_000,
        lock_timeout_ms: int = 10_000,
        lock_attempts: int = 3,
    ) -> None:
        self.gateway = gateway
        self.partitions = gateway.partitions
        self.pool = pool
        # Entries per XRANGE: 10,000 held Redis for 10 to 130 ms each (bench/bench_verify.py).
        self.reader = LogReader(gateway, pool, chunk)
        self.progress = progress or (lambda phase, done, total: None)
        self.catch_up_rounds = catch_up_rounds
        self.catch_up_enough = catch_up_enough
        self.lock_timeout_ms = lock_timeout_ms
        self.lock_attempts = lock_attempts
        self.fold = RowFold()
        self.positions = dict.fromkeys(range(self.partitions), "0-0")
        self.unarchived: dict[str, LogEntry] = {}
        self.report = RebuildReport()
        # (live table, live name) of each constraint and index given to the new tables.
        self._constraints: list[tuple[str, str]] = []
        self._indexes: list[tuple[str, str]] = []
        self._loaded: set[str] = set()  # the sales whose rows the load wrote

    async def run(self) -> RebuildReport:
        """Rebuild and swap; raises ``RebuildError`` (or a database error) on failure, in
        which case the live tables are untouched."""
        if self.pool.get_max_size() < 2:
            raise RebuildError("the rebuild needs a pool of at least 2 PostgreSQL connections")
        started = time.perf_counter()
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _REBUILD_LOCK):
                raise RebuildError("another rebuild is running on this database")
            try:
                await self._prepare(conn)
                await self._load(conn)
                for _ in range(self.catch_up_rounds):
                    arrived = await self._catch_up("catching up")
                    async with conn.transaction():
                        await self._write_dirty(conn)
                    if arrived < self.catch_up_enough:
                        break
                await self._archive_acknowledged(conn)
                await self._swap(conn)
            except Exception:
                with contextlib.suppress(Exception):
                    await self._drop_new(conn)
                raise
            finally:
                with contextlib.suppress(Exception):
                    await conn.execute("SELECT pg_advisory_unlock($1)", _REBUILD_LOCK)
        r = self.report
        r.seconds = time.perf_counter() - started
        r.events, r.sales = self.fold.events, len(self.fold.sales)
        r.orders = sum(len(s.reservations) for s in self.fold.sales.values())
        r.positions = dict(self.positions)
        log.info("rebuild_done", events=r.events, seconds=round(r.seconds, 2))
        return r

    async def _prepare(self, conn: asyncpg.Connection) -> None:
        """Create the new tables like the live ones, without indexes (added after the load)."""
        await staging.create(conn)

    async def _drop_new(self, conn: asyncpg.Connection) -> None:
        await staging.drop(conn)

    def _take(self, chunk: LogChunk) -> int:
        for entry in chunk.entries:
            self.fold.add(entry.event)
        for entry in chunk.unarchived:
            self.unarchived[entry.event.event_id] = entry
        self.positions[chunk.partition] = chunk.last_id
        self.report.malformed += chunk.malformed
        return len(chunk.entries)

    async def _load(self, conn: asyncpg.Connection) -> None:
        """Fold the whole log and COPY every row, then add the indexes.

        A sale's events are all in its partition's log, so its rows are final once that
        partition is folded: they are written while the next partition is folded, and
        PostgreSQL stores them on the other core meanwhile."""
        total = 0
        for partition in range(self.partitions):
            total += await self.reader.estimate(partition)
        done = rows = 0
        self.progress("folding the log", 0, total)
        async with conn.transaction():
            writing: asyncio.Future[None] | None = None
            try:
                with _gc_paused():
                    for partition in range(self.partitions):
                        async for chunk in self.reader.chunks(partition, check_archive=True):
                            done += self._take(chunk)
                            self.progress("folding the log", done, max(total, done))
                        # A sale met again (its events in two partitions' logs: the number
                        # of partitions changed) has rows already: they are replaced.
                        again = not self._loaded.isdisjoint(self.fold.dirty_sales)
                        self._loaded.update(self.fold.dirty_sales)
                        sales, orders = self._dirty_rows()
                        rows += len(sales[1]) + len(orders[1])
                        write = self._write_rows(conn, sales, orders, again, writing)
                        writing = asyncio.ensure_future(write)
                self.progress("writing rows", 0, rows)
                if writing is not None:
                    await writing
            except BaseException:
                if writing is not None:  # stopped before the transaction rolls back
                    writing.cancel()
                    await asyncio.gather(writing, return_exceptions=True)
                raise
            await self._checkpoint(conn)
        self.progress("writing rows", rows, rows)
        self.progress("building indexes", 0, len(staging.TABLES))
        for n, table in enumerate(staging.TABLES, 1):
            await self._add_indexes(conn, table)
            self.progress("building indexes", n, len(staging.TABLES))

    async def _copy(
        self,
        conn: asyncpg.Connection,
        table: str,
        columns: tuple[str, ...],
        rows: list[tuple[Any, ...]],
    ) -> None:
        await staging.copy_rows(conn, table, columns, rows)

    async def _add_indexes(self, conn: asyncpg.Connection, table: str) -> None:
        """Give the new table the live table's constraints and indexes, under new names."""
        try:
            constraints, indexes = await staging.add_indexes(conn, table)
        except staging.UncopyableIndexError as e:
            raise RebuildError(str(e)) from e
        self._constraints.extend(constraints)
        self._indexes.extend(indexes)

    async def _catch_up(self, phase: str) -> int:
        """Fold what the log gained after the positions folded so far."""
        arrived = 0
        self.progress(phase, 0, None)
        for partition in range(self.partitions):
            after = self.positions[partition]
            async for chunk in self.reader.chunks(partition, after, check_archive=True):
                arrived += self._take(chunk)
                self.progress(phase, arrived, None)
        self.report.caught_up += arrived
        return arrived

    async def _write_dirty(self, conn: asyncpg.Connection) -> None:
        """Rewrite the rows that changed since they were last written, and the checkpoint."""
        await self._write_rows(conn, *self._dirty_rows(ordered=True), replace=True)
        await self._checkpoint(conn)

    def _dirty_rows(self, *, ordered: bool = False) -> tuple[Rows, Rows]:
        """The keys and rows of the sales and orders that changed since last taken
        (``stock_view``, then ``orders``), in key order if ``ordered``."""
        sales = list(self.fold.dirty_sales)
        orders = list(self.fold.dirty_orders.items())
        if ordered:
            sales.sort()
            orders.sort()
        self.fold.dirty_sales.clear()
        self.fold.dirty_orders.clear()
        order_rows = [self.fold.order_row(rid, sale_id) for rid, sale_id in orders]
        return (
            (sales, [self.fold.stock_row(s) for s in sales]),
            ([rid for rid, _ in orders], [r for r in order_rows if r is not None]),
        )

    async def _write_rows(
        self,
        conn: asyncpg.Connection,
        sales: Rows,
        orders: Rows,
        replace: bool,
        after: asyncio.Future[None] | None = None,
    ) -> None:
        """COPY the rows (deleting those of the same keys first if ``replace``), once the
        write ``after`` is done: one statement at a time on the connection."""
        if after is not None:
            await after
        for table, columns, (keys, rows) in (
            ("stock_view", STOCK_COLUMNS, sales),
            ("orders", ORDER_COLUMNS, orders),
        ):
            if replace and keys:
                await staging.delete_rows(conn, table, keys)
            await self._copy(conn, table, columns, rows)

    async def _checkpoint(self, conn: asyncpg.Connection) -> None:
        await checkpoints.record_rebuilt(
            conn, [(p, i, parse_stream_id(i)) for p, i in sorted(self.positions.items())]
        )

    async def _swap(self, conn: asyncpg.Connection) -> None:
        """Lock, fold the last events, archive what the archive lacks, rename: one
        transaction. Waiting for the locks is bounded by ``lock_timeout_ms``; a timeout
        (a long transaction in the way) is retried a few times before giving up."""
        for attempt in range(1, self.lock_attempts + 1):
            self.progress("swapping", 0, None)
            try:
                async with conn.transaction():
                    await self._lock(conn)
                    await self._catch_up("swapping")
                    self.report.rearchived += await self._rearchive(
                        conn, list(self.unarchived.values())
                    )
                    await self._write_dirty(conn)
                    await self._rename(conn)
                return
            except asyncpg.LockNotAvailableError:
                if attempt == self.lock_attempts:
                    raise
                log.warning("rebuild_swap_lock_timeout", attempt=attempt)

    async def _lock(self, conn: asyncpg.Connection) -> None:
        await conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_timeout_ms)}")
        # The projector writes events, then stock_view, then orders: lock in that order.
        # EXCLUSIVE still lets verify and the log reader read the archive.
        await events.lock_against_writes(conn)
        await staging.lock_live(conn)
        await conn.execute("SET LOCAL lock_timeout = 0")  # locked: the rest must not time out

    async def _rename(self, conn: asyncpg.Connection) -> None:
        """Drop the live tables and give the new ones their names, indexes and constraints."""
        await staging.swap_in(conn, self._constraints, self._indexes)

    async def _archive_acknowledged(self, conn: asyncpg.Connection) -> None:
        """Archive, before the swap and its locks, the folded events that the archive lacks
        although the projector group acknowledged them: lost, the projector will never
        deliver them again, so archiving them early changes nothing it does."""
        progress = await self.gateway.group_progress(CONSUMER_GROUP)
        lost = [e for e in self.unarchived.values() if acknowledged(e, progress)]
        if lost:
            async with conn.transaction():
                self.report.rearchived += await self._rearchive(conn, lost)
            for entry in lost:
                del self.unarchived[entry.event.event_id]

    async def _rearchive(self, conn: asyncpg.Connection, entries: list[LogEntry]) -> int:
        """Archive ``entries`` (inside the caller's transaction) unless already there;
        return how many were missing."""
        if not entries:
            return 0
        entries = sorted(entries, key=lambda e: (e.partition, e.position))
        self.progress("archiving missing events", 0, len(entries))
        added = await events.archive_missing(conn, entries)
        self.progress("archiving missing events", len(entries), len(entries))
        if added:
            log.warning("events_rearchived", count=added)
        return added


async def rebuild(
    gateway: RedisGateway,
    pool: asyncpg.Pool,
    *,
    progress: Progress | None = None,
    chunk: int = 1_000,
) -> RebuildReport:
    """Rebuild ``orders`` and ``stock_view`` from the log and swap them in (see above)."""
    return await Rebuild(gateway, pool, chunk=chunk, progress=progress).run()
