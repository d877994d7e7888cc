"""The projector's replication check: under ``FLASHSALE_WAIT_REPLICAS``, an entry is written
to PostgreSQL only once that many replicas hold it.

A write the replicas never received is lost when one of them is promoted: the API answers
such a placement 503 ``not_replicated``, and the projector must not archive it either, or
PostgreSQL would keep an order (and stock held) that the new primary, and so the log, never
had. Replication is one ordered stream per primary, so a replica that acknowledged a write
made after an entry holds that entry: before each batch the projector writes a partition's
mark on each primary its entries came from, then WAITs on that connection, one pipeline per
node (:class:`core.gateway.scripts.PartitionMarks`).
"""

from __future__ import annotations

from collections.abc import Iterable

from consumers.faults import ReplicasBehind
from core.gateway.clients import RedisClient
from core.gateway.pipelining import ScriptPipeline
from core.gateway.scripts import PartitionMarks


def replica_check(
    client: RedisClient, partitions: int, wait_replicas: int, wait_timeout_ms: int
) -> ReplicaCheck | None:
    """The check for ``FLASHSALE_WAIT_REPLICAS`` (``wait_replicas``), or None when it is 0."""
    if not wait_replicas:
        return None
    return ReplicaCheck(client, partitions, wait_replicas, wait_timeout_ms)


class ReplicaCheck:
    """Checks that ``wait_replicas`` replicas hold what the primaries of some partitions
    hold, waiting up to ``wait_timeout_ms`` for them."""

    def __init__(
        self, client: RedisClient, partitions: int, wait_replicas: int, wait_timeout_ms: int
    ) -> None:
        self.wait_replicas = wait_replicas
        pipeline = ScriptPipeline(client, wait_replicas, wait_timeout_ms)
        self._marks = PartitionMarks(client, partitions, pipeline)

    async def wait_for(self, partitions: Iterable[int]) -> None:
        """Return once enough replicas hold every write made so far to ``partitions``
        (their streams' entries included); raise :class:`ReplicasBehind` when too few
        acknowledged in time."""
        acknowledged = await self._marks.acknowledged(partitions)
        if acknowledged < self.wait_replicas:
            raise ReplicasBehind(acknowledged, self.wait_replicas)
