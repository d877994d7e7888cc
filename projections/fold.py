"""The fold: the event log turned back into the state it explains. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from core.events import (
    AnyEvent,
    ReservationConfirmed,
    ReservationEvent,
    ReservationPlaced,
    SaleClosed,
    SaleCreated,
    StockAdjusted,
)

# The status each final event leaves a reservation in.
TERMINAL_STATUS = {
    "ReservationConfirmed": "confirmed",
    "ReservationCancelled": "cancelled",
    "ReservationExpired": "expired",
}


@dataclass(slots=True)
class ReservationState:
    """One reservation as the log tells it."""

    reservation_id: str
    sale_id: str
    user_id: str
    qty: int
    status: str
    expires_at: datetime | None = None


@dataclass
class SaleState:
    """One sale as the log tells it."""

    sale_id: str
    stock: int = 0
    remaining: int = 0
    held: int = 0
    confirmed: int = 0
    released: int = 0
    per_user_limit: int = 0
    hold_seconds: int = 0
    closed: bool = False
    created: bool = False
    holders: dict[str, int] = field(default_factory=dict)
    reservations: dict[str, ReservationState] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def counters(self) -> dict[str, int]:
        """The numbers that Redis and the stock view must agree on."""
        return {
            "stock": self.stock,
            "remaining": self.remaining,
            "held": self.held,
            "confirmed": self.confirmed,
            "released": self.released,
        }

    def invariant_violations(self) -> list[str]:
        """Breaches of the sale invariants in the folded state itself."""
        found = list(self.problems)
        if self.remaining < 0:
            found.append(f"remaining is negative ({self.remaining})")
        if self.remaining + self.held + self.confirmed != self.stock:
            found.append(
                f"remaining+held+confirmed ({self.remaining}+{self.held}+{self.confirmed})"
                f" != stock ({self.stock})"
            )
        for user, qty in self.holders.items():
            if qty > self.per_user_limit:
                found.append(f"user {user} holds {qty} > limit {self.per_user_limit}")
        return found


def apply(sales: dict[str, SaleState], event: AnyEvent) -> bool:
    """Apply one event to the folded state, in log order. Return whether the state took
    it: False for an event that breaks the reservation rules (placed twice, or the end of
    a reservation that is not pending), which is noted in the sale's problems instead."""
    sale = sales.get(event.sale_id)
    if sale is None:  # not setdefault: that would build a SaleState for every event
        sale = sales[event.sale_id] = SaleState(event.sale_id)
    # Reservation events first: they are nearly all of a log.
    if isinstance(event, ReservationEvent):
        reservation = sale.reservations.get(event.reservation_id)
        if isinstance(event, ReservationPlaced):
            if reservation is not None:
                sale.problems.append(f"reservation {event.reservation_id} placed twice")
                return False
            sale.reservations[event.reservation_id] = ReservationState(
                event.reservation_id,
                event.sale_id,
                event.user_id,
                event.qty,
                "pending",
                event.expires_at,
            )
            sale.remaining -= event.qty
            sale.held += event.qty
            holders = sale.holders
            holders[event.user_id] = holders.get(event.user_id, 0) + event.qty
            return True
        if reservation is None or reservation.status != "pending":
            state = "unknown" if reservation is None else reservation.status
            sale.problems.append(f"{event.type} for {state} reservation {event.reservation_id}")
            return False
        reservation.status = TERMINAL_STATUS[event.type]
        sale.held -= event.qty
        if isinstance(event, ReservationConfirmed):
            sale.confirmed += event.qty
            return True
        sale.remaining += event.qty
        sale.released += event.qty
        left = sale.holders.get(event.user_id, 0) - event.qty
        if left > 0:
            sale.holders[event.user_id] = left
        else:
            sale.holders.pop(event.user_id, None)
        return True
    if isinstance(event, SaleCreated):
        if sale.created:
            sale.problems.append(f"SaleCreated twice ({event.event_id})")
        sale.created = True
        sale.stock += event.stock
        sale.remaining += event.stock
        sale.per_user_limit = event.per_user_limit
        sale.hold_seconds = event.hold_seconds
    elif isinstance(event, StockAdjusted):
        sale.stock += event.delta
        sale.remaining += event.delta
    elif isinstance(event, SaleClosed):
        sale.closed = True
    return True


def fold(events: Iterable[AnyEvent]) -> dict[str, SaleState]:
    """Fold events (in log order) into per-sale state."""
    sales: dict[str, SaleState] = {}
    for event in events:
        apply(sales, event)
    return sales
