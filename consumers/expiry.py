"""The expiry worker: returns the stock of unpaid reservations once their window passes.

Deadlines live in Redis (one sorted set per partition), never in this process, so a
restart loses nothing. Each sweep reads the overdue ids of a partition, then expires them
in one atomic script call that checks each again (still overdue, still pending), so any
number of workers may run at once without expiring a reservation twice.
"""

from __future__ import annotations

import asyncio

import structlog

from consumers.periodic import run_periodically
from core.errors import InfrastructureError
from core.gateway import RedisGateway

log = structlog.get_logger(__name__)


class ExpiryWorker:
    """Sweeps every partition's deadlines every ``interval`` seconds."""

    def __init__(self, gateway: RedisGateway, interval: float = 0.25, batch: int = 200) -> None:
        self.gateway = gateway
        self.interval = interval
        self.batch = batch
        self.expired = 0

    async def sweep(self) -> int:
        """Expire everything overdue now, in every partition; return how many expired."""
        total = 0
        for partition in range(self.gateway.partitions):
            while True:
                expired, left = await self.gateway.expire_due(partition, self.batch)
                total += expired
                if left == 0:
                    break
        if total:
            log.info("reservations_expired", count=total)
        self.expired += total
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep until ``stop`` is set; Redis outages are logged and retried."""
        log.info("expiry_worker_started", interval=self.interval)
        await run_periodically(
            "expiry",
            self.sweep,
            stop,
            self.interval,
            retry=lambda e: isinstance(e, InfrastructureError),
            survive_errors=False,
            first_at_once=True,
        )
        log.info("expiry_worker_stopped", expired=self.expired)
