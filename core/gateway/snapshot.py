"""A sale's Redis state read at one stream position, in bounded steps: chunked scans, then
an atomic fence that re-reads what the sale's events touched meanwhile."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from core.errors import InfrastructureError
from core.gateway.decode import entry_fields, keep, score, text
from core.gateway.scripts import GatewayBase
from core.keys import PartitionKeys

log = structlog.get_logger(__name__)

# Bounds on the work of one Redis command of a sale snapshot, each about half a
# millisecond of Redis time or less (see bench/bench_verify.py): items per HSCAN/SSCAN;
# reservations per read_reservations.lua call; values re-read by the fence script, and
# stream entries it parses itself (more, and the client reads them first).
SNAPSHOT_CHUNK = 500
READ_BATCH = 100
FENCE_LIMIT = 200
SNAPSHOT_ROUNDS = 8
_SNAPSHOT = "redis snapshot"


@dataclass(frozen=True, slots=True)
class SaleSnapshot:
    """A sale's Redis state as it stood at one position of its partition's stream.

    ``reservations`` maps each id in the sale's reservations set to (status, qty, user_id);
    ``deadlines`` maps a reservation id to its expiry (ms) in the deadlines zset.
    ``unsettled`` names reservations that the sale's last events touched and that could not
    be re-read at ``last_id`` (a sale under endless load): they are in neither mapping, and a
    reader must not compare them. See ``RedisGateway.snapshot_sale``.
    """

    counters: dict[str, int]
    holders: dict[str, int]
    reservations: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    last_id: str = "0-0"
    deadlines: dict[str, int] = field(default_factory=dict)
    unsettled: frozenset[str] = frozenset()

    @property
    def exists(self) -> bool:
        return bool(self.counters)


@dataclass(frozen=True, slots=True)
class Touched:
    """The holders and reservations that a sale's events after a position touched, and the
    position the log was read up to."""

    position: str
    users: set[str] = field(default_factory=set)
    reservations: set[str] = field(default_factory=set)


class SaleLog(Protocol):
    """Where ``snapshot_sale`` learns what a sale's events touched after a position."""

    async def touched_since(self, sale_id: str, partition: int, after: str) -> Touched:
        """Users and reservations the sale's events after ``after`` touched, up to the end."""
        ...


class _StreamLog:
    """``SaleLog`` over the partition stream alone (entries trimmed away are not seen)."""

    def __init__(self, gateway: GatewayBase) -> None:
        self.gateway = gateway

    async def touched_since(self, sale_id: str, partition: int, after: str) -> Touched:
        stream = self.gateway.keys_for_partition(partition).events
        touched = Touched(after)
        position = after
        while True:
            # A read: sent again if its reply is lost, like the snapshot's other commands.
            read = functools.partial(
                self.gateway.client.xrange,
                stream,
                min=f"({position}",
                max="+",
                count=SNAPSHOT_CHUNK,
            )
            batch = await self.gateway._retrying(read, _SNAPSHOT) or []
            for entry_id, raw in batch:
                if entry_id is None or raw is None:
                    continue
                position = text(entry_id)
                try:
                    event = json.loads(entry_fields(raw)[0].get("event", ""))
                except ValueError:
                    continue
                if not isinstance(event, dict) or event.get("sale_id") != sale_id:
                    continue
                if isinstance(event.get("user_id"), str):
                    touched.users.add(event["user_id"])
                if isinstance(event.get("reservation_id"), str):
                    touched.reservations.add(event["reservation_id"])
            if len(batch) < SNAPSHOT_CHUNK:
                return Touched(position, touched.users, touched.reservations)


class Snapshots(GatewayBase):
    """The bounded snapshot of one sale, for verify and repair."""

    async def snapshot_sale(
        self,
        sale_id: str,
        sale_log: SaleLog | None = None,
        *,
        chunk: int = SNAPSHOT_CHUNK,
        rounds: int = SNAPSHOT_ROUNDS,
    ) -> SaleSnapshot:
        """A sale's counters, holders and reservations as they stood at one stream position.

        No command reads more than ``chunk`` items, so a sale of any size never blocks
        Redis for long: note the stream's last id L0, read the holders (HSCAN) and the
        reservations (SSCAN, then their hashes and deadlines through
        ``read_reservations.lua``) in chunks, then ask ``sale_log`` (default: the stream
        alone; pass one that also reads the archive when streams are trimmed) what the
        sale's events after L0 touched. A value read in chunks and not touched since L0 is
        still valid; the touched ones are re-read, with the sale hash, by
        ``fence_sale.lua`` in one atomic step at the stream's last id, which it returns as
        ``last_id``. While more than ``FENCE_LIMIT`` values are touched, they are first
        re-read in chunks again, and the log is asked what changed meanwhile. Up to
        ``rounds`` rounds; if the sale's newest reservations keep changing until the end,
        the few the last fence could not re-read are returned as ``unsettled``.
        """
        keys = self.keys_for_sale(sale_id)
        tail: SaleLog = sale_log or _StreamLog(self)
        # Every command here only reads: one whose reply was lost is simply sent again.
        position = await self._retrying(lambda: self._last_id(keys.events), _SNAPSHOT)
        holders = await self._scan_holders(keys.holders(sale_id), chunk)
        reservations: dict[str, tuple[str, int, str]] = {}
        deadlines: dict[str, int] = {}
        cursor = 0
        while True:
            scan = functools.partial(
                self.client.sscan, keys.reservations(sale_id), cursor, count=chunk
            )
            cursor, ids = await self._retrying(scan, _SNAPSHOT)
            await self._read_reservations(
                keys, sale_id, [text(i) for i in ids], reservations, deadlines
            )
            if cursor == 0:
                break
        users: set[str] = set()
        rids: set[str] = set()
        settled: SaleSnapshot | None = None
        for _ in range(rounds):
            touched = await tail.touched_since(sale_id, keys.partition, position)
            position = touched.position
            users |= touched.users
            rids |= touched.reservations
            if len(users) + len(rids) > FENCE_LIMIT:
                # Too many to re-read atomically: re-read them in chunks, then see what the
                # log touched meanwhile (fewer, unless the sale outruns the reads).
                settled = None
                await self._reread_holders(keys.holders(sale_id), users, holders, chunk)
                await self._read_reservations(keys, sale_id, sorted(rids), reservations, deadlines)
                users, rids = set(), set()
                continue
            fenced = await self._fence_sale(keys, sale_id, position, users, rids, FENCE_LIMIT)
            if fenced is None:
                continue  # the stream ran ahead of the log read: read on, then fence again
            last_id, counters, quantities, reread, unread = fenced
            for user, qty in quantities.items():
                if qty:
                    holders[user] = qty
                else:
                    holders.pop(user, None)
            for rid, (member, record, deadline) in reread.items():
                keep(reservations, rid, record if member else None)
                keep(deadlines, rid, deadline)
            for rid in unread:
                reservations.pop(rid, None)
                deadlines.pop(rid, None)
            settled = SaleSnapshot(
                counters, holders, reservations, last_id, deadlines, frozenset(unread)
            )
            if not unread:
                return settled
            position, users, rids = last_id, set(), set(unread)
        if settled is None:
            raise InfrastructureError(
                f"sale {sale_id!r} changed faster than it could be read; try again"
            )
        log.warning("snapshot_unsettled", sale_id=sale_id, unsettled=len(settled.unsettled))
        return settled

    async def _last_id(self, stream: str) -> str:
        last = await self.client.xrevrange(stream, "+", "-", count=1)
        return text(last[0][0]) if last else "0-0"

    async def _scan_holders(self, key: str, chunk: int) -> dict[str, int]:
        holders: dict[str, int] = {}
        cursor = 0
        while True:
            scan = functools.partial(self.client.hscan, key, cursor, count=chunk)
            cursor, part = await self._retrying(scan, _SNAPSHOT)
            assert isinstance(part, dict)
            holders.update((text(k), int(v)) for k, v in part.items())
            if cursor == 0:
                return holders

    async def _reread_holders(
        self, key: str, users: set[str], holders: dict[str, int], chunk: int
    ) -> None:
        ordered = sorted(users)
        for start in range(0, len(ordered), chunk):
            part = ordered[start : start + chunk]
            got = await self._retrying(functools.partial(self.client.hmget, key, part), _SNAPSHOT)
            for user, qty in zip(part, got, strict=True):
                keep(holders, user, int(qty) if qty else None)

    async def _read_reservations(
        self,
        keys: PartitionKeys,
        sale_id: str,
        ids: list[str],
        reservations: dict[str, tuple[str, int, str]],
        deadlines: dict[str, int],
    ) -> None:
        """Read the reservations ``ids`` (membership, hash, deadline) into the mappings,
        ``READ_BATCH`` per ``read_reservations.lua`` call."""
        for start in range(0, len(ids), READ_BATCH):
            part = ids[start : start + READ_BATCH]
            read = functools.partial(
                self._read_batch,
                keys=[
                    keys.reservations(sale_id),
                    keys.deadlines,
                    *(keys.reservation(rid) for rid in part),
                ],
                args=part,
            )
            flat = await self._retrying(read, _SNAPSHOT)
            got = [text(x) for x in flat]
            for j, rid in enumerate(part):
                member, status, qty, user, deadline = got[5 * j : 5 * j + 5]
                keep(reservations, rid, (status, int(qty or 0), user) if member == "1" else None)
                keep(deadlines, rid, score(deadline))

    async def _fence_sale(
        self,
        keys: PartitionKeys,
        sale_id: str,
        position: str,
        users: set[str],
        rids: set[str],
        tail_limit: int,
    ) -> (
        tuple[
            str,
            dict[str, int],
            dict[str, int],
            dict[str, tuple[bool, tuple[str, int, str], int | None]],
            list[str],
        ]
        | None
    ):
        """Run ``fence_sale.lua``; None when the stream is ahead of ``position``."""
        ordered = sorted(rids)
        fence = functools.partial(
            self._fence,
            keys=[
                keys.sale(sale_id),
                keys.holders(sale_id),
                keys.reservations(sale_id),
                keys.deadlines,
                keys.events,
                *(keys.reservation(rid) for rid in ordered),
            ],
            args=[sale_id, position, tail_limit, len(users), *sorted(users), *ordered],
        )
        reply = await self._retrying(fence, _SNAPSHOT)
        if text(reply[0]) != "ok":
            return None
        _, last_id, sale, names, quantities, flat, unread = reply
        fields = [text(x) for x in sale]
        counters = {fields[i]: int(fields[i + 1]) for i in range(0, len(fields), 2)}
        held = {text(u): int(q) if text(q) else 0 for u, q in zip(names, quantities, strict=True)}
        res = [text(x) for x in flat]
        reread = {
            res[i]: (
                res[i + 1] == "1",
                (res[i + 2], int(res[i + 3]), res[i + 4]),
                score(res[i + 5]),
            )
            for i in range(0, len(res), 6)
        }
        return text(last_id), counters, held, reread, [text(x) for x in unread]
