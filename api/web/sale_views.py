"""The public sale view, served from a per-process cache a few milliseconds old."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# A caller waiting for a read under way.
_Waiter = asyncio.Future[str | None]


class SaleViewCache:
    """GET /v1/sales/{sale_id} answers (serialized JSON), each kept ``ttl`` seconds.

    In a flash sale the sale page is polled as hard as purchases are made; a view a few
    milliseconds old spares Redis a read and the process a serialization per poll. An
    answer is at most ``ttl`` seconds older than the read it came from began. Concurrent
    misses of one sale share one read, and a view is read again ahead of its expiry. An
    unknown sale is not kept: a sale created a moment later is seen at once. Admin
    writes through this process ``forget`` the entry; ``ttl`` 0 turns the cache off.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._views: dict[str, tuple[float, str]] = {}
        # Each read under way: its task and the futures of the callers waiting for it.
        self._reading: dict[str, tuple[asyncio.Future[str | None], list[_Waiter]]] = {}

    async def get(self, sale_id: str, read: Callable[[], Awaitable[str | None]]) -> str | None:
        """The kept view of ``sale_id`` while fresh, else what ``read`` answers now (None:
        no such sale).

        A view past half its age is read again in the background while it is still
        answered, so that under steady polling callers seldom wait for Redis.
        """
        kept = self._views.get(sale_id)
        now = time.monotonic()
        if kept is not None and kept[0] > now:
            if kept[0] - now < self.ttl / 2 and sale_id not in self._reading:
                self._read(sale_id, read, now)
            return kept[1]
        if self.ttl <= 0:
            return await read()
        _, waiters = self._reading.get(sale_id) or self._read(sale_id, read, now)
        # A future of its own per caller, not the read's: a caller that goes away cancels
        # only its own (as ``asyncio.shield`` would, at a third of the cost: under load most
        # callers wait here).
        waiter: _Waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        return await waiter

    def _read(
        self, sale_id: str, read: Callable[[], Awaitable[str | None]], now: float
    ) -> tuple[asyncio.Future[str | None], list[_Waiter]]:
        reading = asyncio.ensure_future(read())
        waiters: list[_Waiter] = []
        self._reading[sale_id] = (reading, waiters)
        until = now + self.ttl
        reading.add_done_callback(lambda done: self._keep(sale_id, done, waiters, until))
        return reading, waiters

    def forget(self, sale_id: str) -> None:
        """The sale changed through this process: the next view is read afresh (a read
        already under way when it changed is not kept either)."""
        self._views.pop(sale_id, None)
        self._reading.pop(sale_id, None)

    def _keep(
        self, sale_id: str, done: asyncio.Future[str | None], waiters: list[_Waiter], until: float
    ) -> None:
        _answer(done, waiters)
        under_way = self._reading.get(sale_id)
        if under_way is None or under_way[0] is not done:
            return  # forgotten while it was read
        del self._reading[sale_id]
        if done.cancelled() or done.exception() is not None:
            return
        text = done.result()
        if text is None:
            self._views.pop(sale_id, None)
        else:
            self._views[sale_id] = (until, text)


def _answer(done: asyncio.Future[str | None], waiters: list[_Waiter]) -> None:
    """Give each caller still waiting what the read ``done`` came to."""
    for waiter in waiters:
        if waiter.done():  # its caller went away
            continue
        if done.cancelled():
            waiter.cancel()
        elif (error := done.exception()) is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(done.result())
