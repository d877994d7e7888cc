"""The Redis gateway: the only code that runs the Lua scripts and reads sale state.

One class, ``RedisGateway``, combines the command families, each in its own module (the
way redis-py combines its command mixins into one client):

- ``scripts``: the script registry, running a script with its rejections mapped to errors,
  and the retry policy for lost replies (``GatewayBase``, which every family extends);
- ``sales`` and ``reservations``: the write commands, with the sold-out hints and WAIT;
- ``reads``: a sale, a reservation, a buyer's reservations;
- ``streams``: partition streams and consumer-group progress;
- ``snapshot``: a sale's state read in bounded steps and fenced at one stream position;
- ``repair``: writing a folded sale back, and pruning archived reservations;
- ``records``: what the operators' tools keep beside the sales (the last verify result).

Build it from the settings with ``RedisGateway.from_settings``.
"""

from __future__ import annotations

from core.gateway.clients import RedisClient
from core.gateway.records import OperatorRecords
from core.gateway.repair import Repairs, ReservationRecord, SaleRepair
from core.gateway.reservations import Placed, ReservationCommands
from core.gateway.sales import SaleCommands
from core.gateway.scripts import RetryPolicy, load_lua
from core.gateway.snapshot import FENCE_LIMIT, SaleLog, SaleSnapshot, Snapshots, Touched
from core.gateway.streams import GroupProgress, StreamChunk, StreamReads
from core.settings import Settings


class RedisGateway(
    SaleCommands, ReservationCommands, StreamReads, Snapshots, Repairs, OperatorRecords
):
    """Runs flashsale's Lua scripts (EVALSHA, loaded once per client) and reads state."""

    @classmethod
    def from_settings(
        cls, client: RedisClient, settings: Settings, *, retry: RetryPolicy | None = None
    ) -> RedisGateway:
        """The gateway every process uses: partitions, Idempotency-Key TTL, sold-out hint
        and WAIT as ``settings`` say, lost replies retried by ``retry`` (default policy)."""
        return cls(
            client,
            settings.partitions,
            settings.idempotency_ttl_seconds,
            sold_out_hint_seconds=settings.sold_out_hint_ms / 1000,
            wait_replicas=settings.wait_replicas,
            wait_timeout_ms=settings.wait_timeout_ms,
            retry=retry,
        )


__all__ = [
    "FENCE_LIMIT",
    "GroupProgress",
    "Placed",
    "RedisClient",
    "RedisGateway",
    "ReservationRecord",
    "RetryPolicy",
    "SaleLog",
    "SaleRepair",
    "SaleSnapshot",
    "StreamChunk",
    "Touched",
    "load_lua",
]
