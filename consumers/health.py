"""Consumer health read from Redis: lag and pending entries per group and partition, the
age of the oldest unacknowledged entry, and the dead-letter count.

Shown by ``flashsale status`` and exported on the API's ``/metrics``, where
:class:`CachedHealth` reads it at most once per interval, however many scrapes arrive.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog
from redis.exceptions import RedisError, ResponseError

from core.gateway.clients import RedisClient
from core.keys import PartitionKeys, dead_letter_stream
from projections.entries import parse_stream_id

log = structlog.get_logger(__name__)

_LAG_COUNT_CHUNK = 10_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class GroupHealth:
    """One consumer group on one partition stream.

    ``undelivered``: entries not delivered to any consumer of the group yet; ``pending``:
    delivered, not acknowledged; ``lag``: their sum, what the group still owes;
    ``oldest_pending_seconds``: how long ago the oldest pending entry was appended.
    """

    group: str
    partition: int
    consumers: int
    undelivered: int
    pending: int
    oldest_pending_seconds: float | None

    @property
    def lag(self) -> int:
        """Entries the group has not acknowledged yet."""
        return self.undelivered + self.pending


@dataclass(frozen=True, slots=True)
class Health:
    """Every group on every partition, stream lengths, and the dead-letter count."""

    groups: list[GroupHealth] = field(default_factory=list)
    stream_lengths: dict[int, int] = field(default_factory=dict)
    dead_letters: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``flashsale status --json``)."""
        return {
            "dead_letters": self.dead_letters,
            "streams": {str(p): n for p, n in sorted(self.stream_lengths.items())},
            "groups": [asdict(g) | {"lag": g.lag} for g in self.groups],
            "lag": sum(g.lag for g in self.groups),
            "pending": sum(g.pending for g in self.groups),
        }

    def to_json(self) -> str:
        """Indented JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2)

    def to_table(self) -> str:
        """A table for people, one row per group and partition."""
        rows = [("group", "partition", "stream", "lag", "undelivered", "pending", "oldest pending")]
        for g in self.groups:
            oldest = "-" if g.oldest_pending_seconds is None else f"{g.oldest_pending_seconds:.1f}s"
            rows.append(
                (
                    g.group,
                    str(g.partition),
                    str(self.stream_lengths.get(g.partition, 0)),
                    str(g.lag),
                    str(g.undelivered),
                    str(g.pending),
                    oldest,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        if len(rows) == 1:
            lines.append("(no consumer groups yet)")
        lag = sum(g.lag for g in self.groups)
        lines.append(f"total lag: {lag}  dead letters: {self.dead_letters}")
        return "\n".join(lines)


async def _undelivered(client: RedisClient, stream: str, info: dict[str, Any], length: int) -> int:
    """XINFO GROUPS ``lag``, or, where Redis cannot tell (older servers, deleted entries),
    the entries after the group's last delivered id, counted."""
    lag = info.get("lag")
    if lag is not None:
        return int(lag)
    last = _text(info["last-delivered-id"])
    if last == "0-0":
        return length
    counted = 0
    start = f"({last}"
    while True:
        chunk = await client.xrange(stream, start, "+", count=_LAG_COUNT_CHUNK) or []
        counted += len(chunk)
        if len(chunk) < _LAG_COUNT_CHUNK:
            return counted
        start = f"({_text(chunk[-1][0] or '')}"


async def read_health(client: RedisClient, partitions: int) -> Health:
    """Read consumer health from Redis (a few commands per partition)."""
    now_s, now_us = await client.time()
    now_ms = now_s * 1000 + now_us // 1000
    groups: list[GroupHealth] = []
    lengths: dict[int, int] = {}
    for partition in range(partitions):
        stream = PartitionKeys(partition, partitions).events
        lengths[partition] = int(await client.xlen(stream))
        try:
            infos = await client.xinfo_groups(stream)
        except ResponseError:
            continue  # no stream yet
        for info in infos:
            name = _text(info["name"])
            oldest: float | None = None
            if int(info["pending"]):
                summary = await client.xpending(stream, name)
                if summary["min"] is not None:
                    appended_ms = parse_stream_id(_text(summary["min"]))[0]
                    oldest = max(0.0, (now_ms - appended_ms) / 1000)
            groups.append(
                GroupHealth(
                    group=name,
                    partition=partition,
                    consumers=int(info["consumers"]),
                    undelivered=await _undelivered(client, stream, info, lengths[partition]),
                    pending=int(info["pending"]),
                    oldest_pending_seconds=oldest,
                )
            )
    dead_letters = int(await client.xlen(dead_letter_stream()))
    return Health(groups=groups, stream_lengths=lengths, dead_letters=dead_letters)


class CachedHealth:
    """Consumer health read at most once per ``interval`` seconds, shared by all callers.

    Concurrent callers wait for the one read in progress instead of starting their own. A
    failed read (Redis unreachable) is remembered as ``None`` for the interval too, so a
    flood of scrapes cannot turn into a flood of connection attempts. Give it a client of
    its own, so that scrapes never take connections from the purchase path.
    """

    def __init__(self, client: RedisClient, partitions: int, interval: float) -> None:
        self.client = client
        self.partitions = partitions
        self.interval = interval
        self.reads = 0
        self._lock = asyncio.Lock()
        self._read_at: float | None = None
        self._health: Health | None = None

    def _fresh(self) -> bool:
        return self._read_at is not None and time.monotonic() - self._read_at < self.interval

    async def get(self) -> Health | None:
        """The last health read, refreshed first when older than the interval."""
        if self._fresh():
            return self._health
        async with self._lock:
            if self._fresh():  # another caller read it while this one waited
                return self._health
            self.reads += 1
            try:
                self._health = await read_health(self.client, self.partitions)
            except (RedisError, OSError) as e:
                log.warning("consumer_health_unavailable", error=str(e))
                self._health = None
            self._read_at = time.monotonic()
            return self._health
