"""Views of reservations: place one, read it (or every one of a buyer in a sale), confirm or
cancel it. Redis answers first; a final reservation pruned from Redis is read from
PostgreSQL's ``orders``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from api.web.auth import buyer_id, is_admin
from api.web.openapi import Answer, Link, documented
from api.web.problems import from_error, problem
from api.web.requests import (
    idempotency_key_of,
    read_model,
    reservation_id_of,
    sale_id_of,
    validate,
)
from api.web.state import GATEWAY, INFLIGHT, METRICS, ORDERS_POOL, SETTINGS
from core.errors import (
    IdempotencyKeyReused,
    NotReplicated,
    RejectedError,
    ReservationClosed,
    ReservationNotFound,
    ReservationOutcomeUnknown,
    ReservationPastDeadline,
    SaleNotFound,
    SoldOut,
)
from core.models import MAX_QTY, ReservationStatus, ReservationView, Whole
from projections.tables.orders import final_order, final_orders_of


class ReservationRequest(BaseModel):
    """Body of POST /v1/sales/{sale_id}/reservations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    qty: Annotated[int, Whole(1, MAX_QTY)] = Field(default=1, examples=[1])


_RID = {"reservation_id": "$response.body#/reservation_id"}
# Where an answer naming a reservation leads.
RESERVATION_LINKS = {
    "GetReservation": Link("get_reservation", _RID),
    "Confirm": Link("confirm_reservation", _RID, "pay for it"),
    "Cancel": Link("cancel_reservation", _RID, "give its stock back"),
}


class ReservationChange(ReservationView):
    """The reservation after a confirm or cancel call."""

    changed: bool = Field(description="false when the call found the work already done")


class MyReservations(BaseModel):
    """Body of GET /v1/sales/{sale_id}/reservations/mine."""

    sale_id: str
    reservations: list[ReservationView] = Field(
        description="oldest first (placement time, then id), whatever their status,"
        " pruned ones included"
    )


class Placement(BaseModel):
    """Body of the 202 answer to a reservation (times serialized like every other view)."""

    model_config = ConfigDict(frozen=True)

    reservation_id: str
    status: ReservationStatus
    expires_at: datetime


@documented(
    "Hold stock for the payment window (buyer).",
    Answer(
        202,
        "reservation held",
        Placement,
        headers=("Location",),
        links={
            **RESERVATION_LINKS,
            "MyReservations": Link("my_reservations", {"sale_id": "$request.path.sale_id"}),
        },
    ),
    auth=("buyer",),
    body=ReservationRequest,
    body_required=False,
    idempotency_key="a repeat with the same key returns the same reservation",
    problems=(
        "sale_not_found",
        "reservation_not_found",
        "sold_out",
        "limit_reached",
        "sale_not_active",
        "idempotency_key_reused",
        "turned_away",
        "not_replicated",
        "unavailable",
    ),
    description="503 unavailable after Redis stayed silent: the problem carries the"
    " reservation_id that was tried (and a Location); look it up before trying again."
    " 503 not_replicated: the reservation stands; retry with the same Idempotency-Key.",
)
async def reserve(request: web.Request) -> web.Response:
    """POST /v1/sales/{sale_id}/reservations (buyer): hold stock for the payment window.

    A sale this process just saw sold out (even for one unit) is refused first, before
    auth and the body are read: the answer reveals nothing GET /v1/sales/{sale_id} does
    not, and in a flash sale it is the answer to almost every request. A request with an
    Idempotency-Key goes the whole way, since its retry must find the reservation it may
    already hold.
    """
    gateway = request.app[GATEWAY]
    metrics = request.app[METRICS]
    if "Idempotency-Key" not in request.headers and gateway.answers_sold_out(
        request.match_info["sale_id"]
    ):
        metrics.outcome(SoldOut.code).inc()
        return from_error(SoldOut())
    settings = request.app[SETTINGS]
    user_id = buyer_id(request, settings.jwt_secret)
    key = idempotency_key_of(request)
    sale_id = sale_id_of(request)
    body = (
        await read_model(request, ReservationRequest)
        if request.body_exists
        else validate(ReservationRequest, {})
    )
    inflight = request.app[INFLIGHT]
    if inflight[0] >= settings.max_inflight:
        metrics.outcome("turned_away").inc()
        response = problem(429, "turned_away", "Too many requests", "busy; retry shortly")
        response.headers["Retry-After"] = "1"
        return response
    inflight[0] += 1
    metrics.inflight.inc()
    try:
        placed = await gateway.reserve(sale_id, user_id, body.qty, key)
    except RejectedError as e:
        metrics.outcome(e.code).inc()
        raise
    except NotReplicated as e:
        # The reservation stands in Redis; a retry with the same Idempotency-Key finds it.
        metrics.outcome(e.code).inc()
        return from_error(e)
    except ReservationOutcomeUnknown as e:
        # Redis stayed silent after retries: the buyer looks this id up before trying again.
        metrics.outcome(e.code).inc()
        title = "Service temporarily unavailable"
        response = problem(503, e.code, title, str(e), reservation_id=e.reservation_id)
        response.headers["Retry-After"] = "1"
        response.headers["Location"] = f"/v1/reservations/{e.reservation_id}"
        return response
    finally:
        inflight[0] -= 1
        metrics.inflight.dec()
    if placed.replayed:
        metrics.outcome("replayed").inc()
        # Redis's view of it, read with the placement; else, once final and pruned, orders'.
        view = placed.view or await find_reservation(request.app, placed.reservation_id)
        if view is None:
            raise ReservationNotFound("the reservation of this Idempotency-Key is gone")
        if view.qty != body.qty or view.sale_id != sale_id:
            raise IdempotencyKeyReused("this Idempotency-Key was used for another request")
        text = Placement(
            reservation_id=placed.reservation_id, status=view.status, expires_at=view.expires_at
        ).model_dump_json()
    else:
        metrics.outcome("placed").inc()
        assert placed.expires_at is not None, "a new placement always has a deadline"
        text = placement_json(placed.reservation_id, placed.expires_at)
    return web.Response(
        text=text,
        status=202,
        content_type="application/json",
        headers={"Location": f"/v1/reservations/{placed.reservation_id}"},
    )


def placement_json(reservation_id: str, expires_at: datetime) -> str:
    """The 202 body of a new placement, as ``Placement`` serializes it, written directly:
    the purchase path's answer needs no model. The id is ours (digits, a dash, hex) and
    the deadline a UTC time, so nothing needs escaping."""
    deadline = expires_at.isoformat().replace("+00:00", "Z")
    return f'{{"reservation_id":"{reservation_id}","status":"pending","expires_at":"{deadline}"}}'


async def find_reservation(app: web.Application, rid: str) -> ReservationView | None:
    """A reservation as Redis holds it, else, once final and pruned from Redis, as
    PostgreSQL's ``orders`` holds it; None when neither knows it."""
    view = await app[GATEWAY].get_reservation(rid)
    pool = app.get(ORDERS_POOL)
    if view is None and pool is not None:
        view = await final_order(pool, rid)
    return view


@documented(
    "A reservation (its buyer, or an admin).",
    Answer(200, "the reservation", ReservationView, links=RESERVATION_LINKS),
    auth=("buyer", "admin"),
    problems=("reservation_not_found", "unavailable"),
)
async def get_reservation(request: web.Request) -> web.Response:
    """GET /v1/reservations/{reservation_id}: its buyer (or an admin) reads it."""
    settings = request.app[SETTINGS]
    admin = is_admin(request, settings.admin_token)
    user_id = None if admin else buyer_id(request, settings.jwt_secret)
    rid = reservation_id_of(request)
    view = await find_reservation(request.app, rid)
    if view is None or (user_id is not None and view.user_id != user_id):
        raise ReservationNotFound(f"no reservation {rid[:80]!r} of yours")
    return web.json_response(view.model_dump(mode="json"))


async def reservations_of(
    app: web.Application, sale_id: str, user_id: str
) -> list[ReservationView] | None:
    """Every reservation ``user_id`` placed in ``sale_id``, oldest first: Redis's, and the
    final ones pruned from it as PostgreSQL's ``orders`` holds them (Redis's view wins for
    an id both hold); None when the sale does not exist. ``InfrastructureError`` when
    PostgreSQL is out of reach: only it can say what was pruned."""
    placed = await app[GATEWAY].placed_reservations(sale_id, user_id)
    pool = app.get(ORDERS_POOL)
    if placed is None or pool is None:
        return None if placed is None else [view for _, view in placed]
    # Read after Redis: a reservation pruned since then was final and projected before it
    # left Redis, so orders holds it; one placed since then is pending and left out.
    in_redis = {view.reservation_id for _, view in placed}
    pruned = [
        pair
        for pair in await final_orders_of(pool, sale_id, user_id)
        if pair[1].reservation_id not in in_redis
    ]
    merged = sorted([*placed, *pruned], key=lambda pair: (pair[0], pair[1].reservation_id))
    return [view for _, view in merged]


@documented(
    "The caller's reservations in a sale, whatever their status (buyer).",
    Answer(
        200,
        "the buyer's reservations",
        MyReservations,
    ),
    auth=("buyer",),
    problems=("sale_not_found", "unavailable"),
    description="Redis's reservations merged with the final ones already pruned from it,"
    " read from PostgreSQL's orders (Redis's view wins for an id in both), oldest first."
    " 503 unavailable while PostgreSQL is out of reach: only it can say which were"
    " pruned, and a partial list would look complete.",
)
async def my_reservations(request: web.Request) -> web.Response:
    """GET /v1/sales/{sale_id}/reservations/mine (buyer): every reservation the buyer placed
    in the sale, whatever its status, oldest first, pruned ones included; how a buyer whose
    answer was lost finds out what they hold."""
    user_id = buyer_id(request, request.app[SETTINGS].jwt_secret)
    sale_id = sale_id_of(request)
    views = await reservations_of(request.app, sale_id, user_id)
    if views is None:
        raise SaleNotFound(f"no sale {sale_id!r}")
    return web.json_response(
        {"sale_id": sale_id, "reservations": [v.model_dump(mode="json") for v in views]}
    )


async def _reservation_answer(request: web.Request, rid: str, changed: bool) -> web.Response:
    view = await find_reservation(request.app, rid)
    if view is None:  # pragma: no cover - final reservations stay in orders
        raise ReservationNotFound(f"no reservation {rid[:80]!r}")
    return web.json_response(view.model_dump(mode="json") | {"changed": changed})


async def _pruned_transition(
    request: web.Request, rid: str, user_id: str | None, wanted: ReservationStatus
) -> bool:
    """Answer a confirm/cancel of a reservation Redis does not know as its script would have
    answered before the reservation was pruned: False when it already is ``wanted``,
    ``ReservationPastDeadline`` or ``ReservationClosed`` for another final state, and
    ``ReservationNotFound`` when ``orders`` has no final reservation of this buyer either."""
    view = await find_reservation(request.app, rid)
    mine = view is not None and (user_id is None or view.user_id == user_id)
    if view is None or not mine or view.status == "pending":
        raise ReservationNotFound(f"no reservation {rid[:80]!r} of yours")
    if view.status == wanted:
        return False
    if view.status == "expired":
        raise ReservationPastDeadline()
    raise ReservationClosed()


@documented(
    "Pay for a pending reservation (its buyer, or an admin).",
    Answer(200, "confirmed (changed: false if it was)", ReservationChange),
    auth=("buyer", "admin"),
    problems=(
        "reservation_not_found",
        "reservation_expired",
        "reservation_closed",
        "not_replicated",
        "unavailable",
    ),
    description="503 not_replicated (FLASHSALE_WAIT_REPLICAS): the payment is recorded,"
    " but too few replicas acknowledged it in time; repeating the same request is safe"
    " (it pays once) and answers 200 once they have it.",
)
async def confirm_reservation(request: web.Request) -> web.Response:
    """POST /v1/reservations/{reservation_id}/confirm: its buyer (or an admin) pays."""
    settings = request.app[SETTINGS]
    admin = is_admin(request, settings.admin_token)
    user_id = None if admin else buyer_id(request, settings.jwt_secret)
    rid = reservation_id_of(request)
    try:
        changed = await request.app[GATEWAY].confirm(rid, user_id)
    except ReservationNotFound:
        changed = await _pruned_transition(request, rid, user_id, "confirmed")
    except NotReplicated as e:  # paid on the primary; the same request again is safe
        request.app[METRICS].transitions.labels(e.code).inc()
        return from_error(e)
    request.app[METRICS].transitions.labels("confirmed" if changed else "unchanged").inc()
    return await _reservation_answer(request, rid, changed)


@documented(
    "Give a pending reservation's stock back (its buyer).",
    Answer(200, "cancelled (changed: false if it was)", ReservationChange),
    auth=("buyer",),
    problems=(
        "reservation_not_found",
        "reservation_expired",
        "reservation_closed",
        "not_replicated",
        "unavailable",
    ),
    description="503 not_replicated (FLASHSALE_WAIT_REPLICAS): the cancellation is"
    " recorded and the stock is back, but too few replicas acknowledged it in time;"
    " repeating the same request is safe (it cancels once) and answers 200 once they have"
    " it.",
)
async def cancel_reservation(request: web.Request) -> web.Response:
    """POST /v1/reservations/{reservation_id}/cancel: its buyer gives the stock back."""
    user_id = buyer_id(request, request.app[SETTINGS].jwt_secret)
    rid = reservation_id_of(request)
    try:
        changed = await request.app[GATEWAY].cancel(rid, user_id)
    except ReservationNotFound:
        changed = await _pruned_transition(request, rid, user_id, "cancelled")
    except NotReplicated as e:  # cancelled on the primary; the same request again is safe
        request.app[METRICS].transitions.labels(e.code).inc()
        return from_error(e)
    request.app[METRICS].transitions.labels("cancelled" if changed else "unchanged").inc()
    return await _reservation_answer(request, rid, changed)
