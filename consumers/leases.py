"""Partition leases: which consumer of a group reads which partition stream.

Several projector processes share the partitions by owning them, each partition by one
consumer at a time, so that each reads its partitions' entries in stream order and no two
write the same sale's rows at once. A lease is a Redis string per partition and group
(value the holder's name, with a time to live), taken when free or already the caller's
(``lease_take.lua``: a consumer restarted under its name takes its own back at once) and
renewed by its holder every third of its time to live (compare and extend,
``lease_renew.lua``). A consumer announces itself in the group's member set (scored by when
it expires), counts the live members, gives back the leases beyond its fair share
(``ceil(partitions / members)``, compare and delete, ``lease_release.lua``) and takes free
ones up to it. On stop it gives back everything. Between refreshes it watches the member
count (:meth:`PartitionLeases.unsettled`, one ZCARD): a consumer that joins or leaves makes
every member refresh at once, not a third of a lease later (and one short of its share
takes a partition as soon as it is given back), so that the partitions are
shared fairly as soon as both run (a lease of 5 s once let the first of two consumers
starting together hold every partition for 1.7 s).

A consumer that dies stops renewing: its leases expire after ``lease_ms`` and the others
take its partitions, and with them (XAUTOCLAIM on the streams they own) the entries it left
pending. Correctness never rests on the leases alone: a consumer that stalled past its lease
may still commit a batch of a partition someone else now reads, and that is safe because
the projection dedupes on ``event_id`` and is order-tolerant (:mod:`projections.batch`).
"""

from __future__ import annotations

import zlib
from typing import Any

import structlog
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from core.gateway.clients import RedisClient
from core.gateway.scripts import load_lua
from core.keys import PartitionKeys, consumer_members

log = structlog.get_logger(__name__)


class PartitionLeases:
    """The partitions one consumer of ``group`` owns, kept up to date by :meth:`refresh`."""

    def __init__(
        self, client: RedisClient, partitions: int, group: str, consumer: str, lease_ms: int
    ) -> None:
        self.client = client
        self.partitions = partitions
        self.group = group
        self.consumer = consumer
        self.lease_ms = lease_ms
        self.owned: set[int] = set()
        self.live = 0  # members alive at the last refresh
        self.members = consumer_members(group)
        self._renew: AsyncScript = client.register_script(load_lua("lease_renew"))
        self._release: AsyncScript = client.register_script(load_lua("lease_release"))
        self._take: AsyncScript = client.register_script(load_lua("lease_take"))
        # Where this consumer starts looking for free partitions: spread by its name, so
        # that consumers starting together do not all race for partition 0 first.
        self._start = zlib.crc32(consumer.encode()) % partitions

    @property
    def every(self) -> float:
        """Seconds between refreshes: a third of the lease, so two can fail before it ends."""
        return self.lease_ms / 3000

    @property
    def watch_every(self) -> float:
        """Seconds between looks at the member count (:meth:`unsettled`): a tenth of
        :attr:`every`, within 0.05 s .. 0.25 s."""
        return min(0.25, max(0.05, self.every / 10))

    @property
    def share(self) -> int:
        """This consumer's fair share of the partitions, as of the last refresh."""
        return -(-self.partitions // max(self.live, 1))

    def _key(self, partition: int) -> str:
        return PartitionKeys(partition, self.partitions).lease(self.group)

    async def unsettled(self) -> bool:
        """Whether to refresh before :attr:`every` is up: members joined or left since the
        last refresh, or this consumer holds less than its share and a partition is free
        (another gives back what is beyond its share on its own refresh). One round trip."""
        lacking = len(self.owned) < self.share
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(self.members)
            if lacking:
                for p in range(self.partitions):  # one GET per slot, not an MGET across them
                    pipe.exists(self._key(p))
            replies: list[Any] = await pipe.execute()
        return int(replies[0]) != self.live or (lacking and 0 in replies[1:])

    async def refresh(self) -> set[int]:
        """Announce this consumer, renew its leases, give back those beyond its fair share
        and take free ones up to it; return the partitions it owns now."""
        seconds, micros = await self.client.time()
        now = seconds * 1000 + micros // 1000
        held = sorted(self.owned)
        on_cluster = isinstance(self.client, RedisCluster)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zadd(self.members, {self.consumer: now + self.lease_ms})
            pipe.zremrangebyscore(self.members, "-inf", f"({now}")
            pipe.zcard(self.members)
            if isinstance(pipe, Pipeline):  # one server: the renewals ride along
                for p in held:
                    await self._renew(
                        keys=[self._key(p)], args=[self.consumer, self.lease_ms], client=pipe
                    )
            replies: list[Any] = await pipe.execute()
        live, renewed = int(replies[2]), replies[3:]
        if on_cluster:
            # Each lease lives in its partition's slot, so on its own node: one call each,
            # which also loads the script on a node that lacks it (a pipeline would fail).
            renewed = [
                await self._renew(keys=[self._key(p)], args=[self.consumer, self.lease_ms])
                for p in held
            ]
        lost = {p for p, ok in zip(held, renewed, strict=True) if not ok}
        owned = set(held) - lost
        self.live = live
        share = self.share
        extra = sorted(owned)[share:]
        for p in extra:
            await self._release(keys=[self._key(p)], args=[self.consumer])
        owned -= set(extra)
        taken: list[int] = []
        for step in range(self.partitions):
            if len(owned) >= share:
                break
            p = (self._start + step) % self.partitions
            if p not in owned and await self._take(
                keys=[self._key(p)], args=[self.consumer, self.lease_ms]
            ):
                owned.add(p)
                taken.append(p)
        if lost or extra or taken:
            log.info(
                "partitions_rebalanced",
                consumer=self.consumer,
                members=live,
                owned=sorted(owned),
                taken=taken,
                released=extra,
                lost=sorted(lost),
            )
        self.owned = owned
        return owned

    async def release_all(self) -> None:
        """Give back every lease and leave the member set (on stop)."""
        for p in sorted(self.owned):
            await self._release(keys=[self._key(p)], args=[self.consumer])
        await self.client.zrem(self.members, self.consumer)
        log.info("partitions_released", consumer=self.consumer, released=sorted(self.owned))
        self.owned = set()
