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
        self._renew_at: dict[str, float] = {}

    def remember(self, sale_id: str, qty: int, at: float | None = None) -> None:
        """Redis refused ``qty`` units of ``sale_id`` as sold out just now (or at ``at``, a
        ``time.monotonic()`` reading)."""
        if self.ttl > 0:
            now = time.monotonic() if at is None else at
            self._until[sale_id] = (now + self.ttl, qty)
            self._renew_at[sale_id] = now + self.ttl / 2

    def forget(self, sale_id: str) -> None:
        """Stock came back through this process (a cancel or a restock)."""
        self._until.pop(sale_id, None)
        self._renew_at.pop(sale_id, None)

    def says_sold_out(self, sale_id: str, qty: int) -> bool:
        """True while a refusal of at most ``qty`` units is fresh."""
        hint = self._until.get(sale_id)
        if hint is None:
            return False
        until, refused_qty = hint
        if time.monotonic() >= until:
            self.forget(sale_id)
            return False
        return qty >= refused_qty

    def renewal_due(self, sale_id: str) -> bool:
        """True once per hint past half its age: the caller may read the sale and, if Redis
        still says sold out, ``remember`` it again, so that a stampede on a sold-out sale
        does not reach Redis all at once each time the hint lapses."""
        renew_at = self._renew_at.get(sale_id)
        if renew_at is None or time.monotonic() < renew_at:
            return False
        del self._renew_at[sale_id]
        return True
