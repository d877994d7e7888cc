"""The batch write (COPY into the scratch table, one INSERT ... SELECT per table): a batch
partly archived already applies only its new events, a placement projected after its
reservation's final state leaves that state, two connections writing overlapping batches
at once count each event once (and do not deadlock), and a value no column can hold is
refused as data."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from core.events import (
    ReservationCancelled,
    ReservationConfirmed,
    ReservationExpired,
    ReservationPlaced,
    SaleClosed,
    SaleCreated,
    StockAdjusted,
    from_ms,
)
from projections.batch import prepare, project, stock_deltas, write
from projections.entries import LogEntry

T0 = 1_764_000_000_000


def created(event_id: str = "e-sale") -> LogEntry:
    event = SaleCreated(
        event_id=event_id,
        sale_id="s",
        occurred_at=from_ms(T0),
        stock=100,
        per_user_limit=5,
        starts_at=from_ms(T0),
        hold_seconds=600,
    )
    return LogEntry(0, f"{T0}-0", event)


def placed(n: int, qty: int = 1) -> LogEntry:
    event = ReservationPlaced(
        event_id=f"e-place-{n}",
        sale_id="s",
        occurred_at=from_ms(T0 + n),
        reservation_id=f"0-r{n}",
        user_id=f"u{n}",
        qty=qty,
        expires_at=from_ms(T0 + 600_000),
    )
    return LogEntry(0, f"{T0 + n}-0", event)


def confirmed(n: int) -> LogEntry:
    event = ReservationConfirmed(
        event_id=f"e-confirm-{n}",
        sale_id="s",
        occurred_at=from_ms(T0 + 1000 + n),
        reservation_id=f"0-r{n}",
        user_id=f"u{n}",
        qty=1,
    )
    return LogEntry(0, f"{T0 + 1000 + n}-0", event)


async def test_a_batch_partly_archived_applies_only_its_new_events(pool: asyncpg.Pool):
    async with pool.acquire() as conn:
        assert await project(conn, "g", [created(), placed(1), placed(2)]) == 3
        # Again, with a confirmation and a new placement among them (and a duplicate).
        again = [placed(2), confirmed(1), created(), placed(3), placed(3)]
        assert await project(conn, "g", again) == 2
        row = await conn.fetchrow("SELECT * FROM stock_view WHERE sale_id = 's'")
        orders = dict(await conn.fetch("SELECT reservation_id, status FROM orders"))
        archived = await conn.fetchval("SELECT count(*) FROM events")
        checkpoint = await conn.fetchval("SELECT stream_id FROM checkpoints WHERE partition = 0")
    assert (row["stock"], row["remaining"], row["held"], row["confirmed"]) == (100, 97, 2, 1)
    assert orders == {"0-r1": "confirmed", "0-r2": "pending", "0-r3": "pending"}
    assert archived == 5
    assert checkpoint == f"{T0 + 1001}-0"


async def test_a_placement_after_its_final_state_leaves_that_state(pool: asyncpg.Pool):
    # The batch is written first as if all were new (plain INSERTs): the order row of r1
    # breaks that, and the whole batch must be written again, once, skipping nothing new.
    async with pool.acquire() as conn:
        assert await project(conn, "g", [confirmed(1)]) == 1
        assert await project(conn, "g", [created(), placed(1), placed(2)]) == 3
        orders = {
            r["reservation_id"]: (r["status"], r["placed_at"] is not None)
            for r in await conn.fetch("SELECT * FROM orders")
        }
        row = await conn.fetchrow("SELECT * FROM stock_view WHERE sale_id = 's'")
        archived = await conn.fetchval("SELECT count(*) FROM events")
    assert orders == {"0-r1": ("confirmed", True), "0-r2": ("pending", True)}
    assert (row["stock"], row["remaining"], row["held"], row["confirmed"]) == (100, 98, 1, 1)
    assert archived == 4


async def test_overlapping_batches_written_at_once_count_each_event_once(pool: asyncpg.Pool):
    # Two projectors writing one batch, in opposite orders (a delivery claimed by a second
    # consumer while the first still writes it): the rows of every table are taken in key
    # order, so one waits on the other, never deadlocks, and skips what the other wrote.
    # (Inserted in the order given, such a pair deadlocks nearly every time.)
    async with pool.acquire() as a, pool.acquire() as b:
        for k in range(3):
            span = range(1000 * k + 1, 1000 * k + 1001)
            log = [*(placed(n) for n in span), *(confirmed(n) for n in span)]
            new = await asyncio.gather(project(a, "g", log), project(b, "g", log[::-1]))
            assert sorted(new) == [0, len(log)]
        statuses = dict(await a.fetch("SELECT status, count(*) FROM orders GROUP BY status"))
        row = await a.fetchrow("SELECT * FROM stock_view WHERE sale_id = 's'")
        archived = await a.fetchval("SELECT count(*) FROM events")
    assert archived == 6000
    assert statuses == {"confirmed": 3000}
    assert (row["remaining"], row["held"], row["confirmed"]) == (-3000, 0, 3000)


@pytest.mark.parametrize("qty", [2**31, 2**63])
async def test_a_quantity_no_column_holds_is_refused_as_data(pool: asyncpg.Pool, qty: int):
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.DataError):
            await project(conn, "g", [created(), placed(1, qty=qty)])
        # Nothing of the batch was written, and the connection is fit for the next one.
        assert await conn.fetchval("SELECT count(*) FROM events") == 0
        assert await project(conn, "g", [created(), placed(1)]) == 2


FAR = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def every_kind() -> list[LogEntry]:
    """A sale's log with every kind of event, its window ending far in the future: opened,
    five placements (1 to 5 units), one of each final state, stock withdrawn, closed."""
    create = SaleCreated(
        event_id="e-sale",
        sale_id="s",
        occurred_at=from_ms(T0),
        stock=100,
        per_user_limit=5,
        starts_at=from_ms(T0 + 1),
        ends_at=from_ms(FAR),
        hold_seconds=600,
    )
    return [
        LogEntry(0, f"{T0}-0", create),
        *(placed(n, qty=n) for n in range(1, 6)),
        confirmed(1),
        LogEntry(
            0,
            f"{T0 + 2000}-0",
            ReservationCancelled(
                event_id="e-cancel-2",
                sale_id="s",
                occurred_at=from_ms(T0 + 2000),
                reservation_id="0-r2",
                user_id="u2",
                qty=2,
            ),
        ),
        LogEntry(
            0,
            f"{T0 + 2001}-0",
            ReservationExpired(
                event_id="e-expire-3",
                sale_id="s",
                occurred_at=from_ms(T0 + 2001),
                reservation_id="0-r3",
                user_id="u3",
                qty=3,
            ),
        ),
        LogEntry(
            0,
            f"{T0 + 2002}-0",
            StockAdjusted(
                event_id="e-adjust", sale_id="s", occurred_at=from_ms(T0 + 2002), delta=-7
            ),
        ),
        LogEntry(
            0,
            f"{T0 + 2003}-0",
            SaleClosed(event_id="e-close", sale_id="s", occurred_at=from_ms(T0 + 2003)),
        ),
    ]


async def test_the_stock_view_sums_every_kind_of_event_and_keeps_the_window_exact(
    pool: asyncpg.Pool,
):
    # The stock view's deltas are summed by PostgreSQL from the staged batch, and by
    # stock_deltas for a batch written as new: they must be those of stock_deltas, whatever
    # the split into batches and with duplicates, and the sale's window must come through to
    # the millisecond, far in the future too.
    log = every_kind()
    create = log[0].event
    assert isinstance(create, SaleCreated)
    expected = stock_deltas(e.event for e in log)["s"]
    async with pool.acquire() as conn:
        # Out of order, split in three, the middle one delivered twice.
        batches = [log[6:], log[2:7], log[2:7], log[:3]]
        assert [await project(conn, "g", b) for b in batches] == [5, 4, 0, 2]
        row = await conn.fetchrow("SELECT * FROM stock_view WHERE sale_id = 's'")
    assert (
        (row["stock"], row["remaining"], row["held"], row["confirmed"], row["released"])
        == (
            expected.stock,
            expected.remaining,
            expected.held,
            expected.confirmed,
            expected.released,
        )
        == (93, 93 - 15 + 5, 15 - 1 - 5, 1, 5)
    )
    assert (row["per_user_limit"], row["hold_seconds"], row["closed"]) == (5, 600, True)
    assert (row["starts_at"], row["ends_at"]) == (create.starts_at, create.ends_at)


async def tables(conn: asyncpg.Connection) -> dict[str, list[asyncpg.Record]]:
    """Every projected row, in key order, less the columns that say when it was written."""
    return {
        "events": await conn.fetch(
            "SELECT event_id, partition, stream_id, stream_ms, stream_seq, sale_id, type,"
            " occurred_at, payload::text FROM events ORDER BY event_id"
        ),
        "orders": await conn.fetch(
            "SELECT reservation_id, sale_id, user_id, qty, status, placed_at, expires_at,"
            " confirmed_at, cancelled_at, expired_at FROM orders ORDER BY reservation_id"
        ),
        "stock_view": await conn.fetch(
            "SELECT sale_id, stock, remaining, held, confirmed, released, per_user_limit,"
            " hold_seconds, starts_at, ends_at, closed FROM stock_view ORDER BY sale_id"
        ),
        "checkpoints": await conn.fetch(
            "SELECT consumer_group, partition, stream_id, stream_ms, stream_seq"
            " FROM checkpoints ORDER BY consumer_group, partition"
        ),
    }


async def test_a_batch_written_as_new_leaves_the_rows_the_staged_write_leaves(
    pool: asyncpg.Pool,
):
    # A batch of new events is COPIED straight into the tables; one the archive partly
    # holds goes through the scratch table and the statements that skip what is there.
    # The same events must leave the same rows either way: here the sale's first event is
    # projected alone, then the whole log, which takes the staged write (the archive holds
    # that first event) or, without it, the direct one.
    log = every_kind()
    async with pool.acquire() as conn:
        assert await project(conn, "g", log[:1]) == 1
        assert await project(conn, "g", log) == len(log) - 1  # staged
        staged = await tables(conn)
        await conn.execute("TRUNCATE events, orders, stock_view, checkpoints")
        assert await project(conn, "g", log[:1]) == 1
        assert await project(conn, "g", log[1:]) == len(log) - 1  # all new: direct
        direct = await tables(conn)
    assert direct == staged
    assert len(direct["events"]) == len(log) and len(direct["orders"]) == 5
    statuses = {r["reservation_id"]: r["status"] for r in direct["orders"]}
    assert statuses == {
        "0-r1": "confirmed",
        "0-r2": "cancelled",
        "0-r3": "expired",
        "0-r4": "pending",
        "0-r5": "pending",
    }
    # The whole log in one batch of new events, the sale's window and all.
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE events, orders, stock_view, checkpoints")
        assert await project(conn, "g", log) == len(log)
        assert await tables(conn) == direct


async def rollbacks(conn: asyncpg.Connection) -> int:
    """Transactions rolled back in this database so far, this connection's included."""
    await conn.execute("SELECT pg_stat_force_next_flush()")  # this backend's, once idle
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    count: int = await conn.fetchval(
        "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    )
    return count


async def test_a_batch_delivered_before_is_not_tried_as_new(pool: asyncpg.Pool):
    # A repeated delivery (reclaimed, or resumed after a restart) is likely archived in
    # part: written as new it would fail on the archive's unique index, be rolled back and
    # leave an error in the server's log, then be written again. It goes the staged way
    # at once; a first delivery of the same events is tried as new, and rolled back.
    log = [created(), placed(1), placed(2)]
    async with pool.acquire() as conn:
        assert await project(conn, "g", log) == 3
        before = await rollbacks(conn)
        assert await write(conn, "g", prepare([*log, placed(3)], repeated=True)) == 1
        assert await rollbacks(conn) == before
        assert await write(conn, "g", prepare([*log, placed(4)])) == 1
        assert await rollbacks(conn) == before + 1
        orders = {r["reservation_id"] for r in await conn.fetch("SELECT * FROM orders")}
    assert orders == {"0-r1", "0-r2", "0-r3", "0-r4"}
