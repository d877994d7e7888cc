"""Views of sales: open one, read it, restock or withdraw stock, close it."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from api.web.auth import require_admin
from api.web.requests import BadRequest, idempotency_key_of, read_json, sale_id_of, validate
from api.web.state import GATEWAY, SALE_VIEWS, SETTINGS
from core.errors import SaleNotFound
from core.models import MAX_STOCK, NewSale


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


class StockRequest(BaseModel):
    """Body of POST /v1/sales/{sale_id}/stock."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delta: int = Field(ge=-MAX_STOCK, le=MAX_STOCK, strict=True)


async def _sale_answer(request: web.Request, sale_id: str, changed: bool) -> web.Response:
    request.app[SALE_VIEWS].forget(sale_id)
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
