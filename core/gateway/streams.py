"""Stream and consumer-group reads: a partition's events in order, a chunk with the
stream's first id (to notice trimming), and how far a consumer group got."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from core.errors import InfrastructureError
from core.gateway.clients import RedisClient
from core.gateway.decode import entry_fields, stream_entries, text
from core.gateway.scripts import GatewayBase

# Pending ids read per XPENDING command by ``group_progress``.
PENDING_CHUNK = 500


@dataclass(frozen=True, slots=True)
class GroupProgress:
    """How far a consumer group got on one partition stream."""

    last_delivered: str
    pending: frozenset[str]


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """Entries of a partition stream after a position, read in one step with the id of the
    stream's first entry (None when the stream is empty or missing)."""

    first_id: str | None
    entries: list[tuple[str, dict[str, str]]]
    # Ids of the entries whose bytes are not UTF-8 (their fields show them as \xff escapes):
    # no events, the projector parks them.
    undecodable: frozenset[str] = frozenset()


def _as_sent(response: Any, **options: Any) -> Any:
    return response


class StreamReads(GatewayBase):
    """Reads of the partition streams and their consumer groups."""

    _unparsed: aioredis.Redis | None = None

    def _unparsed_xrange(self) -> RedisClient:
        """A client on the gateway's connections whose XRANGE replies stay as Redis sends
        them, for ``stream_entries``: redis-py pairing every entry into a dict of bytes,
        then decoding each item, took twice as long. A cluster client is used as it is."""
        if isinstance(self.client, RedisCluster):
            return self.client
        if self._unparsed is None:
            self._unparsed = aioredis.Redis(connection_pool=self.client.connection_pool)
            self._unparsed.set_response_callback("XRANGE", _as_sent)
        return self._unparsed

    async def read_stream(
        self, partition: int, after: str = "0-0", until: str = "+", chunk: int = 10_000
    ) -> AsyncIterator[tuple[str, dict[str, str]]]:
        """Yield ``(stream_id, fields)`` of a partition's stream after ``after``, in order
        (bytes that are not UTF-8 come out as ``\\xff`` escapes)."""
        stream = self.keys_for_partition(partition).events
        start = f"({after}"
        while True:
            try:
                batch = await self.client.xrange(stream, min=start, max=until, count=chunk)
            except RedisError as e:
                raise InfrastructureError(f"redis read failed: {e}") from e
            batch = batch or []
            for entry_id, fields in batch:
                if entry_id is not None and fields is not None:
                    yield text(entry_id), entry_fields(fields)[0]
            if len(batch) < chunk:
                return
            start = f"({text(batch[-1][0] or '')}"

    async def read_stream_chunk(
        self, partition: int, after: str, count: int, until: str = "+"
    ) -> StreamChunk:
        """Up to ``count`` entries of a partition's stream after ``after`` (up to ``until``),
        and the stream's first id, read atomically (MULTI), so a trim that happens while a
        reader walks the stream shows up as a first id above the reader's position. Entries
        whose bytes are not UTF-8 are listed in ``undecodable``."""
        stream = self.keys_for_partition(partition).events
        try:
            async with self._unparsed_xrange().pipeline(transaction=True) as pipe:
                pipe.xrange(stream, min="-", max="+", count=1)
                pipe.xrange(stream, min=f"({after}", max=until, count=count)
                first, batch = await pipe.execute()
        except RedisError as e:
            raise InfrastructureError(f"redis read failed: {e}") from e
        if isinstance(self.client, RedisCluster):  # its replies came paired into dicts
            batch = [
                (i, None if f is None else [x for kv in f.items() for x in kv])
                for i, f in batch or ()
            ]
        entries, undecodable = stream_entries(batch)
        return StreamChunk(
            first_id=text(first[0][0]) if first else None,
            entries=entries,
            undecodable=frozenset(undecodable),
        )

    async def group_progress(
        self, group: str, chunk: int = PENDING_CHUNK
    ) -> dict[int, GroupProgress]:
        """Last delivered id and pending ids of ``group`` on each partition that has it.

        The pending ids are read ``chunk`` at a time (XPENDING by range), so a large
        backlog never makes one long command. The last delivered id is read first: an id
        acknowledged while the chunks are read is then simply not pending, and one
        delivered meanwhile is past the last delivered id read.
        """
        progress: dict[int, GroupProgress] = {}
        for partition in range(self.partitions):
            stream = self.keys_for_partition(partition).events
            try:
                groups = await self.client.xinfo_groups(stream)
                info = next((g for g in groups if text(g["name"]) == group), None)
                if info is None:
                    continue
                pending: set[str] = set()
                start = "-"
                while True:
                    batch = await self.client.xpending_range(
                        stream, group, min=start, max="+", count=chunk
                    )
                    pending.update(text(p["message_id"]) for p in batch)
                    if len(batch) < chunk:
                        break
                    start = f"({text(batch[-1]['message_id'])}"
            except ResponseError:
                continue  # no such stream yet
            except RedisError as e:
                raise InfrastructureError(f"redis read failed: {e}") from e
            progress[partition] = GroupProgress(
                last_delivered=text(info["last-delivered-id"]), pending=frozenset(pending)
            )
        return progress
