"""The Redis gateway: the only code that runs the Lua scripts and reads sale state."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from itertools import chain
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.errors import (
    REJECTIONS,
    InfrastructureError,
    NotReplicated,
    ReservationNotFound,
    ReservationOutcomeUnknown,
    SaleExists,
    SoldOut,
)
from core.events import from_ms, to_ms
from core.keys import HOLDERS_SUFFIX, PartitionKeys, partition_of, partition_of_reservation
from core.models import NewSale, ReservationView, SaleStatus, SaleView

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Bounds on the work of one Redis command of a sale snapshot or repair, each about half a
# millisecond of Redis time or less (see bench/bench_verify.py): items per HSCAN/SSCAN;
# reservations per read_reservations.lua call; values re-read by the fence script, and
# stream entries it parses itself (more, and the client reads them first); items per
# repair_sale.lua call.
SNAPSHOT_CHUNK = 500
READ_BATCH = 100
FENCE_LIMIT = 200
REPAIR_CHUNK = 200
SNAPSHOT_ROUNDS = 8
_SNAPSHOT = "redis snapshot"

# Errors after which a command may or may not have run: its reply was lost.
LOST_REPLY = (RedisConnectionError, RedisTimeoutError)
# How long create, close, stock adjustment and expiry remember an operation id's outcome:
# far longer than any retry of the same call, short enough that the records take little
# memory. (Confirm and cancel keep theirs in the reservation's hash.)
OPERATION_TTL_SECONDS = 300


def load_lua(name: str) -> str:
    """Source of ``core/lua/<name>.lua``."""
    return resources.files("core").joinpath("lua", f"{name}.lua").read_text()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _from_ms(value: Any) -> datetime:
    return from_ms(int(value))


def _keep(mapping: dict[str, T], key: str, value: T | None) -> None:
    """Set ``mapping[key]``, or remove the key when ``value`` is None."""
    if value is None:
        mapping.pop(key, None)
    else:
        mapping[key] = value


def _score(value: str) -> int | None:
    return int(float(value)) if value else None


def _record(r: ReservationRecord) -> tuple[Any, ...]:
    ended = "" if r.ended_at_ms is None else r.ended_at_ms
    return (r.reservation_id, r.status, r.qty, r.user_id, r.created_at_ms, r.expires_at_ms, ended)


def _reservation_view(reservation_id: str, raw: dict[Any, Any]) -> ReservationView:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return ReservationView(
        reservation_id=reservation_id,
        sale_id=fields["sale_id"],
        user_id=fields["user_id"],
        qty=int(fields["qty"]),
        status=fields["status"],
        expires_at=_from_ms(fields["expires_at"]),
    )


@dataclass(frozen=True, slots=True)
class Placed:
    """Outcome of a successful reserve call.

    ``replayed``: the Idempotency-Key was used by an earlier request, and ``view`` is that
    request's reservation as it is now (None if it is gone); otherwise ``expires_at`` is the
    new placement's deadline.
    """

    reservation_id: str
    replayed: bool
    expires_at: datetime | None
    view: ReservationView | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the gateway retries a call whose reply was lost, with the same ids each time.

    At most ``attempts`` tries, sleeping ``backoff`` seconds (doubled each time) between
    them, and no new try once ``deadline`` seconds have passed since the first.
    """

    attempts: int = 4
    backoff: float = 0.02
    deadline: float = 2.0


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

    def __init__(self, gateway: RedisGateway) -> None:
        self.gateway = gateway

    async def touched_since(self, sale_id: str, partition: int, after: str) -> Touched:
        stream = PartitionKeys(partition).events
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
                position = _text(entry_id)
                try:
                    event = json.loads(_entry_fields(raw)[0].get("event", ""))
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


def _entry_fields(raw: dict[Any, Any]) -> tuple[dict[str, str], bool]:
    """A stream entry's fields as text, and whether they all were UTF-8; bytes that are
    not come out as ``\\xff`` escapes (anyone can write anything into a stream)."""
    try:
        return {_text(k): _text(v) for k, v in raw.items()}, True
    except UnicodeDecodeError:
        return {_readable(k): _readable(v) for k, v in raw.items()}, False


def _readable(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


@dataclass(frozen=True, slots=True)
class ReservationRecord:
    """One reservation as the repair script writes it; an empty ``status`` deletes it."""

    reservation_id: str
    status: str
    qty: int = 0
    user_id: str = ""
    created_at_ms: int = 0
    expires_at_ms: int = 0
    ended_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class SaleRepair:
    """What to write into one sale's Redis keys, folded from the log up to ``last_id``.

    ``holders`` maps user -> qty (0 removes the user); ``deadlines`` maps a reservation
    to its expiry in ms (0 removes it from the deadlines zset). Only what differs from
    Redis need be listed; the fields are written whole.
    """

    sale_id: str
    last_id: str
    fields: dict[str, int]
    holders: dict[str, int] = field(default_factory=dict)
    reservations: list[ReservationRecord] = field(default_factory=list)
    deadlines: dict[str, int] = field(default_factory=dict)


class SoldOutHints:
    """Per-process memory of sales that Redis recently called sold out.

    In a flash sale almost every request arrives after the stock is gone; answering those
    from memory for ``ttl`` seconds spares Redis a round trip each. The price is bounded:
    stock returned by a cancel or an expiry is offered at most ``ttl`` seconds late.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._until: dict[str, tuple[float, int]] = {}

    def remember(self, sale_id: str, qty: int) -> None:
        """Redis refused ``qty`` units of ``sale_id`` as sold out just now."""
        if self.ttl > 0:
            self._until[sale_id] = (time.monotonic() + self.ttl, qty)

    def forget(self, sale_id: str) -> None:
        """Stock came back through this process (a cancel or a restock)."""
        self._until.pop(sale_id, None)

    def says_sold_out(self, sale_id: str, qty: int) -> bool:
        """True while a refusal of at most ``qty`` units is fresh."""
        hint = self._until.get(sale_id)
        if hint is None:
            return False
        until, refused_qty = hint
        if time.monotonic() >= until:
            del self._until[sale_id]
            return False
        return qty >= refused_qty


class RedisGateway:
    """Runs flashsale's Lua scripts (EVALSHA, loaded once per client) and reads state."""

    def __init__(
        self,
        client: aioredis.Redis,
        partitions: int,
        idempotency_ttl: int,
        sold_out_hint_seconds: float = 0.0,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.client = client
        self.retry = retry or RetryPolicy()
        self.partitions = partitions
        self.idempotency_ttl = idempotency_ttl
        # Replicas that must acknowledge a placement (Redis WAIT) before reserve returns.
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.sold_out_hints = SoldOutHints(sold_out_hint_seconds)
        self._create_sale: AsyncScript = client.register_script(load_lua("create_sale"))
        self._reserve: AsyncScript = client.register_script(load_lua("reserve"))
        self._fence: AsyncScript = client.register_script(load_lua("fence_sale"))
        self._read_batch: AsyncScript = client.register_script(load_lua("read_reservations"))
        self._confirm: AsyncScript = client.register_script(load_lua("confirm"))
        self._cancel: AsyncScript = client.register_script(load_lua("cancel"))
        self._expire: AsyncScript = client.register_script(load_lua("expire"))
        self._adjust_stock: AsyncScript = client.register_script(load_lua("adjust_stock"))
        self._close_sale: AsyncScript = client.register_script(load_lua("close_sale"))
        self._repair_sale: AsyncScript = client.register_script(load_lua("repair_sale"))

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script now, so no request pays for a first-call NOSCRIPT retry."""
        scripts = (
            self._create_sale,
            self._reserve,
            self._fence,
            self._read_batch,
            self._confirm,
            self._cancel,
            self._expire,
            self._adjust_stock,
            self._close_sale,
            self._repair_sale,
        )
        try:
            for script in scripts:
                await self.client.script_load(script.script)
        except RedisError as e:
            raise InfrastructureError(f"cannot load the Lua scripts into redis: {e}") from e

    def keys_for_sale(self, sale_id: str) -> PartitionKeys:
        """Key builder of the partition that owns ``sale_id``."""
        return PartitionKeys(partition_of(sale_id, self.partitions))

    def stream_names(self) -> list[str]:
        """Every partition's event stream, in partition order."""
        return [PartitionKeys(p).events for p in range(self.partitions)]

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``call`` until it answers, again after a lost reply, within ``self.retry``.

        Only for calls that are safe to repeat: reads, and scripts run with the same ids.
        Raises ``InfrastructureError`` when Redis fails otherwise or the budget runs out.
        """
        started = time.monotonic()
        delay = self.retry.backoff
        attempt = 1
        while True:
            try:
                return await call()
            except LOST_REPLY as e:
                spent = time.monotonic() - started
                if attempt >= self.retry.attempts or spent + delay >= self.retry.deadline:
                    raise InfrastructureError(
                        f"{what}: no reply from redis after {attempt} attempts: {e}"
                    ) from e
                log.warning("redis_reply_lost", what=what, attempt=attempt, error=str(e))
            except RedisError as e:
                raise InfrastructureError(f"{what} failed: {e}") from e
            await asyncio.sleep(delay)
            delay *= 2
            attempt += 1

    async def _call(
        self,
        script: AsyncScript,
        keys: list[str],
        args: list[Any],
        client: aioredis.Redis | None = None,
    ) -> list[str]:
        """One run of a script; raises the script's rejection, lets Redis errors through."""
        reply = await script(keys=keys, args=args, client=client)
        result = [_text(item) for item in reply]
        if result[0] == "err":
            raise REJECTIONS[result[1]]()
        return result

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> list[str]:
        """Run a script, again with the same arguments after a lost reply (every
        state-changing script answers a repeated run with its first outcome)."""
        return await self._retrying(lambda: self._call(script, keys, args), "redis script")

    async def create_sale(self, sale: NewSale) -> SaleView:
        """Open a sale; raises ``SaleExists`` if the id is taken."""
        keys = self.keys_for_sale(sale.sale_id)
        operation = uuid.uuid4().hex
        await self._run(
            self._create_sale,
            [keys.sale(sale.sale_id), keys.events, keys.operation(operation)],
            [
                operation,
                sale.sale_id,
                sale.stock,
                sale.per_user_limit,
                to_ms(sale.starts_at) if sale.starts_at else "",
                to_ms(sale.ends_at) if sale.ends_at else "",
                sale.hold_seconds,
                OPERATION_TTL_SECONDS,
            ],
        )
        log.info("sale_created", sale_id=sale.sale_id, stock=sale.stock)
        view = await self.get_sale(sale.sale_id)
        if view is None:  # pragma: no cover - the script just wrote it
            raise SaleExists()
        return view

    async def reserve(
        self, sale_id: str, user_id: str, qty: int, idempotency_key: str | None
    ) -> Placed:
        """Run the reserve script: one round trip that validates, holds and logs.

        Raises a ``RejectedError`` subclass with the script's reason when refused. A sale
        that Redis just called sold out is answered ``SoldOut`` from memory for a short
        while (see ``SoldOutHints``), except for requests with an Idempotency-Key, whose
        retry must find the reservation it may already have.

        The reservation id is chosen here, so a call whose reply was lost is run again with
        the same id and answers the placement it made. When Redis stays silent beyond the
        retry budget, ``ReservationOutcomeUnknown`` names the id, for the buyer to look up.
        """
        if idempotency_key is None and self.sold_out_hints.says_sold_out(sale_id, qty):
            raise SoldOut()
        keys = self.keys_for_sale(sale_id)
        reservation_id = f"{keys.partition}-{uuid.uuid4().hex}"
        try:
            result = await self._reserve_script(
                keys, sale_id, user_id, qty, reservation_id, idempotency_key
            )
        except SoldOut:
            self.sold_out_hints.remember(sale_id, qty)
            raise
        except NotReplicated:
            raise
        except InfrastructureError as e:
            log.warning("reservation_outcome_unknown", reservation_id=reservation_id, error=str(e))
            raise ReservationOutcomeUnknown(reservation_id, str(e)) from e
        if result[3] == "1":
            try:
                view = await self.get_reservation(result[1])
            except InfrastructureError as e:
                raise ReservationOutcomeUnknown(result[1], str(e)) from e
            # A key naming this call's own id was stored by an earlier run of this call.
            if result[1] != reservation_id or view is None:
                return Placed(reservation_id=result[1], replayed=True, expires_at=None, view=view)
            return Placed(reservation_id=result[1], replayed=False, expires_at=view.expires_at)
        return Placed(reservation_id=result[1], replayed=False, expires_at=_from_ms(result[2]))

    async def _reserve_script(
        self,
        keys: PartitionKeys,
        sale_id: str,
        user_id: str,
        qty: int,
        reservation_id: str,
        idempotency_key: str | None,
    ) -> list[str]:
        script_keys = [
            keys.sale(sale_id),
            keys.holders(sale_id),
            keys.idempotency(sale_id, user_id, idempotency_key or ""),
            keys.reservation(reservation_id),
            keys.reservations(sale_id),
            keys.deadlines,
            keys.events,
            keys.user_reservations(sale_id, user_id),
        ]
        args: list[Any] = [
            uuid.uuid4().hex,
            sale_id,
            user_id,
            qty,
            reservation_id,
            self.idempotency_ttl,
            "1" if idempotency_key else "",
            "1" if self.wait_replicas else "",
        ]
        if self.wait_replicas:
            return await self._retrying(
                lambda: self._reserve_replicated(script_keys, args), "redis reserve and WAIT"
            )
        return await self._run(self._reserve, script_keys, args)

    async def _reserve_replicated(self, keys: list[str], args: list[Any]) -> list[str]:
        """The reserve script, then WAIT for ``wait_replicas`` replicas on the same connection.

        Raises ``NotReplicated`` when too few acknowledged in time; the placement stands on
        the primary all the same. WAIT covers the writes of its own connection only, so
        both run on one; an answer that places nothing (a replayed Idempotency-Key, or a
        repeated run of this call) rewrites a value as it is (ARGV[8]), which puts the
        connection past the first placement's write and makes WAIT cover that too.
        """
        async with self.client.client() as conn:
            result = await self._call(self._reserve, keys, args, client=conn)
            acknowledged = int(await conn.wait(self.wait_replicas, self.wait_timeout_ms))
        if acknowledged < self.wait_replicas:
            log.warning(
                "reservation_not_replicated",
                reservation_id=result[1],
                acknowledged=acknowledged,
                wanted=self.wait_replicas,
            )
            raise NotReplicated(result[1], acknowledged, self.wait_replicas)
        return result

    async def confirm(self, reservation_id: str, user_id: str | None) -> bool:
        """Confirm a pending reservation of ``user_id`` (None: an admin, any buyer's).

        Returns False when it was already confirmed (nothing changed). Raises
        ``ReservationNotFound``, ``ReservationExpired`` or ``ReservationClosed``.
        """
        view = await self._reservation_of(reservation_id, user_id)
        keys = PartitionKeys(partition_of_reservation(reservation_id) or 0)
        operation = uuid.uuid4().hex
        result = await self._run(
            self._confirm,
            [
                keys.reservation(reservation_id),
                keys.sale(view.sale_id),
                keys.deadlines,
                keys.events,
            ],
            [operation, reservation_id, user_id or ""],
        )
        return result[1] == "1"

    async def cancel(self, reservation_id: str, user_id: str) -> bool:
        """Cancel a pending reservation of ``user_id``; its stock and quota go back.

        Returns False when it was already cancelled (nothing changed). Raises
        ``ReservationNotFound``, ``ReservationExpired`` or ``ReservationClosed``.
        """
        view = await self._reservation_of(reservation_id, user_id)
        keys = PartitionKeys(partition_of_reservation(reservation_id) or 0)
        operation = uuid.uuid4().hex
        result = await self._run(
            self._cancel,
            [
                keys.reservation(reservation_id),
                keys.sale(view.sale_id),
                keys.holders(view.sale_id),
                keys.deadlines,
                keys.events,
            ],
            [operation, reservation_id, user_id],
        )
        self.sold_out_hints.forget(view.sale_id)
        return result[1] == "1"

    async def _reservation_of(self, reservation_id: str, user_id: str | None) -> ReservationView:
        view = await self.get_reservation(reservation_id)
        if view is None or (user_id is not None and view.user_id != user_id):
            raise ReservationNotFound(f"no reservation {reservation_id[:80]!r} of yours")
        return view

    async def expire_due(self, partition: int, limit: int = 200) -> tuple[int, int]:
        """Expire up to ``limit`` overdue reservations of a partition.

        Returns ``(expired, still_due)``; call again at once while ``still_due`` > 0.
        """
        keys = PartitionKeys(partition)
        operation = uuid.uuid4().hex
        script_keys = [keys.deadlines, keys.events, keys.operation(operation)]
        args: list[Any] = [
            limit,
            keys.reservation_prefix,
            keys.sale_prefix,
            HOLDERS_SUFFIX,
            OPERATION_TTL_SECONDS,
        ]

        async def run() -> list[Any]:
            reply: list[Any] = await self._expire(keys=script_keys, args=args)
            return reply

        expired, left = await self._retrying(run, "redis expiry")
        return int(expired), int(left)

    async def adjust_stock(self, sale_id: str, delta: int, idempotency_key: str | None) -> bool:
        """Add (delta > 0) or withdraw unsold (delta < 0) stock.

        Returns False when this Idempotency-Key was applied before (nothing changed).
        Raises ``SaleNotFound`` or ``NotEnoughUnsoldStock``.
        """
        keys = self.keys_for_sale(sale_id)
        operation = uuid.uuid4().hex
        result = await self._run(
            self._adjust_stock,
            [
                keys.sale(sale_id),
                keys.stock_idempotency(sale_id, idempotency_key or ""),
                keys.events,
                keys.operation(operation),
            ],
            [
                operation,
                sale_id,
                delta,
                self.idempotency_ttl,
                "1" if idempotency_key else "",
                OPERATION_TTL_SECONDS,
            ],
        )
        self.sold_out_hints.forget(sale_id)
        log.info("stock_adjusted", sale_id=sale_id, delta=delta, applied=result[1] == "1")
        return result[1] == "1"

    async def close_sale(self, sale_id: str) -> bool:
        """Close a sale early; False when it was already closed. Raises ``SaleNotFound``."""
        keys = self.keys_for_sale(sale_id)
        operation = uuid.uuid4().hex
        result = await self._run(
            self._close_sale,
            [keys.sale(sale_id), keys.events, keys.operation(operation)],
            [operation, sale_id, OPERATION_TTL_SECONDS],
        )
        log.info("sale_closed", sale_id=sale_id, changed=result[1] == "1")
        return result[1] == "1"

    async def reservations_of(self, sale_id: str, user_id: str) -> list[ReservationView] | None:
        """Every reservation ``user_id`` placed in ``sale_id`` that Redis still holds, whatever
        its status, oldest first; None when the sale does not exist."""
        placed = await self.placed_reservations(sale_id, user_id)
        return None if placed is None else [view for _, view in placed]

    async def placed_reservations(
        self, sale_id: str, user_id: str
    ) -> list[tuple[int, ReservationView]] | None:
        """Like :meth:`reservations_of`, each with its placement time (epoch ms), the order
        they come in (then by id), so a caller can merge them with pruned ones. Retried
        after a lost reply (a read)."""
        keys = self.keys_for_sale(sale_id)

        async def read() -> list[tuple[int, ReservationView]] | None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.exists(keys.sale(sale_id))
                pipe.smembers(keys.user_reservations(sale_id, user_id))
                exists, members = await pipe.execute()
            if not exists:
                return None
            ids = sorted(_text(m) for m in members)
            async with self.client.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.hgetall(keys.reservation(rid))
                rows = await pipe.execute() if ids else []
            # An id whose hash pruning removed a moment ago (it drops the id from the set next)
            # is skipped: the caller finds it among the pruned ones.
            placed = [
                (int(raw.get(b"created_at", 0)), _reservation_view(rid, raw))
                for rid, raw in zip(ids, rows, strict=True)
                if raw
            ]
            placed.sort(key=lambda pair: (pair[0], pair[1].reservation_id))
            return placed

        return await self._retrying(read, "redis read")

    async def get_sale(self, sale_id: str) -> SaleView | None:
        """Current counters of a sale, or None if it does not exist."""
        key = self.keys_for_sale(sale_id).sale(sale_id)

        async def read() -> dict[Any, Any]:
            raw: dict[Any, Any] = await self.client.hgetall(key)
            return raw

        raw = await self._retrying(read, "redis read")
        if not raw:
            return None
        fields = {_text(k): int(v) for k, v in raw.items()}
        return SaleView(
            sale_id=sale_id,
            status=sale_status(fields, to_ms(datetime.now(UTC))),
            stock=fields["stock"],
            remaining=fields["remaining"],
            held=fields["held"],
            confirmed=fields["confirmed"],
            released=fields["released"],
            per_user_limit=fields["per_user_limit"],
            hold_seconds=fields["hold_seconds"],
            starts_at=_from_ms(fields["starts_at"]),
            ends_at=_from_ms(fields["ends_at"]) if fields["ends_at"] else None,
        )

    async def get_reservation(self, reservation_id: str) -> ReservationView | None:
        """A reservation by id, or None if the id is unknown or malformed."""
        partition = partition_of_reservation(reservation_id)
        if partition is None or partition >= self.partitions:
            return None
        key = PartitionKeys(partition).reservation(reservation_id)

        async def read() -> dict[Any, Any]:
            raw: dict[Any, Any] = await self.client.hgetall(key)
            return raw

        raw = await self._retrying(read, "redis read")
        return _reservation_view(reservation_id, raw) if raw else None

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
                keys, sale_id, [_text(i) for i in ids], reservations, deadlines
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
                _keep(reservations, rid, record if member else None)
                _keep(deadlines, rid, deadline)
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
        return _text(last[0][0]) if last else "0-0"

    async def _scan_holders(self, key: str, chunk: int) -> dict[str, int]:
        holders: dict[str, int] = {}
        cursor = 0
        while True:
            scan = functools.partial(self.client.hscan, key, cursor, count=chunk)
            cursor, part = await self._retrying(scan, _SNAPSHOT)
            assert isinstance(part, dict)
            holders.update((_text(k), int(v)) for k, v in part.items())
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
                _keep(holders, user, int(qty) if qty else None)

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
            got = [_text(x) for x in flat]
            for j, rid in enumerate(part):
                member, status, qty, user, score = got[5 * j : 5 * j + 5]
                _keep(reservations, rid, (status, int(qty or 0), user) if member == "1" else None)
                _keep(deadlines, rid, _score(score))

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
        if _text(reply[0]) != "ok":
            return None
        _, last_id, sale, names, quantities, flat, unread = reply
        fields = [_text(x) for x in sale]
        counters = {fields[i]: int(fields[i + 1]) for i in range(0, len(fields), 2)}
        held = {_text(u): int(q) if _text(q) else 0 for u, q in zip(names, quantities, strict=True)}
        res = [_text(x) for x in flat]
        reread = {
            res[i]: (
                res[i + 1] == "1",
                (res[i + 2], int(res[i + 3]), res[i + 4]),
                _score(res[i + 5]),
            )
            for i in range(0, len(res), 6)
        }
        return _text(last_id), counters, held, reread, [_text(x) for x in unread]

    async def read_stream(
        self, partition: int, after: str = "0-0", until: str = "+", chunk: int = 10_000
    ) -> AsyncIterator[tuple[str, dict[str, str]]]:
        """Yield ``(stream_id, fields)`` of a partition's stream after ``after``, in order
        (bytes that are not UTF-8 come out as ``\\xff`` escapes)."""
        stream = PartitionKeys(partition).events
        start = f"({after}"
        while True:
            try:
                batch = await self.client.xrange(stream, min=start, max=until, count=chunk)
            except RedisError as e:
                raise InfrastructureError(f"redis read failed: {e}") from e
            batch = batch or []
            for entry_id, fields in batch:
                if entry_id is not None and fields is not None:
                    yield _text(entry_id), _entry_fields(fields)[0]
            if len(batch) < chunk:
                return
            start = f"({_text(batch[-1][0] or '')}"

    async def read_stream_chunk(
        self, partition: int, after: str, count: int, until: str = "+"
    ) -> StreamChunk:
        """Up to ``count`` entries of a partition's stream after ``after`` (up to ``until``),
        and the stream's first id, read atomically (MULTI), so a trim that happens while a
        reader walks the stream shows up as a first id above the reader's position. Entries
        whose bytes are not UTF-8 are listed in ``undecodable``."""
        stream = PartitionKeys(partition).events
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xrange(stream, min="-", max="+", count=1)
                pipe.xrange(stream, min=f"({after}", max=until, count=count)
                first, batch = await pipe.execute()
        except RedisError as e:
            raise InfrastructureError(f"redis read failed: {e}") from e
        entries: list[tuple[str, dict[str, str]]] = []
        undecodable: set[str] = set()
        for entry_id, raw in batch or []:
            if entry_id is not None and raw is not None:
                fields, utf8 = _entry_fields(raw)
                entries.append((_text(entry_id), fields))
                if not utf8:
                    undecodable.add(entries[-1][0])
        return StreamChunk(
            first_id=_text(first[0][0]) if first else None,
            entries=entries,
            undecodable=frozenset(undecodable),
        )

    async def repair_sale(self, repair: SaleRepair, chunk: int = REPAIR_CHUNK) -> str | None:
        """Write a sale's folded state into Redis, fenced on the log position it reflects.

        A large repair is written as several script calls of at most ``chunk`` items each
        (the counters and configuration go with the first), every one fenced on
        ``repair.last_id``: each call writes only while the stream has not moved, so what it
        writes is the fold's state at the stream's current position. Returns None when all
        of it was written; when the partition's stream moved past ``repair.last_id``, the
        calls from there on write nothing and the stream's last id is returned, so the
        caller can fold again and write what still differs.
        """
        for part in _split_repair(repair, chunk):
            moved_to = await self._repair_part(part)
            if moved_to is not None:
                return moved_to
        log.info("sale_repaired", sale_id=repair.sale_id, last_id=repair.last_id)
        return None

    async def _repair_part(self, repair: SaleRepair) -> str | None:
        keys = self.keys_for_sale(repair.sale_id)
        args: list[Any] = [repair.last_id, repair.sale_id]
        for pairs in (repair.fields, repair.holders):
            args += [len(pairs), *chain.from_iterable(pairs.items())]
        args += [len(repair.reservations), *chain.from_iterable(map(_record, repair.reservations))]
        args += [len(repair.deadlines), *chain.from_iterable(repair.deadlines.items())]
        # Safe to send again after a lost reply: the same writes, fenced on the same id.
        write = functools.partial(
            self._repair_sale,
            keys=[
                keys.sale(repair.sale_id),
                keys.holders(repair.sale_id),
                keys.reservations(repair.sale_id),
                keys.deadlines,
                keys.events,
                *(keys.reservation(r.reservation_id) for r in repair.reservations),
            ],
            args=args,
        )
        reply = await self._retrying(write, "redis repair")
        return None if _text(reply[0]) == "ok" else _text(reply[2])

    async def group_progress(
        self, group: str, chunk: int = SNAPSHOT_CHUNK
    ) -> dict[int, GroupProgress]:
        """Last delivered id and pending ids of ``group`` on each partition that has it.

        The pending ids are read ``chunk`` at a time (XPENDING by range), so a large
        backlog never makes one long command. The last delivered id is read first: an id
        acknowledged while the chunks are read is then simply not pending, and one
        delivered meanwhile is past the last delivered id read.
        """
        progress: dict[int, GroupProgress] = {}
        for partition in range(self.partitions):
            stream = PartitionKeys(partition).events
            try:
                groups = await self.client.xinfo_groups(stream)
                info = next((g for g in groups if _text(g["name"]) == group), None)
                if info is None:
                    continue
                pending: set[str] = set()
                start = "-"
                while True:
                    batch = await self.client.xpending_range(
                        stream, group, min=start, max="+", count=chunk
                    )
                    pending.update(_text(p["message_id"]) for p in batch)
                    if len(batch) < chunk:
                        break
                    start = f"({_text(batch[-1]['message_id'])}"
            except ResponseError:
                continue  # no such stream yet
            except RedisError as e:
                raise InfrastructureError(f"redis read failed: {e}") from e
            progress[partition] = GroupProgress(
                last_delivered=_text(info["last-delivered-id"]), pending=frozenset(pending)
            )
        return progress

    async def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(await self.client.ping())
        except RedisError:
            return False

    @functools.cached_property
    def _prune_reservations(self) -> AsyncScript:
        # Registered on first use: pruning runs in the consumer daemon, off the purchase
        # path, and EVALSHA loads the script on its first NOSCRIPT.
        return self.client.register_script(load_lua("prune_reservations"))

    async def prune_reservations(
        self, sale_id: str, reservations: list[tuple[str, str]]
    ) -> tuple[int, int]:
        """Remove final reservations of ``sale_id`` from Redis: ``(reservation_id, user_id)``
        pairs, one script call (keep the batch small: it holds Redis for its length).

        Only reservations whose hash says confirmed, cancelled or expired are removed;
        pending ones stay. Returns ``(gone, kept)``: ids now absent from Redis, ids left
        pending. Safe to repeat.
        """
        if not reservations:
            return 0, 0
        keys = self.keys_for_sale(sale_id)
        script_keys = [keys.reservations(sale_id)]
        for reservation_id, user_id in reservations:
            script_keys += [
                keys.reservation(reservation_id),
                keys.user_reservations(sale_id, user_id),
            ]
        try:
            gone, kept = await self._prune_reservations(
                keys=script_keys, args=[rid for rid, _ in reservations]
            )
        except RedisError as e:
            raise InfrastructureError(f"redis pruning failed: {e}") from e
        return int(gone), int(kept)


def sale_status(fields: dict[str, int], now_ms: int) -> SaleStatus:
    """Pure rule for a sale's public status from its counters and window."""
    if fields["closed"] or (fields["ends_at"] and now_ms >= fields["ends_at"]):
        return "ended"
    if now_ms < fields["starts_at"]:
        return "scheduled"
    if fields["remaining"] <= 0:
        return "sold_out"
    return "active"


def _split_repair(repair: SaleRepair, chunk: int) -> Iterator[SaleRepair]:
    """``repair`` as parts of at most ``chunk`` holders, reservations and deadlines each,
    all fenced on its position; the first part carries the sale's fields."""
    holders = list(repair.holders.items())
    deadlines = list(repair.deadlines.items())
    parts = max(len(holders), len(repair.reservations), len(deadlines), 1)
    for start in range(0, parts, chunk):
        yield SaleRepair(
            repair.sale_id,
            repair.last_id,
            repair.fields if start == 0 else {},
            dict(holders[start : start + chunk]),
            repair.reservations[start : start + chunk],
            dict(deadlines[start : start + chunk]),
        )
