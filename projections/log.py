"""Reading the event log: the archive for what a stream no longer holds, the stream after.

The log of a partition is its Redis stream, but streams are trimmed below what the archive
(the PostgreSQL ``events`` table) holds. So a reader takes the archive, in stream order,
for the positions below the stream's first entry, then the stream from there on, and
deduplicates on ``event_id``: trimming loses nothing. The stream's first id is read in the
same step as each stream chunk, so a trim that overtakes the reader is noticed and the
positions it removed are read from the archive instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from pydantic import TypeAdapter
from redis.exceptions import RedisError

from core.errors import InfrastructureError
from core.events import CURRENT_VERSION, AnyEvent, has_nul_escape, parse_event
from core.gateway import GroupProgress, RedisGateway, StreamChunk
from projections.entries import LogEntry, parse_stream_id
from projections.tables import events

_END = (2**63 - 1, 2**63 - 1)
# Event-loop turns a new read task takes to send its request (one, with redis-py and
# asyncpg as they are; one more to spare).
_SEND_TURNS = 2

_events: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)
# The adapter's own validator: its Python wrapper costs a tenth of a parse.
_validate_json = _events.validator.validate_json


@dataclass
class LogChunk:
    """Consecutive events of one partition, in log order.

    ``last_id`` is the position read up to (unparseable entries included), to resume from.
    ``malformed`` counts the entries that are no event (bytes that are not UTF-8, or that do
    not parse): the projector parks those, and readers skip them.
    ``unarchived`` lists the entries of a stream chunk that the archive did not hold when
    read; it is filled only when the reader was asked to check.
    """

    partition: int
    entries: list[LogEntry]
    last_id: str
    source: str  # "archive" or "stream"
    malformed: int = 0
    unarchived: list[LogEntry] = field(default_factory=list)


def read_event(raw: str) -> AnyEvent:
    """``core.events.parse_event``, about twice as fast for events of the current version
    (most of a rebuild's time goes here); any other goes through the upcasting path."""
    if has_nul_escape(raw):
        return parse_event(raw)
    try:
        event: AnyEvent = _validate_json(raw)
    except ValueError:
        return parse_event(raw)
    return event if event.v == CURRENT_VERSION else parse_event(raw)


def _event_or_none(raw: str) -> AnyEvent | None:
    """:func:`read_event`, or None for anything that is no event (never raises: one bad
    entry must not stop a reader)."""
    try:
        event: AnyEvent = _validate_json(raw)
        if event.v == CURRENT_VERSION:
            return event
    except Exception:
        pass
    try:
        return parse_event(raw)
    except Exception:
        return None


async def _send() -> None:
    """Let the read tasks just made send their requests, so the servers answer while the
    caller parses: a task only starts when the caller yields to the event loop, and the
    parsing does not (without this, the rebuild waited on every chunk's round trips)."""
    for _ in range(_SEND_TURNS):
        await asyncio.sleep(0)


async def _stop(*reads: asyncio.Future[Any] | None) -> None:
    """Cancel the reads still under way and wait until they have stopped: one already sent
    unwinds its connection first, and a reader left early must leave no read running."""
    pending = [r for r in reads if r is not None and not r.done()]
    for read in pending:
        read.cancel()
    if pending:
        await asyncio.wait(pending)


async def _checked(chunk: LogChunk, archived: asyncio.Future[set[str]] | None) -> LogChunk:
    """``chunk`` with its ``unarchived`` entries, once ``archived`` (the stream ids the
    archive holds in the chunk's range) is in."""
    if archived is not None:
        if chunk.entries:
            held = await archived
            chunk.unarchived = [e for e in chunk.entries if e.stream_id not in held]
        else:
            await _stop(archived)
    return chunk


def _successor(position: tuple[int, int]) -> tuple[int, int]:
    return position[0], position[1] + 1


class LogReader:
    """Reads a partition's log from the archive and the stream (see the module docstring).

    Without a pool it reads the streams alone.
    """

    def __init__(
        self, gateway: RedisGateway, pool: asyncpg.Pool | None, chunk: int = 10_000
    ) -> None:
        self.gateway = gateway
        self.pool = pool
        self.chunk = chunk

    async def chunks(
        self,
        partition: int,
        after: str = "0-0",
        until: str | None = None,
        *,
        check_archive: bool = False,
    ) -> AsyncGenerator[LogChunk, None]:
        """Yield the partition's events after ``after`` (up to ``until``, inclusive).

        The next stream chunk, and the archive's positions of this one, are asked for (sent)
        as soon as the chunk arrives, and parsed meanwhile; when the archive is checked, a
        chunk is handed out once the next one is parsed, so its check had that long to
        come back. The reader waits on round trips only when the servers are slower than
        the parsing."""
        position = after
        upper = _successor(parse_stream_id(until)) if until else _END
        seen: set[str] = set()
        read: asyncio.Future[StreamChunk] | None = asyncio.ensure_future(
            self.gateway.read_stream_chunk(partition, position, self.chunk, until or "+")
        )
        archived: asyncio.Future[set[str]] | None = None
        # A parsed stream chunk waiting for its archive check, and that check.
        held: LogChunk | None = None
        checking: asyncio.Future[set[str]] | None = None
        try:
            while read is not None:
                head = await read
                read = archived = None
                if len(head.entries) == self.chunk:
                    last = head.entries[-1][0]
                    read = asyncio.ensure_future(
                        self.gateway.read_stream_chunk(partition, last, self.chunk, until or "+")
                    )
                if check_archive and head.entries and self.pool is not None:
                    lo, hi = head.entries[0][0], head.entries[-1][0]
                    archived = asyncio.ensure_future(self._archived(partition, lo, hi))
                await _send()
                first = parse_stream_id(head.first_id) if head.first_id else None
                if self.pool is not None and (first is None or first > parse_stream_id(position)):
                    if held is not None:
                        done, held = await _checked(held, checking), None
                        yield done
                    # The positions between ours and the stream's first entry are gone from
                    # the stream (trimmed) or never were there: the archive has them if any.
                    below = min(first, upper) if first is not None else upper
                    async for chunk in self._archive(partition, position, below, seen):
                        position = chunk.last_id
                        yield chunk
                if not head.entries:
                    break
                chunk = self._stream_chunk(partition, head, seen)
                position = chunk.last_id
                if held is not None:
                    done, held = await _checked(held, checking), None
                    yield done
                if archived is None:
                    yield chunk
                else:
                    held, checking, archived = chunk, archived, None
            if held is not None:
                done, held = await _checked(held, checking), None
                yield done
        finally:
            await _stop(read, archived, checking)

    @staticmethod
    def _stream_chunk(partition: int, head: StreamChunk, seen: set[str]) -> LogChunk:
        """The events of a stream chunk not ``seen`` yet (which it adds them to)."""
        chunk = LogChunk(partition, [], head.entries[-1][0], "stream")
        entries, undecodable = chunk.entries, head.undecodable
        malformed = 0
        for stream_id, fields in head.entries:
            event = None
            if not (undecodable and stream_id in undecodable):
                event = _event_or_none(fields.get("event", ""))
            if event is None:
                # The projector parks such entries on the dead-letter stream.
                malformed += 1
                continue
            event_id = event.event_id
            if event_id not in seen:
                seen.add(event_id)
                entries.append(LogEntry(partition, stream_id, event))
        chunk.malformed = malformed
        return chunk

    async def _archive(
        self, partition: int, after: str, below: tuple[int, int], seen: set[str]
    ) -> AsyncIterator[LogChunk]:
        """Archived events of a partition with positions in (``after``, ``below``); the
        next page is asked for while this one is parsed."""
        read: asyncio.Future[list[asyncpg.Record]] | None = asyncio.ensure_future(
            self._archive_page(partition, parse_stream_id(after), below)
        )
        try:
            while read is not None:
                rows = await read
                read = None
                if not rows:
                    return
                if len(rows) == self.chunk:
                    start = parse_stream_id(rows[-1]["stream_id"])
                    read = asyncio.ensure_future(self._archive_page(partition, start, below))
                    await _send()
                chunk = LogChunk(partition, [], rows[-1]["stream_id"], "archive")
                entries, malformed = chunk.entries, 0
                for row in rows:
                    event = _event_or_none(row["payload"])
                    if event is None:
                        malformed += 1
                        continue
                    event_id = event.event_id
                    if event_id not in seen:
                        seen.add(event_id)
                        entries.append(LogEntry(partition, row["stream_id"], event))
                chunk.malformed = malformed
                yield chunk
        finally:
            await _stop(read)

    async def _archive_page(
        self, partition: int, after: tuple[int, int], below: tuple[int, int]
    ) -> list[asyncpg.Record]:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            return await events.read_range(conn, partition, after, below, self.chunk)

    async def _archived(self, partition: int, first: str, last: str) -> set[str]:
        """The stream ids in [``first``, ``last``] that the archive holds: an entry is
        archived when its position is, as the archive records each event at the stream
        position it was read from."""
        assert self.pool is not None
        lo, hi = parse_stream_id(first), parse_stream_id(last)
        async with self.pool.acquire() as conn:
            held = await events.archived_positions(conn, partition, lo, hi)
        return {f"{ms}-{seq}" for ms, seq in held}  # as Redis spells ids

    async def estimate(self, partition: int) -> int:
        """About how many entries a whole read of the partition will yield (for progress)."""
        head = await self.gateway.read_stream_chunk(partition, "0-0", 1)
        try:
            total = int(
                await self.gateway.client.xlen(self.gateway.keys_for_partition(partition).events)
            )
        except RedisError as e:
            raise InfrastructureError(f"redis read failed: {e}") from e
        if self.pool is not None:
            below = parse_stream_id(head.first_id) if head.first_id else _END
            async with self.pool.acquire() as conn:
                total += await events.count_below(conn, partition, below)
        return total


@dataclass
class WholeLog:
    """Every partition's log as read once: its events and the position read up to."""

    entries: dict[int, list[LogEntry]]
    positions: dict[int, str]
    malformed: int = 0

    def by_sale(self) -> dict[str, list[LogEntry]]:
        """The events of each sale, in log order."""
        found: dict[str, list[LogEntry]] = {}
        for entries in self.entries.values():
            for entry in entries:
                found.setdefault(entry.event.sale_id, []).append(entry)
        return found


async def read_whole_log(reader: LogReader, partitions: int) -> WholeLog:
    """Read every partition's log from its beginning."""
    whole = WholeLog(entries={}, positions={})
    for partition in range(partitions):
        entries = whole.entries.setdefault(partition, [])
        whole.positions[partition] = "0-0"
        async for chunk in reader.chunks(partition):
            entries.extend(chunk.entries)
            whole.malformed += chunk.malformed
            whole.positions[partition] = chunk.last_id
    return whole


async def read_sale_tail(
    reader: LogReader, sale_id: str, partition: int, after: str, until: str
) -> list[LogEntry]:
    """A sale's events in the partition's log after ``after``, up to ``until`` inclusive."""
    tail: list[LogEntry] = []
    if parse_stream_id(until) <= parse_stream_id(after):
        return tail
    async for chunk in reader.chunks(partition, after, until):
        tail += [e for e in chunk.entries if e.event.sale_id == sale_id]
    return tail


def acknowledged(entry: LogEntry, progress: dict[int, GroupProgress]) -> bool:
    """Whether the projector group has delivered ``entry`` and no longer has it pending.

    An entry the archive lacks is lag while this is false (the projector will still
    archive it) and lost once it is true: it will never be delivered again. Verify and
    rebuild both decide on this rule.
    """
    group = progress.get(entry.partition)
    return (
        group is not None
        and entry.position <= parse_stream_id(group.last_delivered)
        and entry.stream_id not in group.pending
    )
