"""What the application holds for its views: typed keys of the aiohttp application."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from api.web.metrics import ApiMetrics
from api.web.sale_views import SaleViewCache
from consumers.health import CachedHealth
from core.gateway import RedisGateway
from core.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
GATEWAY = web.AppKey("gateway", RedisGateway)
METRICS = web.AppKey("metrics", ApiMetrics)
# One counter in a list, so that views can change it in place.
INFLIGHT = web.AppKey("inflight", list)
SALE_VIEWS = web.AppKey("sale_views", SaleViewCache)
HEALTH = web.AppKey("health", CachedHealth)
# The same, read at most once a second: what the operator console shows.
CONSOLE_HEALTH = web.AppKey("console_health", CachedHealth)
# The OpenAPI document, serialized once when the app is built.
OPENAPI_JSON = web.AppKey("openapi_json", str)
# Present only when a database is configured: reads of pruned reservations, the list of
# sales and verify use it.
ORDERS_POOL = web.AppKey("orders_pool", asyncpg.Pool)
