"""The projector daemon: reads the partition streams through a consumer group and projects
them into PostgreSQL.

Delivery is at-least-once: an entry is acknowledged (XACK) only after the PostgreSQL
transaction that archived and applied it has committed, or after it was parked on the
dead-letter stream. What happens on a failure depends on whose fault it is
(:mod:`consumers.faults`):

- Redis or PostgreSQL down, restarting or refusing connections: the batch in hand is kept,
  nothing is acknowledged, and it is retried with exponential back-off until it goes
  through. Meanwhile, and while any batch is being handled however long PostgreSQL takes,
  the consumer keeps its entries' idle time low (XCLAIM JUSTID), so no other consumer
  reclaims them and counts a delivery that never failed.
- An entry that cannot be parsed, or whose data PostgreSQL refuses: parked at once.
- An entry that fails any other way: isolated from its batch (the rest is projected and
  acknowledged) and left pending, so it is reclaimed and tried again once idle for
  ``claim_idle_ms``; the try that makes ``max_deliveries`` parks it with the error.
- An entry left pending by a consumer that died or stalled is reclaimed (XAUTOCLAIM) once
  idle for ``claim_idle_ms``; an entry already delivered ``max_deliveries`` times, which
  keeps taking its consumers down, is parked instead of tried again. A consumer that comes
  back under the name it had (``FLASHSALE_CONSUMER_NAME``) first resumes the entries still
  pending on that name, at once, without waiting for them to go idle.

On stop (SIGTERM) the projector reads nothing more, finishes the batch in hand, or if that
cannot go through, releases it: marks it idle, so another consumer reclaims it at once,
and takes back the delivery it counted, since nothing failed (so restarts during an outage
never add up to ``max_deliveries``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError
from redis.typing import KeyT, StreamIdT

from consumers.deadletter import park, parked_record
from consumers.entries import decode_fields, text
from consumers.faults import REFUSED_DATA, describe, is_transient
from consumers.leases import PartitionLeases
from consumers.replicas import replica_check
from core.events import parse_stored
from core.gateway.clients import RedisClient
from core.keys import CONSUMER_GROUP, PartitionKeys
from projections.batch import Batch, prepare, project, write
from projections.entries import LogEntry

log = structlog.get_logger(__name__)

RawEntry = tuple[bytes | str, dict[bytes | str, bytes | str]]
Position = tuple[int, str]

_MAX_BACKOFF_S = 5.0

# On a cluster, how often the streams are polled for new entries while there are none: a
# blocking read can wait on one stream only, and each partition stream has its own slot.
_CLUSTER_POLL_S = 0.05

# Deliveries parsed between two looks at the other tasks, when preparing a batch read ahead
# (about a millisecond of work).
_PARSE_CHUNK = 200

# The cyclic garbage collector's first threshold while a projector runs (CPython's default
# is 700 allocations). A batch of thousands of events allocates tens of thousands of
# short-lived containers: at 700 the collector ran hundreds of times per batch, and each
# run promoted what was still in flight to the older generations, whose collections then
# walked the whole heap; that took about a quarter of the projector's CPU.
_GC_FIRST_THRESHOLD = 20_000
# How long a projector that ends waits for its lease upkeep to stop before it goes on.
_UPKEEP_STOP_S = 5.0


def _collect_less_often() -> None:
    """Raise the collector's first threshold to :data:`_GC_FIRST_THRESHOLD` (never lower)."""
    first, *older = gc.get_threshold()
    if first < _GC_FIRST_THRESHOLD:
        gc.set_threshold(_GC_FIRST_THRESHOLD, *older)


def _read(task: asyncio.Task[Prepared] | None) -> list[Delivery]:
    """What a read ahead brought, if it is done and did not fail; else nothing."""
    if task is None or not task.done() or task.cancelled() or task.exception() is not None:
        return []
    return task.result().deliveries


def default_consumer_name() -> str:
    """A name unique to this process: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(slots=True)
class Delivery:
    """A raw stream entry delivered to this consumer, and how often it was delivered.

    ``undecodable`` says why the entry's bytes are not text (then ``fields`` holds them
    decoded losslessly, to be parked as they were).

    Never changed once made, but not frozen: a frozen dataclass sets each field through
    ``object.__setattr__``, which made building one cost three times as much, for every
    entry read (about 8% of the Python work of preparing a batch).
    """

    partition: int
    stream_id: str
    fields: dict[str, str]
    deliveries: int = 1
    undecodable: str | None = None
    # The id as Redis handed it over (bytes, unless the client decodes replies), sent back
    # as it is in XACK and XCLAIM: the client encodes a str id again, a third of what
    # packing the XACK of a batch costs.
    redis_id: bytes | str | None = None

    @property
    def position(self) -> Position:
        """``(partition, stream_id)``: unique across the streams."""
        return (self.partition, self.stream_id)


@dataclass(frozen=True, slots=True)
class Prepared:
    """Deliveries made ready to handle (pure work, no I/O): the batch of those to project,
    each delivery by position, and those to park at once, each with its error."""

    deliveries: list[Delivery]
    batch: Batch
    by_position: dict[Position, Delivery]
    give_up: list[tuple[Delivery, str]]


class Projector:
    """One consumer of the ``projector`` group: reads every partition stream, or with
    ``lease_ms`` the partitions it holds leases on (:mod:`consumers.leases`), so that
    several consumers share the partitions."""

    def __init__(
        self,
        client: RedisClient,
        pool: asyncpg.Pool,
        partitions: int,
        *,
        consumer: str | None = None,
        batch: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 5_000,
        max_deliveries: int = 5,
        group: str = CONSUMER_GROUP,
        lease_ms: int = 0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.client = client
        # A cluster refuses a read over streams in different slots: there each stream is
        # read on its own (concurrently), and new entries are polled for, not blocked on.
        self.per_stream = isinstance(client, RedisCluster)
        self.pool = pool
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.streams = {PartitionKeys(p, partitions).events: p for p in range(partitions)}
        self.stream_of = list(self.streams)  # partition -> its stream's name
        self.leases = (
            PartitionLeases(client, partitions, group, self.consumer, lease_ms)
            if lease_ms
            else None
        )
        # Under ``wait_replicas``: no entry reaches PostgreSQL before that many replicas
        # hold it (:mod:`consumers.replicas`).
        self.replicas = replica_check(client, partitions, wait_replicas, wait_timeout_ms)
        self.projected = 0
        self.dead_lettered = 0
        # The last error of each entry left pending after a failure, for its parking record.
        self._failures: dict[Position, str] = {}

    @property
    def claim_every(self) -> float:
        """Seconds between reclaim passes: a quarter of the idle threshold, within
        0.05 s .. 5 s (so a dead consumer's entries wait at most 1.25 idle thresholds)."""
        return min(5.0, max(0.05, self.claim_idle_ms / 4000))

    @property
    def reading(self) -> list[str]:
        """The streams this consumer reads new entries from and reclaims on: every one,
        or those of the partitions it holds leases on."""
        if self.leases is None:
            return list(self.streams)
        return [self.stream_of[p] for p in sorted(self.leases.owned)]

    async def ensure_groups(self) -> None:
        """Create the consumer group on every stream (idempotent)."""
        for stream in self.streams:
            try:
                await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def _deliveries(
        self,
        stream: bytes | str,
        entries: Sequence[RawEntry],
        counts: dict[str, int] | None = None,
    ) -> list[Delivery]:
        partition = self.streams[text(stream)]
        deliveries: list[Delivery] = []
        append = deliveries.append
        for entry_id, fields in entries:
            if fields is None:  # a deleted entry still pending comes back as None
                continue
            stream_id = entry_id.decode() if type(entry_id) is bytes else str(entry_id)
            try:  # decode_fields' common case, inline: a call and a comprehension less
                decoded: dict[str, str] = {}
                for k, v in fields.items():
                    decoded[k.decode() if type(k) is bytes else str(k)] = (
                        v.decode() if type(v) is bytes else str(v)
                    )
                undecodable = None
            except UnicodeDecodeError:
                decoded, undecodable = decode_fields(fields)
            # Positional: a third cheaper than by keyword, for every entry read.
            append(
                Delivery(
                    partition,
                    stream_id,
                    decoded,
                    counts.get(stream_id, 1) if counts else 1,
                    undecodable,
                    entry_id,
                )
            )
        return deliveries

    async def read_new(self, block_ms: int | None = None) -> list[Delivery]:
        """XREADGROUP new entries from the streams this consumer reads (blocks up to
        ``block_ms``): whatever is there, up to ``batch`` per stream, without waiting for
        more once something is."""
        block = self.block_ms if block_ms is None else block_ms
        if self.leases is not None and block:
            # A read blocks on the streams of the partitions held when it started: one taken
            # meanwhile (another consumer gave it back) is read only once it returns. So it
            # returns as often as the leases are watched, and a partition taken is read
            # within that (an idle consumer reads a few times a second, not once).
            block = min(block, max(1, int(self.leases.watch_every * 1000)))
        reading = self.reading
        if not reading:  # no partition leased yet: wait for the next lease refresh
            await asyncio.sleep(block / 1000)
            return []
        if self.per_stream:
            return await self._poll_new(reading, block)
        reply: Any = await self.client.xreadgroup(
            self.group,
            self.consumer,
            dict.fromkeys(reading, ">"),
            count=self.batch,
            block=block or None,  # 0: do not block
        )
        deliveries: list[Delivery] = []
        for stream, entries in reply or []:
            deliveries.extend(self._deliveries(stream, entries))
        return deliveries

    async def _read_each(self, streams: dict[str, str]) -> list[tuple[str, Sequence[RawEntry]]]:
        """One XREADGROUP (without blocking) per stream, all at once: ``(stream, entries)``
        for each stream of ``streams`` (name -> id to read after)."""

        async def one(stream: str, after: str) -> tuple[str, Sequence[RawEntry]]:
            reply: Any = await self._read_one(stream, after)
            for _, entries in reply or []:
                return stream, entries
            return stream, []

        replies = await asyncio.gather(
            *(one(s, after) for s, after in streams.items()), return_exceptions=True
        )
        read = [r for r in replies if not isinstance(r, BaseException)]
        errors = [r for r in replies if isinstance(r, BaseException)]
        if errors and not any(entries for _, entries in read):
            raise errors[0]
        for error in errors:
            # What the other streams delivered is handled now; this one is read again next.
            log.warning("stream_read_failed", error=str(error), error_type=type(error).__name__)
        return read

    async def _read_one(self, stream: str, after: str) -> Any:
        """XREADGROUP on one stream of a cluster, sent straight to the node that owns its
        slot: redis-py would otherwise ask a node for the command's keys (COMMAND GETKEYS,
        twice) before every read. A MOVED reply is followed as usual: the client updates
        its slot table and sends the read to the new owner."""
        assert isinstance(self.client, RedisCluster)
        node = self.client.get_node_from_key(stream)
        if node is None:  # the client has not read the cluster's layout yet
            return await self.client.xreadgroup(
                self.group, self.consumer, {stream: after}, count=self.batch
            )
        return await self.client.execute_command(
            "XREADGROUP",
            "GROUP",
            self.group,
            self.consumer,
            "COUNT",
            self.batch,
            "STREAMS",
            stream,
            after,
            target_nodes=node,
        )

    async def _poll_new(self, reading: list[str], block: int) -> list[Delivery]:
        """:meth:`read_new` on a cluster: every stream read on its own, again every
        ``_CLUSTER_POLL_S`` until something comes or ``block`` ms have passed."""
        deadline = time.monotonic() + block / 1000
        while True:
            deliveries: list[Delivery] = []
            for stream, entries in await self._read_each(dict.fromkeys(reading, ">")):
                deliveries.extend(self._deliveries(stream, entries))
            left = deadline - time.monotonic()
            if deliveries or left <= 0:
                return deliveries
            await asyncio.sleep(min(left, _CLUSTER_POLL_S))

    async def read_own(self, after: dict[str, str]) -> list[Delivery]:
        """Entries pending on this consumer's own name after ``after`` (per stream), with
        their delivery counts: what an earlier process under the same name took and never
        acknowledged. Moves ``after`` on; a stream with nothing more leaves it."""
        reply: Any
        if self.per_stream:
            reply = await self._read_each(after)
        else:
            streams: dict[KeyT, StreamIdT] = {}
            streams.update(after)
            reply = await self.client.xreadgroup(
                self.group, self.consumer, streams, count=self.batch
            )
        deliveries: list[Delivery] = []
        for stream, entries in reply or []:
            name = text(stream)
            if not entries:
                after.pop(name, None)
                continue
            after[name] = text(entries[-1][0])
            ids = [text(entry_id) for entry_id, fields in entries if fields is not None]
            counts = await self._delivery_counts(name, ids)
            deliveries.extend(self._deliveries(stream, entries, counts))
        if deliveries:
            log.info("entries_resumed", consumer=self.consumer, count=len(deliveries))
        return deliveries

    async def _delivery_counts(self, stream: str, ids: Sequence[str]) -> dict[str, int]:
        """How many times each pending entry was delivered (XPENDING, one per id)."""
        if not ids:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(stream, self.group, min=entry_id, max=entry_id, count=1)
            replies = await pipe.execute()
        return {
            text(row["message_id"]): int(row["times_delivered"])
            for reply in replies
            for row in reply
        }

    async def claim_stale(self) -> list[Delivery]:
        """XAUTOCLAIM entries idle longer than ``claim_idle_ms`` on any consumer, on the
        streams this consumer reads, with their delivery counts (this claim included)."""
        deliveries: list[Delivery] = []
        for stream in self.reading:
            start = "0-0"
            while len(deliveries) < self.batch:
                reply = await self.client.xautoclaim(
                    stream,
                    self.group,
                    self.consumer,
                    self.claim_idle_ms,
                    start_id=start,
                    count=self.batch,
                )
                next_start, entries = text(reply[0]), reply[1]
                ids = [text(entry_id) for entry_id, fields in entries if fields is not None]
                counts = await self._delivery_counts(stream, ids)
                deliveries.extend(self._deliveries(stream, entries, counts))
                if next_start == "0-0":
                    break
                start = next_start
        if deliveries:
            log.info(
                "entries_reclaimed",
                consumer=self.consumer,
                count=len(deliveries),
                most_deliveries=max(d.deliveries for d in deliveries),
            )
        return deliveries

    def prepare(self, deliveries: Sequence[Delivery]) -> Prepared:
        """Parse deliveries and build their batch: the work of :meth:`handle` that needs
        neither Redis nor PostgreSQL."""
        prepared = Prepared(list(deliveries), prepare([]), {}, [])
        return self._prepared(prepared, self._parse(prepared, prepared.deliveries))

    async def prepare_between(self, deliveries: Sequence[Delivery]) -> Prepared:
        """:meth:`prepare`, letting other tasks run every :data:`_PARSE_CHUNK` deliveries:
        done for the batch read ahead while the batch in hand is written, it must not keep
        that one's next statement waiting for all of it."""
        prepared = Prepared(list(deliveries), prepare([]), {}, [])
        entries: list[LogEntry] = []
        for start in range(0, len(prepared.deliveries), _PARSE_CHUNK):
            await asyncio.sleep(0)
            entries += self._parse(prepared, prepared.deliveries[start : start + _PARSE_CHUNK])
        await asyncio.sleep(0)
        return self._prepared(prepared, entries)

    @staticmethod
    def _prepared(parsed: Prepared, entries: list[LogEntry]) -> Prepared:
        repeated = any(d.deliveries > 1 for d in parsed.deliveries)
        batch = prepare(entries, repeated)
        return Prepared(parsed.deliveries, batch, parsed.by_position, parsed.give_up)

    def _parse(self, into: Prepared, deliveries: Sequence[Delivery]) -> list[LogEntry]:
        """The entries of ``deliveries`` to project; those to park go to ``into.give_up``."""
        entries: list[LogEntry] = []
        by_position, give_up = into.by_position, into.give_up
        most = self.max_deliveries
        for d in deliveries:
            if d.deliveries > most:
                error = self._failures.get(d.position) or (
                    f"delivered {d.deliveries} times and never acknowledged: "
                    "the consumers that took it died or stalled"
                )
                give_up.append((d, error))
                continue
            if d.undecodable:
                give_up.append((d, d.undecodable))
                continue
            try:
                event, payload = parse_stored(d.fields.get("event", ""))
            except Exception as e:
                # Parsing is pure, so it fails the same way on every delivery: the entry
                # is poison, not a transient fault.
                give_up.append((d, describe(e)))
                continue
            entries.append(LogEntry(d.partition, d.stream_id, event, payload))
            by_position[d.partition, d.stream_id] = d  # d.position, inline
        return entries

    async def handle(self, deliveries: Sequence[Delivery], prepared: Prepared | None = None) -> int:
        """Project deliveries, park the ones to give up on, XACK all but those to retry.
        ``prepared``: what :meth:`prepare` made of these very deliveries, if done already.

        Returns how many events were new to PostgreSQL. Transient failures raise, with
        nothing acknowledged; so does, under ``wait_replicas``, a batch too few replicas
        hold yet (:class:`ReplicasBehind`).
        """
        if not deliveries:
            return 0
        if prepared is None:
            prepared = self.prepare(deliveries)
        if self.replicas is not None and prepared.batch.entries:
            await self.replicas.wait_for(e.partition for e in prepared.batch.entries)
        by_position = prepared.by_position
        new, refused, failed = await self._project(prepared.batch)
        give_up = prepared.give_up + [
            (by_position[(e.partition, e.stream_id)], error) for e, error in refused
        ]
        retry_later: set[Position] = set()
        for entry, error in failed:
            d = by_position[(entry.partition, entry.stream_id)]
            if d.deliveries >= self.max_deliveries:
                give_up.append((d, error))
                continue
            self._failures[d.position] = error
            retry_later.add(d.position)
            log.warning(
                "event_failed",
                stream_id=d.stream_id,
                partition=d.partition,
                deliveries=d.deliveries,
                max_deliveries=self.max_deliveries,
                error=error,
            )
        for d, error in give_up:
            await park(
                self.client,
                parked_record(
                    stream=self.stream_of[d.partition],
                    stream_id=d.stream_id,
                    group=self.group,
                    consumer=self.consumer,
                    error=error,
                    deliveries=d.deliveries,
                    fields=d.fields,
                ),
            )
        done = (
            [d for d in deliveries if d.position not in retry_later] if retry_later else deliveries
        )
        await self.ack(done)
        if self._failures:
            for d in done:
                self._failures.pop(d.position, None)
        self.projected += new
        self.dead_lettered += len(give_up)
        return new

    async def _project(
        self, batch: Batch
    ) -> tuple[int, list[tuple[LogEntry, str]], list[tuple[LogEntry, str]]]:
        """Project ``batch`` in one transaction. If that fails for a reason other than the
        infrastructure, project its entries one by one instead, to find those at fault.

        Returns ``(new, refused, failed)``: how many events were new, the entries whose data
        PostgreSQL refuses, and the entries that failed otherwise, each with its error.
        """
        if not batch.entries:
            return 0, [], []
        async with self.pool.acquire() as conn:
            try:
                return await write(conn, self.group, batch), [], []
            except Exception as e:
                if is_transient(e):
                    raise
                log.warning("batch_failed", size=len(batch), error=describe(e))
            new = 0
            refused: list[tuple[LogEntry, str]] = []
            failed: list[tuple[LogEntry, str]] = []
            for entry in batch.entries:
                try:
                    new += await self._project_one(conn, entry)
                except Exception as e:
                    if is_transient(e):
                        raise
                    (refused if isinstance(e, REFUSED_DATA) else failed).append(
                        (entry, describe(e))
                    )
            return new, refused, failed

    async def _project_one(self, conn: asyncpg.Connection, entry: LogEntry) -> int:
        """Project one entry in a transaction of its own; if PostgreSQL refuses it as the
        JSON it was read from, as the model serialises it: that JSON may hold a field the
        model ignores and the archive's json column refuses (a NaN), and the event must not
        be refused for what it ignores."""
        try:
            return await project(conn, self.group, [entry])
        except REFUSED_DATA:
            if entry.payload is None:
                raise
        return await project(conn, self.group, [replace(entry, payload=None)])

    def _by_stream(self, deliveries: Sequence[Delivery]) -> dict[str, list[StreamIdT]]:
        """The ids of ``deliveries`` (as Redis handed them over) by stream."""
        by_partition: dict[int, list[StreamIdT]] = {}
        for d in deliveries:
            ids = by_partition.get(d.partition)
            if ids is None:
                ids = by_partition[d.partition] = []
            ids.append(d.redis_id or d.stream_id)
        stream_of = self.stream_of
        return {stream_of[p]: ids for p, ids in by_partition.items()}

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """XACK deliveries, one pipeline for all partitions."""
        if not deliveries:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for stream, ids in self._by_stream(deliveries).items():
                pipe.xack(stream, self.group, *ids)
            await pipe.execute()

    async def _touch(self, deliveries: Sequence[Delivery], idle_ms: int | None = None) -> None:
        """Reset (or, with ``idle_ms``, set) the idle time of entries this consumer holds.

        XCLAIM JUSTID does not count a delivery. Best effort: with Redis down nobody can
        reclaim anything anyway.
        """
        with contextlib.suppress(RedisError):
            for stream, ids in self._by_stream(deliveries).items():
                await self.client.xclaim(
                    stream, self.group, self.consumer, 0, ids, idle=idle_ms, justid=True
                )

    @property
    def _heartbeat(self) -> float | None:
        """How often entries in hand are touched: a third of the reclaim threshold."""
        return self.claim_idle_ms / 3000 if self.claim_idle_ms else None

    async def _handle_holding(
        self,
        in_hand: list[Delivery],
        ahead: asyncio.Task[Prepared] | None = None,
        prepared: Prepared | None = None,
    ) -> int:
        """:meth:`handle`, touching the batch meanwhile so that a slow PostgreSQL (or a large
        batch) does not make it look abandoned; and so the batch read ``ahead``, once read."""
        heartbeat = self._heartbeat
        if heartbeat is None:
            return await self.handle(in_hand, prepared)

        handled = asyncio.Event()

        async def keep_claimed() -> None:
            while not handled.is_set():
                await asyncio.sleep(heartbeat)
                if not handled.is_set():
                    await self._touch(in_hand + _read(ahead))

        keeper = asyncio.create_task(keep_claimed())
        try:
            return await self.handle(in_hand, prepared)
        finally:
            # The flag as well as the cancellation: a cancellation can be lost in the Redis
            # client (see :meth:`run`), and a keeper left running would keep the batch from
            # ever looking abandoned.
            handled.set()
            keeper.cancel()
            # Bounded: a touch stuck waiting for a pooled Redis connection can swallow the
            # cancellation for a while, and the batch must not wait for a heartbeat.
            await asyncio.wait({keeper}, timeout=1.0)

    async def _pause(self, stop: asyncio.Event, seconds: float, in_hand: list[Delivery]) -> None:
        """Wait ``seconds`` (less if stopped), keeping the entries in hand claimed."""
        heartbeat = self._heartbeat
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            if in_hand and heartbeat:
                await self._touch(in_hand)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            step = min(left, heartbeat) if in_hand and heartbeat else left
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), step)

    async def _release(self, in_hand: list[Delivery]) -> None:
        """Hand a batch that could not go through back to the group: mark its entries
        idle for ``claim_idle_ms``, so the next reclaim pass of any consumer takes them,
        and set their delivery counts back by the one this consumer's delivery counted:
        it did not fail, so the next one must not bring the entries nearer to parking."""
        by_count: dict[tuple[str, int], list[StreamIdT]] = {}
        for d in in_hand:
            key = (self.stream_of[d.partition], max(d.deliveries - 1, 0))
            by_count.setdefault(key, []).append(d.stream_id)
        with contextlib.suppress(RedisError):
            for (stream, count), ids in by_count.items():
                await self.client.xclaim(
                    stream,
                    self.group,
                    self.consumer,
                    0,
                    ids,
                    idle=self.claim_idle_ms,
                    retrycount=count,
                    justid=True,
                )
        log.info("batch_released", consumer=self.consumer, size=len(in_hand))

    async def _keep_leases(
        self, leases: PartitionLeases, stop: asyncio.Event, ended: asyncio.Event
    ) -> None:
        """Refresh the leases every :attr:`PartitionLeases.every` seconds until stopped (or
        the projector ``ended``), and at once when the members change
        (:meth:`PartitionLeases.unsettled`)."""
        due = time.monotonic() + leases.every
        while not stop.is_set() and not ended.is_set():
            wait = leases.watch_every
            try:
                if time.monotonic() >= due or await leases.unsettled():
                    await leases.refresh()
                    due = time.monotonic() + leases.every
            except RedisError as e:
                # The leases run out if this lasts; nobody reads meanwhile anyway.
                log.warning("lease_refresh_failed", consumer=self.consumer, error=str(e))
                due, wait = 0.0, leases.every
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def _read_ahead(self) -> Prepared:
        """Read new entries without blocking, and prepare them (:meth:`prepare_between`)."""
        return await self.prepare_between(await self.read_new(block_ms=0))

    @staticmethod
    async def _fetched(prefetch: asyncio.Task[Prepared] | None) -> list[Delivery]:
        """What a read started ahead brought (nothing if it failed: an entry it may have
        taken stays pending on this name and is reclaimed)."""
        if prefetch is None:
            return []
        try:
            return (await prefetch).deliveries
        except Exception as e:
            log.warning("prefetch_failed", error=str(e), error_type=type(e).__name__)
            return []

    async def _consume(self, stop: asyncio.Event, period: float) -> None:
        """The loop of :meth:`run`: read, project, acknowledge; until stopped, then finish
        or release what is in hand."""
        next_claim = 0.0
        in_hand: list[Delivery] = []
        ready: Prepared | None = None  # what the read ahead made of ``in_hand``
        prefetch: asyncio.Task[Prepared] | None = None
        backoff = 0.1
        resume = dict.fromkeys(self.streams, "0")  # this name's own pending entries first
        try:
            while not stop.is_set():
                try:
                    if not in_hand and resume:
                        in_hand = await self.read_own(resume)
                    if not in_hand and time.monotonic() >= next_claim:
                        in_hand = await self.claim_stale()
                        # A full claim means more stale entries may be waiting (a dead consumer
                        # can hold a batch per partition): claim again at once, not later.
                        full = len(in_hand) >= self.batch
                        next_claim = 0.0 if full else time.monotonic() + period
                    if not in_hand and prefetch is not None:
                        ready, prefetch = await prefetch, None
                        in_hand = ready.deliveries
                    elif not in_hand:
                        in_hand = await self.read_new()
                    backlog = len(in_hand) >= self.batch
                    if backlog and not resume and time.monotonic() < next_claim:
                        # Only for a backlog (a full batch in hand): in a steady flow a read
                        # ahead takes the few entries that came while the last batch was
                        # written, and batches that small cost more than they carry (a
                        # read after the commit takes all that came by then). Without
                        # blocking: it must never keep a failed batch waiting for it. It
                        # also parses what it read, while PostgreSQL writes the batch in
                        # hand.
                        prefetch = asyncio.create_task(self._read_ahead())
                    await self._handle_holding(in_hand, prefetch, ready)
                    in_hand, ready = [], None
                    backoff = 0.1
                except Exception as e:
                    # The batch read ahead joins the one in hand: both are kept claimed, and
                    # both are retried or released together.
                    in_hand = in_hand + await self._fetched(prefetch)
                    prefetch, ready = None, None
                    if isinstance(e, ResponseError) and "NOGROUP" in str(e):
                        # The stream or its group went away (a Redis restart without
                        # persistence, a flush): make them again and carry on.
                        log.warning("consumer_group_missing", error=str(e))
                        with contextlib.suppress(RedisError):
                            await self.ensure_groups()
                    elif is_transient(e):
                        log.warning(
                            "projector_retry",
                            error=str(e),
                            error_type=type(e).__name__,
                            in_hand=len(in_hand),
                            retry_in=backoff,
                        )
                    else:
                        log.exception("projector_error", in_hand=len(in_hand), retry_in=backoff)
                    await self._pause(stop, backoff, in_hand)
                    backoff = min(backoff * 2, _MAX_BACKOFF_S)
        except asyncio.CancelledError:
            if prefetch is not None:
                prefetch.cancel()
            raise
        fetched = await self._fetched(prefetch)
        if fetched and not in_hand:
            try:
                await self._handle_holding(fetched)
            except Exception as e:
                log.warning("projector_retry", error=str(e), in_hand=len(fetched))
                in_hand = fetched
        else:
            in_hand += fetched
        if in_hand:
            await self._release(in_hand)

    async def run(self, stop: asyncio.Event, claim_every: float | None = None) -> None:
        """Consume until ``stop`` is set, then finish or release the batch in hand.

        With a backlog, while PostgreSQL writes one batch the next is read from Redis and
        parsed (one read ahead, not acknowledged before its own commit), so that neither
        waits for the other; in a steady flow the next read follows the commit.
        ``claim_every`` is the period of reclaim passes (default :attr:`claim_every`).
        """
        period = self.claim_every if claim_every is None else claim_every
        _collect_less_often()
        await self.ensure_groups()
        upkeep: asyncio.Task[None] | None = None
        ended = asyncio.Event()
        if self.leases is not None:
            with contextlib.suppress(RedisError):
                await self.leases.refresh()
            upkeep = asyncio.create_task(self._keep_leases(self.leases, stop, ended))
        log.info(
            "projector_started",
            consumer=self.consumer,
            streams=len(self.streams),
            leased=sorted(self.leases.owned) if self.leases else None,
            max_deliveries=self.max_deliveries,
        )
        try:
            await self._consume(stop, period)
        finally:
            # Also when cancelled: a consumer that dies must stop renewing its leases. The
            # flag as well as the cancellation, which can be lost: seen on Python 3.11 with
            # redis-py 8.1, a task cancelled in the middle of a Redis call stayed
            # "cancelling" and went on. The flag ends the loop at its next turn whatever.
            ended.set()
            if upkeep is not None:
                upkeep.cancel()
                await asyncio.wait({upkeep}, timeout=_UPKEEP_STOP_S)
        if self.leases is not None:
            with contextlib.suppress(RedisError):
                await self.leases.release_all()
        log.info(
            "projector_stopped",
            consumer=self.consumer,
            projected=self.projected,
            dead_lettered=self.dead_lettered,
        )
