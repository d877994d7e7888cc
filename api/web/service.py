"""Views about the service itself: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.web.openapi import SPEC
from api.web.problems import problem
from api.web.state import GATEWAY, HEALTH, METRICS


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers, and which process it is (with several API workers on
    one port, which one the kernel handed this connection)."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers (purchases need nothing else)."""
    if await request.app[GATEWAY].ping():
        return web.json_response({"status": "ready", "redis": "ok"})
    return problem(503, "not_ready", "Not ready", "redis does not answer")


async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus text exposition, summed over the API workers when there are several;
    consumer lag and dead letters as last read (see ``FLASHSALE_METRICS_HEALTH_INTERVAL_MS``)."""
    metrics = request.app[METRICS]
    metrics.observe_consumers(await request.app[HEALTH].get())
    body = generate_latest(metrics.scraped)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_view(request: web.Request) -> web.Response:
    """The OpenAPI document of this API."""
    return web.json_response(SPEC)
