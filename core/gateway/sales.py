"""Sale commands: open a sale, add or withdraw stock, close it early."""

from __future__ import annotations

import structlog

from core.errors import SaleExists
from core.events import to_ms
from core.gateway.reads import Reads
from core.gateway.scripts import OPERATION_TTL_SECONDS, new_id
from core.models import NewSale, SaleView

log = structlog.get_logger(__name__)


class SaleCommands(Reads):
    """The scripts that change a sale as a whole; each logs its event in the same step."""

    async def create_sale(self, sale: NewSale) -> SaleView:
        """Open a sale; raises ``SaleExists`` if the id is taken."""
        keys = self.keys_for_sale(sale.sale_id)
        operation = new_id()
        await self._run(
            self._create_sale,
            [keys.sale(sale.sale_id), keys.events, keys.operation(operation)],
            [
                operation,
                sale.sale_id,
                sale.stock,
                sale.per_user_limit,
                to_ms(sale.starts_at) if sale.starts_at else "",
                to_ms(sale.ends_at) if sale.ends_at else "",
                sale.hold_seconds,
                OPERATION_TTL_SECONDS,
            ],
        )
        log.info("sale_created", sale_id=sale.sale_id, stock=sale.stock)
        view = await self.get_sale(sale.sale_id)
        if view is None:  # pragma: no cover - the script just wrote it
            raise SaleExists()
        return view

    async def adjust_stock(self, sale_id: str, delta: int, idempotency_key: str | None) -> bool:
        """Add (delta > 0) or withdraw unsold (delta < 0) stock.

        Returns False when this Idempotency-Key was applied before (nothing changed).
        Raises ``SaleNotFound`` or ``NotEnoughUnsoldStock``.
        """
        keys = self.keys_for_sale(sale_id)
        operation = new_id()
        result = await self._run(
            self._adjust_stock,
            [
                keys.sale(sale_id),
                keys.stock_idempotency(sale_id, idempotency_key or ""),
                keys.events,
                keys.operation(operation),
            ],
            [
                operation,
                sale_id,
                delta,
                self.idempotency_ttl,
                "1" if idempotency_key else "",
                OPERATION_TTL_SECONDS,
            ],
        )
        self.sold_out_hints.forget(sale_id)
        log.info("stock_adjusted", sale_id=sale_id, delta=delta, applied=result[1] == "1")
        return result[1] == "1"

    async def close_sale(self, sale_id: str) -> bool:
        """Close a sale early; False when it was already closed. Raises ``SaleNotFound``."""
        keys = self.keys_for_sale(sale_id)
        operation = new_id()
        result = await self._run(
            self._close_sale,
            [keys.sale(sale_id), keys.events, keys.operation(operation)],
            [operation, sale_id, OPERATION_TTL_SECONDS],
        )
        log.info("sale_closed", sale_id=sale_id, changed=result[1] == "1")
        return result[1] == "1"
