"""Sold-out hints: a process's short memory of sales Redis called sold out."""

from __future__ import annotations

import time


class SoldOutHints:
    """Per-process memory of sales that Redis recently called sold out.

    In a flash sale almost every request arrives after the stock is gone; answering those
    from memory for ``ttl`` seconds spares Redis a round trip each. The price is bounded:
    stock returned by a cancel or an expiry is offered at most ``ttl`` seconds late.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._until: dict[str, tuple[float, int]] = {}

    def remember(self, sale_id: str, qty: int) -> None:
        """Redis refused ``qty`` units of ``sale_id`` as sold out just now."""
        if self.ttl > 0:
            self._until[sale_id] = (time.monotonic() + self.ttl, qty)

    def forget(self, sale_id: str) -> None:
        """Stock came back through this process (a cancel or a restock)."""
        self._until.pop(sale_id, None)

    def says_sold_out(self, sale_id: str, qty: int) -> bool:
        """True while a refusal of at most ``qty`` units is fresh."""
        hint = self._until.get(sale_id)
        if hint is None:
            return False
        until, refused_qty = hint
        if time.monotonic() >= until:
            del self._until[sale_id]
            return False
        return qty >= refused_qty
