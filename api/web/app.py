"""The aiohttp application: its state, middleware, connections and routes. Views are thin:
parse, call the gateway, map errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from api.connections import postgres_pool_for, redis_client_for
from api.web import admin, openapi, pages, reservations, sales, service
from api.web.metrics import ApiMetrics
from api.web.problems import problems_middleware
from api.web.sale_views import SaleViewCache
from api.web.state import (
    CONSOLE_HEALTH,
    GATEWAY,
    HEALTH,
    INFLIGHT,
    METRICS,
    OPENAPI_JSON,
    ORDERS_POOL,
    SALE_VIEWS,
    SETTINGS,
)
from consumers.health import CachedHealth
from core.errors import InfrastructureError
from core.gateway import RedisGateway
from core.gateway.clients import RedisClient
from core.settings import Settings

log = structlog.get_logger(__name__)

# Connections to PostgreSQL per API process, off the purchase path: reads of reservations
# pruned from Redis, the console's list of sales, and verify (which holds two at once).
ORDERS_POOL_SIZE = 3
# The console shows consumer health at most this old (seconds).
CONSOLE_HEALTH_INTERVAL = 1.0


async def health_ctx(app: web.Application) -> AsyncIterator[None]:
    """Consumer health for /metrics and the console, on a Redis client of their own."""
    settings = app[SETTINGS]
    client = redis_client_for(settings, pool_size=2, name="flashsale-metrics")
    interval = settings.metrics_health_interval_ms / 1000
    app[HEALTH] = CachedHealth(client, settings.partitions, interval)
    console_interval = min(interval, CONSOLE_HEALTH_INTERVAL)
    app[CONSOLE_HEALTH] = CachedHealth(client, settings.partitions, console_interval)
    yield
    await client.aclose()


def create_app(
    settings: Settings, client: RedisClient | None = None, metrics: ApiMetrics | None = None
) -> web.Application:
    """Build the app; it opens (or borrows) its Redis client in ``cleanup_ctx``. Its metrics
    are its own unless ``metrics`` is given (an API worker's, summed over the workers)."""
    app = web.Application(
        middlewares=[problems_middleware], client_max_size=settings.max_body_bytes
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics or ApiMetrics()
    app[INFLIGHT] = [0]
    app[SALE_VIEWS] = SaleViewCache(settings.sale_view_cache_ms / 1000)

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        own = client is None
        redis_client = client or redis_client_for(settings)
        gateway = RedisGateway.from_settings(redis_client, settings)
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
    router = app.router
    # The hot routes first: aiohttp tries the routes under one path prefix in this order.
    router.add_post("/v1/sales/{sale_id}/reservations", reservations.reserve)
    router.add_get("/v1/sales/{sale_id}", sales.get_sale)
    router.add_post("/v1/sales", sales.create_sale)
    router.add_get("/v1/sales", sales.list_sales)
    router.add_get("/v1/sales/{sale_id}/reservations/mine", reservations.my_reservations)
    router.add_get("/v1/reservations/{reservation_id}", reservations.get_reservation)
    router.add_post("/v1/reservations/{reservation_id}/confirm", reservations.confirm_reservation)
    router.add_post("/v1/reservations/{reservation_id}/cancel", reservations.cancel_reservation)
    router.add_post("/v1/sales/{sale_id}/stock", sales.adjust_stock)
    router.add_post("/v1/sales/{sale_id}/close", sales.close_sale)
    router.add_get("/v1/admin/overview", admin.overview)
    router.add_post("/v1/admin/verify", admin.run_verify)
    router.add_get("/v1/admin/verify", admin.last_verify)
    router.add_get("/healthz", service.healthz)
    router.add_get("/readyz", service.readyz)
    router.add_get("/metrics", service.metrics_view)
    router.add_get("/openapi.json", service.openapi_view)
    pages.add_routes(router)
    app[OPENAPI_JSON] = json.dumps(openapi.document(router))
    return app
