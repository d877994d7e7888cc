"""The dead-letter stream: entries a consumer gave up on, kept with why, until re-driven.

An entry is parked when it can never be projected as it is (it does not parse, PostgreSQL
refuses its data) or when it failed ``max_deliveries`` times. The parked copy holds the
original fields (``field:<name>``), the stream and position it came from, the group, the
consumer, the error and the delivery count. The original stays in its stream, so the log
is untouched; the entry is acknowledged so the group moves on.

Re-driving (:func:`retry_parked`) projects the parked event straight into PostgreSQL at its
original position, the same way the projector would, and deletes the parked copy only
after that commit. Appending it to its stream again would put the event in the log twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import structlog
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from consumers.entries import decode_fields, readable, text, to_bytes
from consumers.faults import ReplicasBehind, describe, is_transient
from consumers.replicas import ReplicaCheck
from core.events import parse_event
from core.gateway.clients import RedisClient
from core.keys import PartitionKeys, dead_letter_stream
from projections.batch import project
from projections.entries import LogEntry, parse_stream_id

log = structlog.get_logger(__name__)

FIELD_PREFIX = "field:"


RawEntries = list[tuple[bytes | str | None, dict[bytes | str, bytes | str] | None]] | None


def _parse_all(entries: RawEntries) -> list[ParkedEntry]:
    return [
        parse_parked(entry_id, raw)
        for entry_id, raw in entries or []
        if entry_id is not None and raw is not None
    ]


@dataclass(frozen=True, slots=True)
class ParkedEntry:
    """One entry of the dead-letter stream.

    ``undecodable`` is true when the original entry's bytes are not UTF-8 (they are kept as
    they were; ``fields`` shows them with ``\\xff`` escapes): such an entry can only be
    dropped.
    """

    id: str
    stream: str
    stream_id: str
    group: str
    consumer: str
    error: str
    deliveries: int
    fields: dict[str, str]
    undecodable: bool = False

    @property
    def parked_at(self) -> datetime:
        """When it was parked (the time part of its dead-letter id)."""
        return datetime.fromtimestamp(parse_stream_id(self.id)[0] / 1000, tz=UTC)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as ``flashsale dlq list --json`` prints it."""
        return asdict(self) | {"parked_at": self.parked_at.isoformat()}


def parked_record(
    *,
    stream: str,
    stream_id: str,
    group: str,
    consumer: str,
    error: str,
    deliveries: int,
    fields: Mapping[str, str],
) -> dict[str, str]:
    """The fields of a dead-letter entry."""
    return {
        "stream": stream,
        "stream_id": stream_id,
        "group": group,
        "consumer": consumer,
        "error": error,
        "deliveries": str(deliveries),
        **{f"{FIELD_PREFIX}{k}": v for k, v in fields.items()},
    }


def parse_parked(entry_id: bytes | str, raw: Mapping[bytes | str, bytes | str]) -> ParkedEntry:
    """A dead-letter entry read back (tolerates entries parked by older versions, and bytes
    that are not UTF-8)."""
    fields, undecodable = decode_fields(raw)
    if undecodable:
        fields = {readable(k): readable(v) for k, v in fields.items()}
    deliveries = fields.get("deliveries", "")
    return ParkedEntry(
        id=text(entry_id),
        stream=fields.get("stream", ""),
        stream_id=fields.get("stream_id", ""),
        group=fields.get("group", ""),
        consumer=fields.get("consumer", ""),
        error=fields.get("error", ""),
        deliveries=int(deliveries) if deliveries.isdigit() else 0,
        fields={
            k.removeprefix(FIELD_PREFIX): v for k, v in fields.items() if k.startswith(FIELD_PREFIX)
        },
        undecodable=undecodable is not None,
    )


async def park(client: RedisClient, record: Mapping[str, str]) -> str:
    """Append a record made by :func:`parked_record`; return its dead-letter id.

    Fields read from bytes that are not UTF-8 are written back as those bytes.
    """
    fields: dict[FieldT, EncodableT] = {to_bytes(k): to_bytes(v) for k, v in record.items()}
    parked_id = text(await client.xadd(dead_letter_stream(), fields))
    log.warning(
        "event_dead_lettered",
        parked_id=parked_id,
        stream_id=record.get("stream_id"),
        deliveries=record.get("deliveries"),
        error=readable(record.get("error", "")),
    )
    return parked_id


async def list_parked(client: RedisClient, ids: Sequence[str] = ()) -> list[ParkedEntry]:
    """Every parked entry, oldest first, or only those with the given dead-letter ids."""
    if ids:
        found: list[ParkedEntry] = []
        for parked_id in dict.fromkeys(ids):
            try:
                chunk = await client.xrange(dead_letter_stream(), parked_id, parked_id)
            except ResponseError:  # not a stream id at all: nothing parked under it
                continue
            found += _parse_all(chunk)
        return found
    parked: list[ParkedEntry] = []
    start = "-"
    while True:
        chunk = await client.xrange(dead_letter_stream(), start, "+", count=1000) or []
        parked += _parse_all(chunk)
        if len(chunk) < 1000:
            return parked
        start = f"({text(chunk[-1][0] or '')}"


async def count_parked(client: RedisClient) -> int:
    """How many entries wait on the dead-letter stream."""
    return int(await client.xlen(dead_letter_stream()))


RetryResult = Literal["projected", "already_projected", "failed", "not_found"]


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    """What re-driving one parked entry did."""

    parked_id: str
    stream_id: str
    result: RetryResult
    detail: str = ""


async def _redrive(
    client: RedisClient,
    pool: asyncpg.Pool,
    partitions: int,
    entry: ParkedEntry,
    replicas: ReplicaCheck | None,
) -> RetryOutcome:
    streams = {PartitionKeys(p, partitions).events: p for p in range(partitions)}
    partition = streams.get(entry.stream)
    if partition is None:
        return RetryOutcome(
            entry.id, entry.stream_id, "failed", f"{entry.stream!r} is not a partition stream"
        )
    if entry.undecodable:
        detail = "its bytes are not UTF-8, so it is no event: drop it (flashsale dlq drop)"
        return RetryOutcome(entry.id, entry.stream_id, "failed", detail)
    try:
        event = parse_event(entry.fields.get("event", ""))
        parse_stream_id(entry.stream_id)
    except ValueError as e:
        return RetryOutcome(entry.id, entry.stream_id, "failed", describe(e))
    if replicas is not None:
        try:  # as the projector: nothing reaches PostgreSQL that the replicas may lack
            await replicas.wait_for([partition])
        except ReplicasBehind as e:
            return RetryOutcome(entry.id, entry.stream_id, "failed", describe(e))
    try:
        async with pool.acquire() as conn:
            new = await project(conn, entry.group, [LogEntry(partition, entry.stream_id, event)])
    except Exception as e:
        if is_transient(e):
            raise
        return RetryOutcome(entry.id, entry.stream_id, "failed", describe(e))
    # Only now, with the event committed to PostgreSQL, may the parked copy go.
    await client.xdel(dead_letter_stream(), entry.id)
    result: RetryResult = "projected" if new else "already_projected"
    log.info("dead_letter_redriven", parked_id=entry.id, stream_id=entry.stream_id, result=result)
    return RetryOutcome(entry.id, entry.stream_id, result)


async def retry_parked(
    client: RedisClient,
    pool: asyncpg.Pool,
    partitions: int,
    ids: Sequence[str] = (),
    replicas: ReplicaCheck | None = None,
) -> list[RetryOutcome]:
    """Re-drive parked entries (every one, or those with the given dead-letter ids).

    Each is projected into PostgreSQL at its original stream position and removed from the
    dead-letter stream once committed; one that fails again stays parked and is reported
    ``failed`` with the error. Transient failures (PostgreSQL down) raise and change
    nothing that was not committed. With ``replicas`` (under ``FLASHSALE_WAIT_REPLICAS``),
    an entry whose partition the replicas are behind on stays parked, ``failed`` with
    :class:`ReplicasBehind`.
    """
    parked = await list_parked(client, ids)
    outcomes = [await _redrive(client, pool, partitions, entry, replicas) for entry in parked]
    found = {entry.id for entry in parked}
    outcomes += [RetryOutcome(i, "", "not_found") for i in dict.fromkeys(ids) if i not in found]
    return outcomes


async def drop_parked(client: RedisClient, ids: Sequence[str]) -> int:
    """Delete parked entries for good (say, bytes that will never parse); return how many."""
    if not ids:
        return 0
    dropped = int(await client.xdel(dead_letter_stream(), *ids))
    log.warning("dead_letters_dropped", ids=list(ids), dropped=dropped)
    return dropped
