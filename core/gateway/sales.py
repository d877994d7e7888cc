"""Sale commands: open a sale, add or withdraw stock, close it early."""

from __future__ import annotations

import structlog

from core.errors import SaleAction, SaleExists, SaleNotReplicated
from core.events import to_ms
from core.gateway.reads import Reads
from core.gateway.scripts import OPERATION_TTL_SECONDS, new_id
from core.models import NewSale, SaleView

log = structlog.get_logger(__name__)


class SaleCommands(Reads):
    """The scripts that change a sale as a whole; each logs its event in the same step.

    Under ``wait_replicas``, each returns only once that many replicas hold what it did
    (else raises ``SaleNotReplicated``; the write stands on the primary)."""

    async def create_sale(self, sale: NewSale, idempotency_key: str | None = None) -> SaleView:
        """Open a sale; raises ``SaleExists`` if the id is taken, unless this
        ``idempotency_key`` opened it with the same values (then it answers that sale and
        changes nothing), or ``IdempotencyKeyReused`` if the key opened it with others."""
        keys = self.keys_for_sale(sale.sale_id)
        operation = new_id()
        asked: list[str | int] = [
            sale.stock,
            sale.per_user_limit,
            to_ms(sale.starts_at) if sale.starts_at else "",
            to_ms(sale.ends_at) if sale.ends_at else "",
            sale.hold_seconds,
        ]
        result = await self._run(
            self._create_sale,
            [
                keys.sale(sale.sale_id),
                keys.events,
                keys.operation(operation),
                keys.sale_idempotency(sale.sale_id, idempotency_key or ""),
            ],
            [
                operation,
                sale.sale_id,
                *asked,
                OPERATION_TTL_SECONDS,
                ",".join(map(str, asked)) if idempotency_key else "",
                self.idempotency_ttl,
            ],
        )
        log.info("sale_created", sale_id=sale.sale_id, stock=sale.stock, repeat=not result[1])
        await self._replicated(sale.sale_id, "create")
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
        await self._replicated(sale_id, "restock")
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
        await self._replicated(sale_id, "close")
        return result[1] == "1"

    async def _replicated(self, sale_id: str, action: SaleAction) -> None:
        """Under ``wait_replicas``, return once that many replicas hold every write made
        so far to the sale's partition, this call's among them; else raise
        ``SaleNotReplicated``.

        Through the partition's mark (``core.gateway.scripts.PartitionMarks``): the write
        is covered whichever connection made it, and whether this call made it or found
        it done.
        """
        if not self.wait_replicas:
            return
        partition = self.keys_for_sale(sale_id).partition
        acknowledged = await self._retrying(
            lambda: self.marks.acknowledged([partition]), f"redis {action} and WAIT"
        )
        if acknowledged < self.wait_replicas:
            log.warning(
                "sale_not_replicated",
                sale_id=sale_id,
                action=action,
                acknowledged=acknowledged,
                wanted=self.wait_replicas,
            )
            raise SaleNotReplicated(sale_id, acknowledged, self.wait_replicas, action)
