"""One contract for the three implementations of the event rules.

The rules that turn events into sale counters, reservation statuses and holders are coded
three times: the pure fold (projections/fold.py), the PostgreSQL projection (the batch
applier in projections/batch.py) and Redis (the Lua scripts behind the gateway). The
scenarios below are written once, in ``EventRulesContract``, and run against each of them
by a subclass, so that the three cannot drift apart.

For the fold and PostgreSQL the scenario's commands become events, built here, that are
delivered in batches; ``DeliveryContract`` adds what a consumer group does to those
batches (redelivery, batches of several sales interleaved in another order). For Redis the
scenario's commands run the scripts through the gateway, and each outcome read from Redis
must also equal the fold of the events those scripts appended.
"""

from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

import core.events as ev
from core.gateway import RedisGateway
from core.keys import partition_of, partition_of_reservation
from projections.batch import project
from projections.entries import LogEntry
from projections.fold import SaleState, apply, fold
from projections.schema import migrate
from tests.helpers import open_sale, sale_counts, text

RELEASES = [("cancel", "cancelled"), ("expire", "expired")]
Terminal = ev.ReservationConfirmed | ev.ReservationCancelled | ev.ReservationExpired
T0 = datetime(2030, 1, 1, tzinfo=UTC)
GROUP = "contract"


@dataclass(frozen=True)
class Outcome:
    """What every implementation must agree on for one sale."""

    counters: dict[str, int]
    closed: bool
    statuses: dict[str, str]
    holders: dict[str, int]


def outcome_of_fold(sale: SaleState) -> Outcome:
    """The outcome as the fold tells it."""
    return Outcome(
        counters=sale.counters(),
        closed=sale.closed,
        statuses={rid: r.status for rid, r in sale.reservations.items()},
        holders=dict(sale.holders),
    )


# --------------------------------------------------------------------- implementations


class EventRules(ABC):
    """One implementation of the event rules, driven by the scenarios' commands."""

    partitions = 4

    @abstractmethod
    async def create(self, sale_id: str, stock: int, per_user_limit: int = 2) -> None: ...

    @abstractmethod
    async def place(self, sale_id: str, user: str, qty: int = 1) -> str:
        """Hold ``qty`` for ``user``; return the reservation id."""

    @abstractmethod
    async def confirm(self, rid: str) -> None: ...

    @abstractmethod
    async def cancel(self, rid: str) -> None: ...

    @abstractmethod
    async def expire(self, rid: str) -> None:
        """The reservation's hold time has passed."""

    @abstractmethod
    async def restock(self, sale_id: str, delta: int) -> None: ...

    @abstractmethod
    async def close(self, sale_id: str) -> None: ...

    @abstractmethod
    async def outcome(self, sale_id: str) -> Outcome: ...


@dataclass
class _Reservation:
    sale_id: str
    user: str
    qty: int


@dataclass
class LoggedRules(EventRules):
    """Builds the events a command appends; a subclass applies them in delivered batches."""

    log: list[LogEntry] = field(default_factory=list)
    delivered: int = 0
    reservations: dict[str, _Reservation] = field(default_factory=dict)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def append(self, event: ev.AnyEvent) -> None:
        n = next(self._seq)
        partition = partition_of(event.sale_id, self.partitions)
        self.log.append(LogEntry(partition, f"{1_900_000_000_000 + n}-0", event))

    def _base(self, sale_id: str) -> dict[str, object]:
        return {"event_id": f"evt-{len(self.log)}", "sale_id": sale_id, "occurred_at": T0}

    def _terminal(
        self,
        kind: type[ev.ReservationConfirmed | ev.ReservationCancelled | ev.ReservationExpired],
        rid: str,
    ) -> None:
        r = self.reservations[rid]
        self.append(
            kind.model_validate(
                self._base(r.sale_id) | {"reservation_id": rid, "user_id": r.user, "qty": r.qty}
            )
        )

    async def create(self, sale_id: str, stock: int, per_user_limit: int = 2) -> None:
        self.append(
            ev.SaleCreated.model_validate(
                self._base(sale_id)
                | {
                    "stock": stock,
                    "per_user_limit": per_user_limit,
                    "starts_at": T0,
                    "hold_seconds": 600,
                }
            )
        )

    async def place(self, sale_id: str, user: str, qty: int = 1) -> str:
        partition = partition_of(sale_id, self.partitions)
        rid = f"{partition}-r{len(self.reservations)}"
        self.reservations[rid] = _Reservation(sale_id, user, qty)
        self.append(
            ev.ReservationPlaced.model_validate(
                self._base(sale_id)
                | {
                    "reservation_id": rid,
                    "user_id": user,
                    "qty": qty,
                    "expires_at": T0 + timedelta(seconds=600),
                }
            )
        )
        return rid

    async def confirm(self, rid: str) -> None:
        self._terminal(ev.ReservationConfirmed, rid)

    async def cancel(self, rid: str) -> None:
        self._terminal(ev.ReservationCancelled, rid)

    async def expire(self, rid: str) -> None:
        self._terminal(ev.ReservationExpired, rid)

    async def restock(self, sale_id: str, delta: int) -> None:
        self.append(ev.StockAdjusted.model_validate(self._base(sale_id) | {"delta": delta}))

    async def close(self, sale_id: str) -> None:
        self.append(ev.SaleClosed.model_validate(self._base(sale_id)))

    @abstractmethod
    async def deliver(self, batch: list[LogEntry]) -> None:
        """Apply one delivered batch of entries."""

    async def flush(self) -> None:
        """Deliver what was appended since the last delivery, as one batch."""
        batch, self.delivered = self.log[self.delivered :], len(self.log)
        if batch:
            await self.deliver(batch)


class FoldRules(LoggedRules):
    """The pure fold, applying each delivered event in order."""

    def __init__(self) -> None:
        super().__init__()
        self.sales: dict[str, SaleState] = {}

    async def deliver(self, batch: list[LogEntry]) -> None:
        for entry in batch:
            apply(self.sales, entry.event)

    async def outcome(self, sale_id: str) -> Outcome:
        await self.flush()
        return outcome_of_fold(self.sales[sale_id])


class PostgresRules(LoggedRules):
    """The PostgreSQL projection: each batch archived, applied and checkpointed at once."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__()
        self.pool = pool

    async def deliver(self, batch: list[LogEntry]) -> None:
        async with self.pool.acquire() as conn:
            await project(conn, GROUP, batch)

    async def outcome(self, sale_id: str) -> Outcome:
        await self.flush()
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT stock, remaining, held, confirmed, released, closed FROM stock_view"
                " WHERE sale_id = $1",
                sale_id,
            )
            orders = await conn.fetch(
                "SELECT reservation_id, user_id, qty, status FROM orders WHERE sale_id = $1",
                sale_id,
            )
        assert row is not None
        holders: dict[str, int] = {}
        for o in orders:
            if o["status"] in ("pending", "confirmed"):
                holders[o["user_id"]] = holders.get(o["user_id"], 0) + o["qty"]
        return Outcome(
            counters={k: row[k] for k in ("stock", "remaining", "held", "confirmed", "released")},
            closed=row["closed"],
            statuses={o["reservation_id"]: o["status"] for o in orders},
            holders=holders,
        )


class RedisRules(EventRules):
    """The Lua scripts, run through the gateway on a real Redis."""

    def __init__(self, gateway: RedisGateway) -> None:
        self.gateway = gateway
        self.partitions = gateway.partitions
        self.placed: dict[str, list[str]] = {}

    async def create(self, sale_id: str, stock: int, per_user_limit: int = 2) -> None:
        await open_sale(self.gateway, sale_id, stock, per_user_limit, hold_seconds=600)

    async def place(self, sale_id: str, user: str, qty: int = 1) -> str:
        rid = (await self.gateway.reserve(sale_id, user, qty, None)).reservation_id
        self.placed.setdefault(sale_id, []).append(rid)
        return rid

    async def confirm(self, rid: str) -> None:
        assert await self.gateway.confirm(rid, None)

    async def cancel(self, rid: str) -> None:
        view = await self.gateway.get_reservation(rid)
        assert view is not None
        assert await self.gateway.cancel(rid, view.user_id)

    async def expire(self, rid: str) -> None:
        partition = partition_of_reservation(rid)
        assert partition is not None
        # Its deadline moved to the epoch: the hold time has passed, for this one alone.
        deadlines = self.gateway.keys_for_partition(partition).deadlines
        assert await self.gateway.client.zadd(deadlines, {rid: 0}, xx=True, ch=True) == 1
        assert await self.gateway.expire_due(partition) == (1, 0)

    async def restock(self, sale_id: str, delta: int) -> None:
        assert await self.gateway.adjust_stock(sale_id, delta, None)

    async def close(self, sale_id: str) -> None:
        assert await self.gateway.close_sale(sale_id)

    async def logged_events(self) -> list[ev.AnyEvent]:
        events: list[ev.AnyEvent] = []
        for stream in self.gateway.stream_names():
            for _, fields in await self.gateway.client.xrange(stream) or []:
                assert fields is not None
                events.append(ev.parse_event(fields[b"event"]))
        return events

    async def outcome(self, sale_id: str) -> Outcome:
        sale = await self.gateway.get_sale(sale_id)
        assert sale is not None
        statuses = {}
        for rid in self.placed.get(sale_id, []):
            view = await self.gateway.get_reservation(rid)
            assert view is not None
            statuses[rid] = str(view.status)
        keys = self.gateway.keys_for_sale(sale_id)
        raw = await self.gateway.client.hgetall(keys.holders(sale_id))
        closed = await self.gateway.client.hget(keys.sale(sale_id), "closed")
        found = Outcome(
            counters={
                "stock": sale.stock,
                "remaining": sale.remaining,
                "held": sale.held,
                "confirmed": sale.confirmed,
                "released": sale.released,
            },
            closed=closed is not None and text(closed) == "1",
            statuses=statuses,
            holders={text(user): int(qty) for user, qty in raw.items()},
        )
        # The scripts' own state and the events they appended tell the same story.
        assert outcome_of_fold(fold(await self.logged_events())[sale_id]) == found
        return found


# ----------------------------------------------------------------------------- scenarios


class EventRulesContract(ABC):
    """The scenarios every implementation of the event rules must pass alike."""

    @pytest.fixture
    @abstractmethod
    def rules(self) -> EventRules: ...

    async def test_a_new_sale_has_all_its_stock_remaining(self, rules: EventRules):
        await rules.create("s", 10)
        found = await rules.outcome("s")
        assert found == Outcome(sale_counts(10, 10, 0, 0, 0), False, {}, {})

    async def test_placing_holds_stock_for_the_buyer(self, rules: EventRules):
        await rules.create("s", 10)
        a = await rules.place("s", "ann", 2)
        b = await rules.place("s", "bob")
        found = await rules.outcome("s")
        assert found.counters == sale_counts(10, 7, 3, 0, 0)
        assert found.statuses == {a: "pending", b: "pending"}
        assert found.holders == {"ann": 2, "bob": 1}

    async def test_confirming_sells_the_held_units_and_keeps_the_holder(self, rules: EventRules):
        await rules.create("s", 10)
        a = await rules.place("s", "ann", 2)
        await rules.confirm(a)
        found = await rules.outcome("s")
        assert found.counters == sale_counts(10, 8, 0, 2, 0)
        assert found.statuses == {a: "confirmed"}
        assert found.holders == {"ann": 2}

    @pytest.mark.parametrize(
        ("release", "status"), [("cancel", "cancelled"), ("expire", "expired")]
    )
    async def test_cancelling_or_expiry_releases_stock_and_quota(
        self, rules: EventRules, release: str, status: str
    ):
        await rules.create("s", 10)
        a = await rules.place("s", "ann", 2)
        b = await rules.place("s", "bob")
        await getattr(rules, release)(a)
        found = await rules.outcome("s")
        assert found.counters == sale_counts(10, 9, 1, 0, 2)
        assert found.statuses == {a: status, b: "pending"}
        assert found.holders == {"bob": 1}

    async def test_released_units_can_be_held_again(self, rules: EventRules):
        await rules.create("s", 2, per_user_limit=2)
        a = await rules.place("s", "ann", 2)
        await rules.cancel(a)
        b = await rules.place("s", "ann", 1)
        c = await rules.place("s", "bob", 1)
        await rules.expire(c)
        found = await rules.outcome("s")
        assert found.counters == sale_counts(2, 1, 1, 0, 3)
        assert found.statuses == {a: "cancelled", b: "pending", c: "expired"}
        assert found.holders == {"ann": 1}

    async def test_restock_adds_and_removes_remaining_units(self, rules: EventRules):
        await rules.create("s", 5)
        a = await rules.place("s", "ann", 2)
        await rules.restock("s", 4)
        await rules.restock("s", -3)
        found = await rules.outcome("s")
        assert found.counters == sale_counts(6, 4, 2, 0, 0)
        assert found.statuses == {a: "pending"}

    async def test_closing_keeps_pending_reservations_payable(self, rules: EventRules):
        await rules.create("s", 5)
        a = await rules.place("s", "ann", 2)
        b = await rules.place("s", "bob")
        await rules.close("s")
        await rules.confirm(a)
        await rules.cancel(b)
        found = await rules.outcome("s")
        assert found == Outcome(
            sale_counts(5, 3, 0, 2, 1), True, {a: "confirmed", b: "cancelled"}, {"ann": 2}
        )

    async def test_a_whole_sale_ends_with_the_invariant_holding(self, rules: EventRules):
        await rules.create("s", 7, per_user_limit=3)
        placed = [await rules.place("s", f"u{i}", 1 + i % 3) for i in range(4)]  # 1+2+3+1
        await rules.confirm(placed[0])
        await rules.cancel(placed[1])
        await rules.expire(placed[2])
        await rules.restock("s", 2)
        last = await rules.place("s", "u1", 3)
        await rules.confirm(last)
        await rules.close("s")
        found = await rules.outcome("s")
        assert found.counters == sale_counts(9, 4, 1, 4, 5)
        c = found.counters
        assert c["remaining"] + c["held"] + c["confirmed"] == c["stock"]
        assert found.statuses == {
            placed[0]: "confirmed",
            placed[1]: "cancelled",
            placed[2]: "expired",
            placed[3]: "pending",
            last: "confirmed",
        }
        assert found.holders == {"u0": 1, "u3": 1, "u1": 3}
        assert found.closed

    async def test_sales_keep_to_themselves(self, rules: EventRules):
        await rules.create("a", 3)
        await rules.create("b", 4)
        x = await rules.place("a", "ann")
        y = await rules.place("b", "ann", 2)
        await rules.confirm(x)
        await rules.cancel(y)
        assert (await rules.outcome("a")).counters == sale_counts(3, 2, 0, 1, 0)
        assert (await rules.outcome("b")).counters == sale_counts(4, 4, 0, 0, 2)
        assert (await rules.outcome("a")).holders == {"ann": 1}
        assert (await rules.outcome("b")).holders == {}


class DeliveryContract(EventRulesContract):
    """Scenarios about delivery, for the implementations that consume the log in batches."""

    @pytest.fixture
    @abstractmethod
    def rules(self) -> LoggedRules: ...

    async def test_a_redelivered_batch_changes_nothing(self, rules: LoggedRules):
        await rules.create("s", 10)
        await rules.flush()
        a = await rules.place("s", "ann", 2)
        b = await rules.place("s", "bob")
        c = await rules.place("s", "cat")
        await rules.confirm(a)
        await rules.cancel(b)
        await rules.expire(c)
        batch = rules.log[rules.delivered :]
        await rules.flush()
        once = await rules.outcome("s")
        await rules.deliver(batch)  # a consumer that crashed before its ack gets it again
        await rules.deliver(batch[2:4])
        assert await rules.outcome("s") == once
        assert once.counters == sale_counts(10, 8, 0, 2, 2)
        assert once.statuses == {a: "confirmed", b: "cancelled", c: "expired"}

    @pytest.mark.parametrize("seed", range(5))
    async def test_sales_interleaved_in_another_order_end_the_same(
        self, rules: LoggedRules, seed: int
    ):
        """Each sale's events keep their order; how sales interleave and batch does not count."""
        script = FoldRules()  # the commands, recorded once, and the outcome in log order
        sales = ["a", "b", "c"]
        for sale_id in sales:
            await script.create(sale_id, 5)
        placed = [await script.place(s, f"u{i}", 1 + i % 2) for i, s in enumerate(sales * 2)]
        await script.confirm(placed[0])
        await script.cancel(placed[1])
        await script.expire(placed[2])
        await script.restock("a", 2)
        await script.close("b")
        expected = {s: await script.outcome(s) for s in sales}

        rng = random.Random(seed)
        queues = {s: [e for e in script.log if e.event.sale_id == s] for s in sales}
        shuffled: list[LogEntry] = []
        while any(queues.values()):
            s = rng.choice([s for s in sales if queues[s]])
            shuffled.append(queues[s].pop(0))
        while shuffled:
            size = rng.randint(1, 6)
            await rules.deliver(shuffled[:size])
            shuffled = shuffled[size:]
        assert {s: await rules.outcome(s) for s in sales} == expected


# ------------------------------------------------------------------------ the three


class TestFold(DeliveryContract):
    @pytest.fixture
    def rules(self) -> FoldRules:
        return FoldRules()


class TestPostgresProjection(DeliveryContract):
    @pytest.fixture
    async def rules(self, pool: asyncpg.Pool) -> PostgresRules:
        await migrate(pool)
        return PostgresRules(pool)


class TestRedisScripts(EventRulesContract):
    @pytest.fixture
    def rules(self, gateway: RedisGateway) -> RedisRules:
        return RedisRules(gateway)
