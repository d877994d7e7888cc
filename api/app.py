"""The aiohttp application. Views are thin: parse, call the gateway, map errors."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.auth import AuthError, buyer_id, is_admin, require_admin
from api.connections import postgres_pool_for, redis_client_for
from api.metrics import ApiMetrics
from api.openapi import SPEC
from api.problems import from_error, problem
from consumers.health import CachedHealth
from core.errors import (
    FlashsaleError,
    IdempotencyKeyReused,
    InfrastructureError,
    NotReplicated,
    RejectedError,
    ReservationClosed,
    ReservationExpired,
    ReservationNotFound,
    ReservationOutcomeUnknown,
    SaleNotFound,
)
from core.gateway import RedisGateway
from core.models import MAX_STOCK, SALE_ID_PATTERN, NewSale, ReservationStatus, ReservationView
from core.settings import Settings
from projections.orders import final_order, final_orders_of

log = structlog.get_logger(__name__)

SETTINGS = web.AppKey("settings", Settings)
GATEWAY = web.AppKey("gateway", RedisGateway)
METRICS = web.AppKey("metrics", ApiMetrics)
INFLIGHT = web.AppKey("inflight", list)
HEALTH = web.AppKey("health", CachedHealth)
ORDERS_POOL = web.AppKey("orders_pool", asyncpg.Pool)
# Connections to PostgreSQL per API process: only reads of pruned reservations use them.
ORDERS_POOL_SIZE = 2

IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
SALE_ID = re.compile(SALE_ID_PATTERN)
RESERVATION_ID = re.compile(r"^[0-9]{1,4}-[A-Za-z0-9]{1,128}$")
# Times travel as epoch milliseconds and are read back with datetime.fromtimestamp, so a sale
# must start and end inside the years that round trip.
M = TypeVar("M", bound=BaseModel)


class ReservationRequest(BaseModel):
    """Body of POST /v1/sales/{sale_id}/reservations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    qty: int = Field(default=1, ge=1, le=10_000, strict=True)


class Placement(BaseModel):
    """Body of the 202 answer to a reservation (times serialized like every other view)."""

    model_config = ConfigDict(frozen=True)

    reservation_id: str
    status: ReservationStatus
    expires_at: datetime


class BadRequest(Exception):
    """The request body or a parameter is malformed (400/422)."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, or a 400/413/415 ``BadRequest``."""
    if request.content_type != "application/json":
        raise BadRequest(415, "unsupported_media_type", "send the body as application/json")
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, "malformed_json", f"body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise BadRequest(400, "malformed_json", "body is nested too deeply") from e


def validate(model: type[M], data: Any) -> M:
    """Validate ``data`` into ``model`` or raise a 422 ``BadRequest`` listing the errors."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = [
            {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
            for err in e.errors(include_url=False, include_context=False, include_input=False)
        ]
        raise BadRequest(422, "invalid_body", "the body failed validation", errors=errors) from e


def sale_id_of(request: web.Request) -> str:
    """The ``sale_id`` path parameter; an id that cannot exist is simply not found."""
    sale_id = request.match_info["sale_id"]
    if not SALE_ID.fullmatch(sale_id):
        raise SaleNotFound(f"no sale {sale_id[:80]!r}")
    return sale_id


def reservation_id_of(request: web.Request) -> str:
    """The ``reservation_id`` path parameter; an id that cannot exist is simply not found."""
    rid = request.match_info["reservation_id"]
    if not RESERVATION_ID.fullmatch(rid):
        raise ReservationNotFound(f"no reservation {rid[:80]!r} of yours")
    return rid


def idempotency_key_of(request: web.Request) -> str | None:
    """The optional ``Idempotency-Key`` header, or a 400 ``BadRequest`` if malformed."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequest(400, "bad_idempotency_key", "Idempotency-Key: 1-128 of [A-Za-z0-9_.:-]")
    return key


@web.middleware
async def problems_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn every error into problem+json and record request metrics."""
    metrics = request.app[METRICS]
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except RejectedError as e:
        response = from_error(e)
    except FlashsaleError as e:
        log.warning("request_failed", path=request.path, error=str(e))
        response = from_error(e)
    except BadRequest as e:
        title = e.code.replace("_", " ").capitalize()
        response = problem(e.status, e.code, title, e.detail, **e.extra)
    except AuthError as e:
        code = "unauthorized" if e.status == 401 else "forbidden"
        response = problem(e.status, code, code.capitalize(), e.detail)
        if e.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="flashsale"'
    except web.HTTPRequestEntityTooLarge as e:
        response = problem(413, "body_too_large", "Request body too large", e.text or "")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = (e.reason or "error").lower().replace(" ", "_")
        response = problem(e.status, code, e.reason or "Error", e.text or e.reason or "")
        for name in ("Allow",):
            if name in e.headers:
                response.headers[name] = e.headers[name]
    except Exception:
        log.exception("unhandled_error", path=request.path, method=request.method)
        response = problem(500, "internal_error", "Internal error", "unexpected server error")
    metrics.requests.labels(route_name, str(response.status)).inc()
    metrics.latency.labels(route_name).observe(time.perf_counter() - started)
    return response


async def create_sale(request: web.Request) -> web.Response:
    """POST /v1/sales (admin): open a sale."""
    require_admin(request, request.app[SETTINGS].admin_token)
    sale = validate(NewSale, await read_json(request))
    view = await request.app[GATEWAY].create_sale(sale)
    return web.json_response(
        view.model_dump(mode="json"),
        status=201,
        headers={"Location": f"/v1/sales/{sale.sale_id}"},
    )


async def get_sale(request: web.Request) -> web.Response:
    """GET /v1/sales/{sale_id}: public counters and status."""
    sale_id = sale_id_of(request)
    view = await request.app[GATEWAY].get_sale(sale_id)
    if view is None:
        raise SaleNotFound(f"no sale {sale_id!r}")
    return web.json_response(view.model_dump(mode="json"))


async def reserve(request: web.Request) -> web.Response:
    """POST /v1/sales/{sale_id}/reservations (buyer): hold stock for the payment window."""
    settings = request.app[SETTINGS]
    metrics = request.app[METRICS]
    user_id = buyer_id(request, settings.jwt_secret)
    key = idempotency_key_of(request)
    sale_id = sale_id_of(request)
    body = validate(ReservationRequest, await read_json(request) if request.body_exists else {})
    inflight = request.app[INFLIGHT]
    if inflight[0] >= settings.max_inflight:
        metrics.reservations.labels("turned_away").inc()
        response = problem(429, "turned_away", "Too many requests", "busy; retry shortly")
        response.headers["Retry-After"] = "1"
        return response
    inflight[0] += 1
    metrics.inflight.inc()
    try:
        placed = await request.app[GATEWAY].reserve(sale_id, user_id, body.qty, key)
    except RejectedError as e:
        metrics.reservations.labels(e.code).inc()
        raise
    except NotReplicated as e:
        # The reservation stands in Redis; a retry with the same Idempotency-Key finds it.
        metrics.reservations.labels(e.code).inc()
        response = problem(503, e.code, "Not replicated", str(e), reservation_id=e.reservation_id)
        response.headers["Retry-After"] = "1"
        response.headers["Location"] = f"/v1/reservations/{e.reservation_id}"
        return response
    except ReservationOutcomeUnknown as e:
        # Redis stayed silent after retries: the buyer looks this id up before trying again.
        metrics.reservations.labels(e.code).inc()
        title = "Service temporarily unavailable"
        response = problem(503, e.code, title, str(e), reservation_id=e.reservation_id)
        response.headers["Retry-After"] = "1"
        response.headers["Location"] = f"/v1/reservations/{e.reservation_id}"
        return response
    finally:
        inflight[0] -= 1
        metrics.inflight.dec()
    if placed.replayed:
        metrics.reservations.labels("replayed").inc()
        # Redis's view of it, read with the placement; else, once final and pruned, orders'.
        view = placed.view or await find_reservation(request.app, placed.reservation_id)
        if view is None:
            raise ReservationNotFound("the reservation of this Idempotency-Key is gone")
        if view.qty != body.qty or view.sale_id != sale_id:
            raise IdempotencyKeyReused("this Idempotency-Key was used for another request")
        answer = Placement(
            reservation_id=placed.reservation_id, status=view.status, expires_at=view.expires_at
        )
    else:
        metrics.reservations.labels("placed").inc()
        assert placed.expires_at is not None, "a new placement always has a deadline"
        answer = Placement(
            reservation_id=placed.reservation_id, status="pending", expires_at=placed.expires_at
        )
    return web.json_response(
        answer.model_dump(mode="json"),
        status=202,
        headers={"Location": f"/v1/reservations/{placed.reservation_id}"},
    )


async def find_reservation(app: web.Application, rid: str) -> ReservationView | None:
    """A reservation as Redis holds it, else, once final and pruned from Redis, as
    PostgreSQL's ``orders`` holds it; None when neither knows it."""
    view = await app[GATEWAY].get_reservation(rid)
    pool = app.get(ORDERS_POOL)
    if view is None and pool is not None:
        view = await final_order(pool, rid)
    return view


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
    ``ReservationExpired`` or ``ReservationClosed`` for another final state, and
    ``ReservationNotFound`` when ``orders`` has no final reservation of this buyer either."""
    view = await find_reservation(request.app, rid)
    mine = view is not None and (user_id is None or view.user_id == user_id)
    if view is None or not mine or view.status == "pending":
        raise ReservationNotFound(f"no reservation {rid[:80]!r} of yours")
    if view.status == wanted:
        return False
    if view.status == "expired":
        raise ReservationExpired()
    raise ReservationClosed()


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
    request.app[METRICS].transitions.labels("confirmed" if changed else "unchanged").inc()
    return await _reservation_answer(request, rid, changed)


async def cancel_reservation(request: web.Request) -> web.Response:
    """POST /v1/reservations/{reservation_id}/cancel: its buyer gives the stock back."""
    user_id = buyer_id(request, request.app[SETTINGS].jwt_secret)
    rid = reservation_id_of(request)
    try:
        changed = await request.app[GATEWAY].cancel(rid, user_id)
    except ReservationNotFound:
        changed = await _pruned_transition(request, rid, user_id, "cancelled")
    request.app[METRICS].transitions.labels("cancelled" if changed else "unchanged").inc()
    return await _reservation_answer(request, rid, changed)


class StockRequest(BaseModel):
    """Body of POST /v1/sales/{sale_id}/stock."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delta: int = Field(ge=-MAX_STOCK, le=MAX_STOCK, strict=True)


async def _sale_answer(request: web.Request, sale_id: str, changed: bool) -> web.Response:
    view = await request.app[GATEWAY].get_sale(sale_id)
    if view is None:  # pragma: no cover - sales are never deleted
        raise SaleNotFound(f"no sale {sale_id!r}")
    return web.json_response(view.model_dump(mode="json") | {"changed": changed})


async def adjust_stock(request: web.Request) -> web.Response:
    """POST /v1/sales/{sale_id}/stock (admin): restock, or withdraw unsold stock."""
    require_admin(request, request.app[SETTINGS].admin_token)
    sale_id = sale_id_of(request)
    key = idempotency_key_of(request)
    body = validate(StockRequest, await read_json(request))
    if body.delta == 0:
        raise BadRequest(422, "invalid_body", "delta must not be 0")
    changed = await request.app[GATEWAY].adjust_stock(sale_id, body.delta, key)
    return await _sale_answer(request, sale_id, changed)


async def close_sale(request: web.Request) -> web.Response:
    """POST /v1/sales/{sale_id}/close (admin): stop taking reservations now."""
    require_admin(request, request.app[SETTINGS].admin_token)
    sale_id = sale_id_of(request)
    changed = await request.app[GATEWAY].close_sale(sale_id)
    return await _sale_answer(request, sale_id, changed)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers (purchases need nothing else)."""
    if await request.app[GATEWAY].ping():
        return web.json_response({"status": "ready", "redis": "ok"})
    return problem(503, "not_ready", "Not ready", "redis does not answer")


async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus text exposition; consumer lag and dead letters as last read (see
    ``FLASHSALE_METRICS_HEALTH_INTERVAL_MS``)."""
    request.app[METRICS].observe_consumers(await request.app[HEALTH].get())
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def health_ctx(app: web.Application) -> AsyncIterator[None]:
    """Consumer health for /metrics, on a one-connection Redis client of its own."""
    settings = app[SETTINGS]
    client = redis_client_for(settings, pool_size=1, name="flashsale-metrics")
    interval = settings.metrics_health_interval_ms / 1000
    app[HEALTH] = CachedHealth(client, settings.partitions, interval)
    yield
    await client.aclose()


async def openapi_view(request: web.Request) -> web.Response:
    """The OpenAPI document of this API."""
    return web.json_response(SPEC)


def create_app(settings: Settings, client: aioredis.Redis | None = None) -> web.Application:
    """Build the app; it opens (or borrows) its Redis client in ``cleanup_ctx``."""
    app = web.Application(
        middlewares=[problems_middleware], client_max_size=settings.max_body_bytes
    )
    app[SETTINGS] = settings
    app[METRICS] = ApiMetrics()
    app[INFLIGHT] = [0]

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        own = client is None
        redis_client = client or redis_client_for(settings)
        gateway = RedisGateway(
            redis_client,
            settings.partitions,
            settings.idempotency_ttl_seconds,
            sold_out_hint_seconds=settings.sold_out_hint_ms / 1000,
            wait_replicas=settings.wait_replicas,
            wait_timeout_ms=settings.wait_timeout_ms,
        )
        try:
            await gateway.load_scripts()
        except InfrastructureError as e:
            # Not fatal: /readyz reports Redis, and scripts load on first use anyway.
            log.warning("scripts_not_loaded", error=str(e))
        app[GATEWAY] = gateway
        yield
        if own:
            await redis_client.aclose()

    async def orders_ctx(app: web.Application) -> AsyncIterator[None]:
        # Off the purchase path: only reads of reservations pruned from Redis use it.
        if settings.database_url is None:
            yield
            return
        pool = await postgres_pool_for(settings, ORDERS_POOL_SIZE)
        app[ORDERS_POOL] = pool
        yield
        await pool.close()

    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(health_ctx)
    app.cleanup_ctx.append(orders_ctx)
    app.router.add_post("/v1/sales", create_sale)
    app.router.add_get("/v1/sales/{sale_id}", get_sale)
    app.router.add_post("/v1/sales/{sale_id}/reservations", reserve)
    app.router.add_get("/v1/sales/{sale_id}/reservations/mine", my_reservations)
    app.router.add_get("/v1/reservations/{reservation_id}", get_reservation)
    app.router.add_post("/v1/reservations/{reservation_id}/confirm", confirm_reservation)
    app.router.add_post("/v1/reservations/{reservation_id}/cancel", cancel_reservation)
    app.router.add_post("/v1/sales/{sale_id}/stock", adjust_stock)
    app.router.add_post("/v1/sales/{sale_id}/close", close_sale)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/openapi.json", openapi_view)
    return app
