"""The batch write (COPY into the scratch table, one INSERT ... SELECT per table): a batch
partly archived already applies only its new events, and a value no column can hold is
refused as data."""

from __future__ import annotations

import asyncpg
import pytest

from core.events import ReservationConfirmed, ReservationPlaced, SaleCreated, from_ms
from projections.batch import project
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


@pytest.mark.parametrize("qty", [2**31, 2**63])
async def test_a_quantity_no_column_holds_is_refused_as_data(pool: asyncpg.Pool, qty: int):
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.DataError):
            await project(conn, "g", [created(), placed(1, qty=qty)])
        # Nothing of the batch was written, and the connection is fit for the next one.
        assert await conn.fetchval("SELECT count(*) FROM events") == 0
        assert await project(conn, "g", [created(), placed(1)]) == 2
