"""Reads of sale and reservation state: a sale's counters, a reservation, a buyer's list."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from core.errors import ReservationNotFound
from core.events import to_ms
from core.gateway.decode import reservation_view, text, time_of
from core.gateway.scripts import GatewayBase
from core.keys import partition_of_reservation
from core.models import ReservationView, SaleStatus, SaleView


def sale_status(fields: dict[str, int], now_ms: int) -> SaleStatus:
    """Pure rule for a sale's public status from its counters and window."""
    if fields["closed"] or (fields["ends_at"] and now_ms >= fields["ends_at"]):
        return "ended"
    if now_ms < fields["starts_at"]:
        return "scheduled"
    if fields["remaining"] <= 0:
        return "sold_out"
    return "active"


def sale_view(sale_id: str, raw: dict[Any, Any], now_ms: int) -> SaleView:
    """A sale's hash (as Redis answers it) as a ``SaleView`` at ``now_ms``."""
    fields = {text(k): int(v) for k, v in raw.items()}
    return SaleView(
        sale_id=sale_id,
        status=sale_status(fields, now_ms),
        stock=fields["stock"],
        remaining=fields["remaining"],
        held=fields["held"],
        confirmed=fields["confirmed"],
        released=fields["released"],
        per_user_limit=fields["per_user_limit"],
        hold_seconds=fields["hold_seconds"],
        starts_at=time_of(fields["starts_at"]),
        ends_at=time_of(fields["ends_at"]) if fields["ends_at"] else None,
    )


class Reads(GatewayBase):
    """Sale and reservation reads; each is retried after a lost reply."""

    async def get_sale(self, sale_id: str) -> SaleView | None:
        """Current counters of a sale, or None if it does not exist."""
        key = self.keys_for_sale(sale_id).sale(sale_id)

        async def read() -> dict[Any, Any]:
            raw: dict[Any, Any] = await self.client.hgetall(key)
            return raw

        raw = await self._retrying(read, "redis read")
        return sale_view(sale_id, raw, to_ms(datetime.now(UTC))) if raw else None

    async def get_sales(self, sale_ids: list[str]) -> list[SaleView]:
        """Current counters of each of ``sale_ids`` that exists, in that order: one round
        trip (a pipeline, not a transaction: each sale is read as it is, the list is not
        one instant)."""
        if not sale_ids:
            return []

        async def read() -> list[dict[Any, Any]]:
            async with self.client.pipeline(transaction=False) as pipe:
                for sale_id in sale_ids:
                    pipe.hgetall(self.keys_for_sale(sale_id).sale(sale_id))
                rows: list[dict[Any, Any]] = await pipe.execute()
            return rows

        rows = await self._retrying(read, "redis read")
        now_ms = to_ms(datetime.now(UTC))
        return [
            sale_view(sale_id, raw, now_ms)
            for sale_id, raw in zip(sale_ids, rows, strict=True)
            if raw
        ]

    async def get_reservation(self, reservation_id: str) -> ReservationView | None:
        """A reservation by id, or None if the id is unknown or malformed."""
        partition = partition_of_reservation(reservation_id)
        if partition is None or partition >= self.partitions:
            return None
        key = self.keys_for_partition(partition).reservation(reservation_id)

        async def read() -> dict[Any, Any]:
            raw: dict[Any, Any] = await self.client.hgetall(key)
            return raw

        raw = await self._retrying(read, "redis read")
        return reservation_view(reservation_id, raw) if raw else None

    async def reservations_of(self, sale_id: str, user_id: str) -> list[ReservationView] | None:
        """Every reservation ``user_id`` placed in ``sale_id`` that Redis still holds, whatever
        its status, oldest first; None when the sale does not exist."""
        placed = await self.placed_reservations(sale_id, user_id)
        return None if placed is None else [view for _, view in placed]

    async def placed_reservations(
        self, sale_id: str, user_id: str
    ) -> list[tuple[int, ReservationView]] | None:
        """Like :meth:`reservations_of`, each with its placement time (epoch ms), the order
        they come in (then by id), so a caller can merge them with pruned ones. Retried
        after a lost reply (a read)."""
        keys = self.keys_for_sale(sale_id)

        async def read() -> list[tuple[int, ReservationView]] | None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.exists(keys.sale(sale_id))
                pipe.smembers(keys.user_reservations(sale_id, user_id))
                exists, members = await pipe.execute()
            if not exists:
                return None
            ids = sorted(text(m) for m in members)
            async with self.client.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.hgetall(keys.reservation(rid))
                rows = await pipe.execute() if ids else []
            # An id whose hash pruning removed a moment ago (it drops the id from the set next)
            # is skipped: the caller finds it among the pruned ones.
            placed = [
                (int(raw.get(b"created_at", 0)), reservation_view(rid, raw))
                for rid, raw in zip(ids, rows, strict=True)
                if raw
            ]
            placed.sort(key=lambda pair: (pair[0], pair[1].reservation_id))
            return placed

        return await self._retrying(read, "redis read")

    async def _reservation_of(self, reservation_id: str, user_id: str | None) -> ReservationView:
        view = await self.get_reservation(reservation_id)
        if view is None or (user_id is not None and view.user_id != user_id):
            raise ReservationNotFound(f"no reservation {reservation_id[:80]!r} of yours")
        return view
