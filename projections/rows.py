"""The projection rows as the log tells them: the fold, plus what ``orders`` and
``stock_view`` hold beyond it (the time of each change, the sale's window). Pure, no I/O;
used by the rebuild to write rows and by the Redis repair to write reservations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from core.events import AnyEvent, ReservationEvent, ReservationPlaced, SaleCreated
from projections.fold import SaleState, apply

STOCK_COLUMNS = (
    "sale_id",
    "stock",
    "remaining",
    "held",
    "confirmed",
    "released",
    "per_user_limit",
    "hold_seconds",
    "starts_at",
    "ends_at",
    "closed",
)
ORDER_COLUMNS = (
    "reservation_id",
    "sale_id",
    "user_id",
    "qty",
    "status",
    "placed_at",
    "expires_at",
    "confirmed_at",
    "cancelled_at",
    "expired_at",
)


class RowFold:
    """The fold of the log plus what the projection rows need beyond it (the times of each
    change, the sale's window), and which rows changed since they were last written."""

    def __init__(self) -> None:
        self.sales: dict[str, SaleState] = {}
        self.created: dict[str, SaleCreated] = {}
        self.placed_at: dict[str, datetime] = {}
        self.ended_at: dict[str, datetime] = {}
        self.dirty_sales: set[str] = set()
        self.dirty_orders: dict[str, str] = {}  # reservation_id -> sale_id
        self.events = 0

    def add(self, event: AnyEvent) -> None:
        """Apply one event, in log order."""
        self.events += 1
        sale_id = event.sale_id
        self.dirty_sales.add(sale_id)
        if not apply(self.sales, event):
            return
        if isinstance(event, ReservationEvent):
            rid = event.reservation_id
            # Only the first placement and the first end of a reservation id count (the
            # fold took this one; another sale may have taken the same id before).
            if isinstance(event, ReservationPlaced):
                if rid not in self.placed_at:
                    self.placed_at[rid] = event.occurred_at
                    self.dirty_orders[rid] = sale_id
            elif rid not in self.ended_at:
                self.ended_at[rid] = event.occurred_at
                self.dirty_orders[rid] = sale_id
        elif isinstance(event, SaleCreated):
            self.created[sale_id] = event

    def stock_row(self, sale_id: str) -> tuple[Any, ...]:
        """The ``stock_view`` row of a sale, in ``STOCK_COLUMNS`` order."""
        s = self.sales[sale_id]
        c = self.created.get(sale_id)
        return (
            sale_id,
            s.stock,
            s.remaining,
            s.held,
            s.confirmed,
            s.released,
            c.per_user_limit if c else None,
            c.hold_seconds if c else None,
            c.starts_at if c else None,
            c.ends_at if c else None,
            s.closed,
        )

    def order_row(self, reservation_id: str, sale_id: str) -> tuple[Any, ...] | None:
        """The ``orders`` row of a reservation, in ``ORDER_COLUMNS`` order (None: unknown)."""
        r = self.sales[sale_id].reservations.get(reservation_id)
        if r is None:
            return None
        ended = self.ended_at.get(reservation_id)
        return (
            reservation_id,
            r.sale_id,
            r.user_id,
            r.qty,
            r.status,
            self.placed_at.get(reservation_id),
            r.expires_at,
            ended if r.status == "confirmed" else None,
            ended if r.status == "cancelled" else None,
            ended if r.status == "expired" else None,
        )
