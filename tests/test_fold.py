"""The fold and the projector's stock deltas: pure functions, no servers."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest

from core.events import (
    AnyEvent,
    ReservationCancelled,
    ReservationConfirmed,
    ReservationExpired,
    ReservationPlaced,
    SaleClosed,
    SaleCreated,
    StockAdjusted,
)
from projections.batch import stock_deltas
from projections.fold import SaleState, fold
from projections.tables.stock_view import StockDelta

T0 = datetime(2030, 1, 1, tzinfo=UTC)
_ids = itertools.count()


def _eid() -> str:
    return f"evt-{next(_ids)}"


def created(sale_id: str = "s", stock: int = 10, limit: int = 2) -> SaleCreated:
    return SaleCreated(
        event_id=_eid(),
        sale_id=sale_id,
        occurred_at=T0,
        stock=stock,
        per_user_limit=limit,
        starts_at=T0,
        hold_seconds=60,
    )


def placed(rid: str, user: str = "u1", qty: int = 1, sale_id: str = "s") -> ReservationPlaced:
    return ReservationPlaced(
        event_id=_eid(),
        sale_id=sale_id,
        occurred_at=T0,
        reservation_id=rid,
        user_id=user,
        qty=qty,
        expires_at=T0 + timedelta(seconds=60),
    )


def confirmed(rid: str, user: str = "u1", qty: int = 1, sale_id: str = "s") -> ReservationConfirmed:
    return ReservationConfirmed(
        event_id=_eid(), sale_id=sale_id, occurred_at=T0, reservation_id=rid, user_id=user, qty=qty
    )


def cancelled(rid: str, user: str = "u1", qty: int = 1, sale_id: str = "s") -> ReservationCancelled:
    return ReservationCancelled(
        event_id=_eid(), sale_id=sale_id, occurred_at=T0, reservation_id=rid, user_id=user, qty=qty
    )


def expired(rid: str, user: str = "u1", qty: int = 1, sale_id: str = "s") -> ReservationExpired:
    return ReservationExpired(
        event_id=_eid(), sale_id=sale_id, occurred_at=T0, reservation_id=rid, user_id=user, qty=qty
    )


def adjusted(delta: int, sale_id: str = "s") -> StockAdjusted:
    return StockAdjusted(event_id=_eid(), sale_id=sale_id, occurred_at=T0, delta=delta)


def only(sales: dict[str, SaleState], sale_id: str = "s") -> SaleState:
    assert list(sales) == [sale_id]
    return sales[sale_id]


# --- fold: the happy paths ------------------------------------------------------------------


def test_sale_created_sets_stock_and_rules():
    sale = only(fold([created(stock=7, limit=3)]))
    assert sale.counters() == {"stock": 7, "remaining": 7, "held": 0, "confirmed": 0, "released": 0}
    assert (sale.per_user_limit, sale.hold_seconds, sale.created) == (3, 60, True)
    assert sale.invariant_violations() == []


def test_placement_holds_stock_for_the_user():
    sale = only(fold([created(stock=10), placed("r1", "alice", 2), placed("r2", "bob", 1)]))
    assert (sale.remaining, sale.held, sale.confirmed, sale.released) == (7, 3, 0, 0)
    assert sale.holders == {"alice": 2, "bob": 1}
    r1 = sale.reservations["r1"]
    assert (r1.status, r1.qty, r1.user_id, r1.expires_at) == (
        "pending",
        2,
        "alice",
        T0 + timedelta(seconds=60),
    )
    assert sale.invariant_violations() == []


def test_confirm_moves_held_to_confirmed_and_keeps_the_quota_used():
    sale = only(fold([created(stock=10), placed("r1", "alice", 2), confirmed("r1", "alice", 2)]))
    assert (sale.remaining, sale.held, sale.confirmed, sale.released) == (8, 0, 2, 0)
    assert sale.reservations["r1"].status == "confirmed"
    assert sale.holders == {"alice": 2}  # bought still counts against the per-user limit
    assert sale.invariant_violations() == []


@pytest.mark.parametrize(("release", "status"), [(cancelled, "cancelled"), (expired, "expired")])
def test_cancel_and_expiry_return_stock_and_quota(release, status):
    sale = only(fold([created(stock=10), placed("r1", "alice", 2), release("r1", "alice", 2)]))
    assert (sale.remaining, sale.held, sale.confirmed, sale.released) == (10, 0, 0, 2)
    assert sale.reservations["r1"].status == status
    assert "alice" not in sale.holders
    assert sale.invariant_violations() == []


def test_partial_release_keeps_the_rest_of_the_users_quota():
    sale = only(
        fold(
            [
                created(stock=10, limit=3),
                placed("r1", "alice", 2),
                placed("r2", "alice", 1),
                cancelled("r1", "alice", 2),
            ]
        )
    )
    assert sale.holders == {"alice": 1}
    assert (sale.remaining, sale.held, sale.released) == (9, 1, 2)


def test_stock_adjustments_move_stock_and_remaining():
    sale = only(fold([created(stock=5), adjusted(+3), placed("r1"), adjusted(-2)]))
    assert (sale.stock, sale.remaining, sale.held) == (6, 5, 1)
    assert sale.invariant_violations() == []


def test_sale_closed_only_closes():
    closed = SaleClosed(event_id=_eid(), sale_id="s", occurred_at=T0)
    sale = only(fold([created(stock=5), closed]))
    assert sale.closed and sale.counters()["remaining"] == 5


def test_sales_are_folded_independently():
    sales = fold([created("a", 3), created("b", 4), placed("ra", sale_id="a"), adjusted(1, "b")])
    assert sales["a"].counters()["remaining"] == 2
    assert sales["b"].counters() == {
        "stock": 5,
        "remaining": 5,
        "held": 0,
        "confirmed": 0,
        "released": 0,
    }


# --- fold: invariant violations are reported, not hidden ------------------------------------


def test_negative_remaining_is_reported():
    sale = only(fold([created(stock=1, limit=5), placed("r1", "u1", 1), placed("r2", "u2", 1)]))
    assert sale.remaining == -1
    assert any("remaining is negative" in p for p in sale.invariant_violations())


def test_withdrawing_more_than_unsold_stock_is_reported():
    sale = only(fold([created(stock=2), placed("r1"), adjusted(-2)]))
    assert any("remaining is negative (-1)" in p for p in sale.invariant_violations())


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (confirmed, confirmed),
        (confirmed, cancelled),
        (cancelled, confirmed),
        (expired, confirmed),
        (cancelled, expired),
    ],
)
def test_double_terminal_is_reported_and_not_applied_twice(first, second):
    sale = only(fold([created(stock=10), placed("r1"), first("r1"), second("r1")]))
    once = only(fold([created(stock=10), placed("r1"), first("r1")]))
    late = second("r1").type
    problems = sale.invariant_violations()
    assert f"{late} for {once.reservations['r1'].status} reservation r1" in problems, problems
    # The second terminal event changes nothing: the first one stands.
    assert sale.counters() == once.counters()
    assert sale.reservations["r1"].status == once.reservations["r1"].status


def test_terminal_for_unknown_reservation_is_reported():
    sale = only(fold([created(stock=10), confirmed("ghost")]))
    assert any("unknown reservation ghost" in p for p in sale.invariant_violations())
    assert sale.counters()["confirmed"] == 0


def test_reservation_placed_twice_is_reported_and_counted_once():
    event = placed("r1")
    sale = only(fold([created(stock=10), event, placed("r1")]))
    assert any("placed twice" in p for p in sale.invariant_violations())
    assert (sale.remaining, sale.held) == (9, 1)


def test_sale_created_twice_is_reported():
    sale = only(fold([created(stock=10), created(stock=10)]))
    assert any("SaleCreated twice" in p for p in sale.invariant_violations())


def test_over_limit_holder_is_reported():
    sale = only(
        fold([created(stock=10, limit=2), placed("r1", "greedy", 2), placed("r2", "greedy", 1)])
    )
    assert any("user greedy holds 3 > limit 2" in p for p in sale.invariant_violations()), (
        sale.invariant_violations()
    )


def test_confirmed_purchases_count_against_the_limit():
    events: list[AnyEvent] = [
        created(stock=10, limit=1),
        placed("r1", "u", 1),
        confirmed("r1", "u", 1),
        placed("r2", "u", 1),
    ]
    assert any("user u holds 2 > limit 1" in p for p in only(fold(events)).invariant_violations())


def test_conservation_breach_is_reported():
    sale = only(fold([created(stock=10), placed("r1")]))
    sale.held += 1  # state that no log could produce
    assert any("!= stock" in p for p in sale.invariant_violations())


# --- stock_deltas: what the projector adds to stock_view ------------------------------------


def _sum(deltas: dict[str, StockDelta]) -> dict[str, tuple[int, int, int, int, int]]:
    return {k: (d.stock, d.remaining, d.held, d.confirmed, d.released) for k, d in deltas.items()}


def test_deltas_of_each_event_kind():
    create = created(stock=10, limit=2)
    deltas = stock_deltas([create])
    assert _sum(deltas) == {"s": (10, 10, 0, 0, 0)} and deltas["s"].created == create
    assert _sum(stock_deltas([placed("r1", qty=2)])) == {"s": (0, -2, 2, 0, 0)}
    assert _sum(stock_deltas([confirmed("r1", qty=2)])) == {"s": (0, 0, -2, 2, 0)}
    assert _sum(stock_deltas([cancelled("r1", qty=2)])) == {"s": (0, 2, -2, 0, 2)}
    assert _sum(stock_deltas([expired("r1", qty=2)])) == {"s": (0, 2, -2, 0, 2)}
    assert _sum(stock_deltas([adjusted(-3)])) == {"s": (-3, -3, 0, 0, 0)}
    closed = stock_deltas([SaleClosed(event_id=_eid(), sale_id="s", occurred_at=T0)])
    assert _sum(closed) == {"s": (0, 0, 0, 0, 0)} and closed["s"].closed
    assert stock_deltas([]) == {}


def _history() -> list[AnyEvent]:
    return [
        created("a", 10, 3),
        created("b", 5, 1),
        placed("a1", "u1", 2, "a"),
        placed("a2", "u2", 1, "a"),
        placed("a3", "u3", 3, "a"),
        placed("b1", "u1", 1, "b"),
        confirmed("a1", "u1", 2, "a"),
        cancelled("a2", "u2", 1, "a"),
        expired("b1", "u1", 1, "b"),
        adjusted(4, "a"),
        adjusted(-1, "b"),
    ]


def test_deltas_in_any_order_sum_to_the_fold():
    history = _history()
    folded = fold(history)
    expected = {sale_id: tuple(state.counters().values()) for sale_id, state in folded.items()}
    rng = random.Random(7)
    for _ in range(20):
        shuffled = history[:]
        rng.shuffle(shuffled)
        assert _sum(stock_deltas(shuffled)) == expected


def test_deltas_split_across_batches_add_up():
    history = _history()
    totals: dict[str, list[int]] = {}
    for cut in (history[:4], history[4:7], history[7:]):
        for sale_id, values in _sum(stock_deltas(cut)).items():
            acc = totals.setdefault(sale_id, [0] * 5)
            for i, v in enumerate(values):
                acc[i] += v
    assert {k: tuple(v) for k, v in totals.items()} == _sum(stock_deltas(history))
