"""Views of sales: open one, list them, read one, restock or withdraw stock, close it."""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from api.web.auth import require_admin
from api.web.openapi import Answer, Link, documented
from api.web.requests import idempotency_key_of, read_model, sale_id_of
from api.web.state import GATEWAY, ORDERS_POOL, SALE_VIEWS, SETTINGS
from core.errors import InfrastructureError, SaleNotFound
from core.models import MAX_STOCK, NewSale, SaleView, Whole
from projections.tables import stock_view

_SALE_ID = {"sale_id": "$response.body#/sale_id"}
# Where an answer naming a sale leads.
SALE_LINKS = {
    "GetSale": Link("get_sale", _SALE_ID),
    "Reserve": Link("reserve", _SALE_ID, "place a reservation in this sale"),
    "MyReservations": Link("my_reservations", _SALE_ID),
    "AdjustStock": Link("adjust_stock", _SALE_ID),
    "CloseSale": Link("close_sale", _SALE_ID),
}


# Sales one listing shows at most: the console polls the list every second.
MAX_LISTED = 500


class SaleList(BaseModel):
    """Body of GET /v1/sales."""

    sales: list[SaleView] = Field(description="the latest to start first, then by id")
    truncated: bool = Field(description=f"true when there are more than {MAX_LISTED} sales")


class SaleChange(SaleView):
    """The sale after a stock change or closing."""

    changed: bool = Field(description="false when the call found the work already done")


@documented(
    "Open a sale (admin).",
    Answer(201, "created", SaleView, headers=("Location",), links=SALE_LINKS),
    auth=("admin",),
    body=NewSale,
    idempotency_key="a repeat with the same key and body answers the sale, changing nothing",
    problems=("sale_exists", "idempotency_key_reused", "unavailable", "not_replicated"),
    description="503 not_replicated (FLASHSALE_WAIT_REPLICAS): the sale is open on the"
    " primary; repeat the request with the same Idempotency-Key.",
)
async def create_sale(request: web.Request) -> web.Response:
    """POST /v1/sales (admin): open a sale."""
    require_admin(request, request.app[SETTINGS].admin_token)
    key = idempotency_key_of(request)
    sale = await read_model(request, NewSale)
    view = await request.app[GATEWAY].create_sale(sale, key)
    return web.json_response(
        view.model_dump(mode="json"),
        status=201,
        headers={"Location": f"/v1/sales/{sale.sale_id}"},
    )


@documented(
    "A sale's counters and status (a few milliseconds old at most).",
    Answer(200, "the sale", SaleView, links=SALE_LINKS),
    problems=("sale_not_found", "unavailable"),
)
async def get_sale(request: web.Request) -> web.Response:
    """GET /v1/sales/{sale_id}: public counters and status, at most
    ``FLASHSALE_SALE_VIEW_CACHE_MS`` old (see ``SaleViewCache``)."""
    sale_id = sale_id_of(request)
    gateway = request.app[GATEWAY]

    async def read() -> str | None:
        view = await gateway.get_sale(sale_id)
        return None if view is None else view.model_dump_json()

    text = await request.app[SALE_VIEWS].get(sale_id, read)
    if text is None:
        raise SaleNotFound(f"no sale {sale_id!r}")
    return web.Response(text=text, content_type="application/json")


@documented(
    "Every sale with its counters, live (admin).",
    Answer(200, "the sales", SaleList),
    auth=("admin",),
    problems=("unavailable",),
    description="Which sales exist comes from PostgreSQL's stock_view (a sale is listed"
    " once projected, normally within milliseconds of its creation); the counters are"
    " Redis's, read now. 503 unavailable when no database is configured.",
)
async def list_sales(request: web.Request) -> web.Response:
    """GET /v1/sales (admin): every sale, the latest to start first, with live counters.

    Which sales exist is read from ``stock_view``, the projection that holds one row per
    sale ever created, and the counters from Redis, the state purchases change. Redis keeps
    no registry of sales (every key of a sale lives in its partition's slot, so one would
    need a key per partition written by ``create_sale.lua``, a back-fill for sales created
    before it, and a place in repair and verify); ``stock_view`` is already one, durable,
    and checked by verify against the log (a sale the log has and it lacks is drift, which
    rebuild and repair put right). It lags the log by the projectors' latency: a new sale
    appears once projected, and its numbers are Redis's from the first poll on. A sale
    the projection holds and Redis does not (a Redis lost and not yet repaired) is left
    out; verify names it.
    """
    require_admin(request, request.app[SETTINGS].admin_token)
    pool = request.app.get(ORDERS_POOL)
    if pool is None:
        raise InfrastructureError("no database configured: the list of sales is read from it")
    ids = await stock_view.newest_sale_ids(pool, MAX_LISTED + 1)
    views = await request.app[GATEWAY].get_sales(ids[:MAX_LISTED])
    body = SaleList(sales=views, truncated=len(ids) > MAX_LISTED)
    return web.Response(text=body.model_dump_json(), content_type="application/json")


class StockRequest(BaseModel):
    """Body of POST /v1/sales/{sale_id}/stock."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delta: Annotated[int, Whole(-MAX_STOCK, MAX_STOCK, nonzero=True)] = Field(
        description="Restock (delta > 0) or withdraw unsold stock (delta < 0).", examples=[10]
    )


async def _sale_answer(request: web.Request, sale_id: str, changed: bool) -> web.Response:
    request.app[SALE_VIEWS].forget(sale_id)
    view = await request.app[GATEWAY].get_sale(sale_id)
    if view is None:  # pragma: no cover - sales are never deleted
        raise SaleNotFound(f"no sale {sale_id!r}")
    return web.json_response(view.model_dump(mode="json") | {"changed": changed})


@documented(
    "Restock, or withdraw unsold stock (admin).",
    Answer(200, "the sale after the change", SaleChange, links=SALE_LINKS),
    auth=("admin",),
    body=StockRequest,
    idempotency_key="a repeat with the same key changes nothing (changed: false)",
    problems=(
        "sale_not_found",
        "not_enough_unsold_stock",
        "idempotency_key_reused",
        "unavailable",
        "not_replicated",
    ),
    description="503 not_replicated (FLASHSALE_WAIT_REPLICAS): the change stands on the"
    " primary; repeat the request with the same Idempotency-Key (without one, a repeat"
    " changes the stock again).",
)
async def adjust_stock(request: web.Request) -> web.Response:
    """POST /v1/sales/{sale_id}/stock (admin): restock, or withdraw unsold stock."""
    require_admin(request, request.app[SETTINGS].admin_token)
    sale_id = sale_id_of(request)
    key = idempotency_key_of(request)
    body = await read_model(request, StockRequest)
    changed = await request.app[GATEWAY].adjust_stock(sale_id, body.delta, key)
    return await _sale_answer(request, sale_id, changed)


@documented(
    "Stop taking reservations now; pending ones keep their window (admin).",
    Answer(200, "the sale, now ended", SaleChange, links=SALE_LINKS),
    auth=("admin",),
    problems=("sale_not_found", "unavailable", "not_replicated"),
    description="503 not_replicated (FLASHSALE_WAIT_REPLICAS): the sale is closed on the"
    " primary; repeating the request is safe.",
)
async def close_sale(request: web.Request) -> web.Response:
    """POST /v1/sales/{sale_id}/close (admin): stop taking reservations now."""
    require_admin(request, request.app[SETTINGS].admin_token)
    sale_id = sale_id_of(request)
    changed = await request.app[GATEWAY].close_sale(sale_id)
    return await _sale_answer(request, sale_id, changed)
