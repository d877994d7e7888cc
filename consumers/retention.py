"""Stream retention: trim each partition stream below what no one can need from Redis.

The archive in PostgreSQL (the ``events`` table) keeps every event, and replay reads the
archive for positions below a stream's first entry, so a stream only has to keep its tail.
An entry may go once

- every consumer group of the stream has acknowledged it: it is below the group's lowest
  pending entry and at or below its last delivered id; and
- the archive holds it (same position, same ``event_id``) or it cannot be decoded or
  parsed at all (such an entry is no event; its bytes are kept on the dead-letter stream).

Each partition is trimmed with ``XTRIM MINID`` up to the first entry that fails either test,
one checked chunk (1,000 entries) per XTRIM so that a long backlog never holds Redis for
long, and never with a blind MAXLEN. The newest entry always stays, so the stream's last position
(which replay reads atomically with a sale's state) is never lost. A stream with no
consumer group is left alone.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
import structlog
from redis.exceptions import ResponseError

from consumers.entries import decode_fields, text
from consumers.faults import is_transient
from consumers.periodic import run_periodically
from core.events import parse_event
from core.gateway.clients import RedisClient
from core.keys import PartitionKeys
from projections.entries import parse_stream_id
from projections.tables import events

log = structlog.get_logger(__name__)

Position = tuple[int, int]

_CHUNK = 1000


def _id(position: Position) -> str:
    return f"{position[0]}-{position[1]}"


@dataclass(frozen=True, slots=True)
class TrimResult:
    """What retention did to one partition stream.

    ``kept_from`` is the MINID used (every entry below it is gone), or None when nothing
    could be trimmed; ``stopped_by`` says what bounded it: ``"consumers"`` (an entry not
    yet acknowledged by every group, or the end of what they acknowledged), ``"archive"``
    (an acknowledged entry the archive does not hold yet, say one on the dead-letter
    stream) or ``"no groups"``.
    """

    partition: int
    trimmed: int
    kept_from: str | None
    stopped_by: str
    malformed: int = 0  # entries walked that were no event (not UTF-8, or not parseable)


def _event_id(raw: dict[bytes | str, bytes | str]) -> str | None:
    """The ``event_id`` of an entry, or None when the entry is no event."""
    fields, undecodable = decode_fields(raw)
    if undecodable:
        return None
    try:
        return parse_event(fields.get("event", "")).event_id
    except Exception:
        return None


async def acknowledged_below(client: RedisClient, stream: str) -> Position | None:
    """The position below which every group of ``stream`` acknowledged every entry.

    None when the stream has no group (or does not exist): then nobody has read anything.
    """
    try:
        groups = await client.xinfo_groups(stream)
    except ResponseError:
        return None  # no such stream
    if not groups:
        return None
    bound: Position | None = None
    for group in groups:
        last = parse_stream_id(text(group["last-delivered-id"]))
        group_bound = (last[0], last[1] + 1)  # everything delivered, nothing pending ...
        if int(group["pending"]):
            summary = await client.xpending(stream, text(group["name"]))
            if summary["min"] is not None:  # ... or up to the lowest pending entry
                group_bound = min(group_bound, parse_stream_id(text(summary["min"])))
        bound = group_bound if bound is None else min(bound, group_bound)
    return bound


async def _trim_below(client: RedisClient, stream: str, minid: Position) -> int:
    return int(await client.xtrim(stream, minid=_id(minid), approximate=False))


async def trim_partition(
    client: RedisClient,
    pool: asyncpg.Pool,
    partition: int,
    partitions: int,
    chunk: int = _CHUNK,
) -> TrimResult:
    """Trim the stream of partition ``partition`` (of ``partitions``) as far as the rules
    above allow."""
    stream = PartitionKeys(partition, partitions).events
    bound = await acknowledged_below(client, stream)
    if bound is None:
        return TrimResult(partition, 0, None, "no groups")
    newest = await client.xrevrange(stream, "+", "-", count=1)
    if newest:
        bound = min(bound, parse_stream_id(text(newest[0][0] or "")))
    keep_from: Position | None = None
    stopped_by = "consumers"
    malformed = trimmed = 0
    start = "-"
    while keep_from is None:
        entries = await client.xrange(stream, start, f"({_id(bound)}", count=chunk) or []
        if not entries:
            break
        ids = [text(entry_id or "") for entry_id, _ in entries]
        first, last = parse_stream_id(ids[0]), parse_stream_id(ids[-1])
        async with pool.acquire() as conn:
            archived = await events.event_ids_at(conn, partition, first, last)
        for entry_id, (_, raw) in zip(ids, entries, strict=True):
            event_id = _event_id(raw or {})
            if event_id is None:
                # Not an event: the projector parked it and the group acknowledged it.
                malformed += 1
                log.warning("retention_skipped_malformed", partition=partition, stream_id=entry_id)
                continue
            if archived.get(entry_id) != event_id:
                keep_from = parse_stream_id(entry_id)
                stopped_by = "archive"
                break
        if len(entries) < chunk:
            break
        if keep_from is None:
            # The whole chunk may go: trim it now, so that no XTRIM removes more than one
            # chunk and holds Redis for long after a big backlog.
            trimmed += await _trim_below(client, stream, (last[0], last[1] + 1))
        start = f"({ids[-1]}"
    minid = keep_from or bound
    if minid <= (0, 1):  # no group has had anything delivered yet
        return TrimResult(partition, trimmed, None, stopped_by, malformed)
    trimmed += await _trim_below(client, stream, minid)
    if trimmed:
        log.info("stream_trimmed", partition=partition, trimmed=trimmed, kept_from=_id(minid))
    return TrimResult(partition, trimmed, _id(minid), stopped_by, malformed)


async def trim_streams(
    client: RedisClient, pool: asyncpg.Pool, partitions: int
) -> list[TrimResult]:
    """Trim every partition stream; see the module docstring for what may go."""
    return [await trim_partition(client, pool, p, partitions) for p in range(partitions)]


class RetentionWorker:
    """Runs :func:`trim_streams` every ``interval`` seconds, the first time one interval in."""

    def __init__(
        self, client: RedisClient, pool: asyncpg.Pool, partitions: int, interval: float
    ) -> None:
        self.client = client
        self.pool = pool
        self.partitions = partitions
        self.interval = interval
        self.trimmed = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Trim until ``stop`` is set; a failed round is logged and the next one tries again."""
        log.info("retention_started", interval=self.interval)
        await run_periodically("retention", self.trim_once, stop, self.interval, retry=is_transient)
        log.info("retention_stopped", trimmed=self.trimmed)

    async def trim_once(self) -> None:
        """One round over every partition."""
        results = await trim_streams(self.client, self.pool, self.partitions)
        self.trimmed += sum(r.trimmed for r in results)
