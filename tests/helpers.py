"""Helpers shared by the tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.gateway import RedisGateway
from core.models import NewSale, SaleView


async def open_sale(
    gateway: RedisGateway,
    sale_id: str = "sale-1",
    stock: int = 10,
    per_user_limit: int = 1,
    hold_seconds: int = 600,
    starts_in: float | None = None,
) -> SaleView:
    """Create a sale that is active now (or starts ``starts_in`` seconds from now)."""
    starts_at = datetime.now(UTC) + timedelta(seconds=starts_in) if starts_in else None
    return await gateway.create_sale(
        NewSale(
            sale_id=sale_id,
            stock=stock,
            per_user_limit=per_user_limit,
            hold_seconds=hold_seconds,
            starts_at=starts_at,
        )
    )
