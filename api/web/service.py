"""Views about the service itself: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import os
from typing import Any, Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, RootModel

from api.web.openapi import Answer, documented
from api.web.problems import problem
from api.web.state import GATEWAY, HEALTH, METRICS, OPENAPI_JSON


class Health(BaseModel):
    """Body of GET /healthz."""

    status: Literal["ok"]
    pid: int


class Ready(BaseModel):
    """Body of GET /readyz when ready."""

    status: Literal["ready"]
    redis: Literal["ok"]


class OpenApiDocument(RootModel[dict[str, Any]]):
    """An OpenAPI 3.1 document."""


@documented("Liveness, and which API process answered.", Answer(200, "alive", Health))
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers, and which process it is (with several API workers on
    one port, which one the kernel handed this connection)."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


@documented(
    "Readiness: Redis answers (purchases need nothing else).",
    Answer(200, "ready", Ready),
    problems=("not_ready",),
)
async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers (purchases need nothing else)."""
    if await request.app[GATEWAY].ping():
        return web.json_response({"status": "ready", "redis": "ok"})
    return problem(503, "not_ready", "Not ready", "redis does not answer")


@documented(
    "Prometheus metrics, summed over the API workers.",
    Answer(200, "Prometheus text exposition", media_type="text/plain"),
)
async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus text exposition, summed over the API workers when there are several;
    consumer lag and dead letters as last read (see ``FLASHSALE_METRICS_HEALTH_INTERVAL_MS``)."""
    metrics = request.app[METRICS]
    metrics.observe_consumers(await request.app[HEALTH].get())
    metrics.tally.flush()  # this process's requests up to now
    body = generate_latest(metrics.scraped)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@documented("This document.", Answer(200, "the OpenAPI document", OpenApiDocument))
async def openapi_view(request: web.Request) -> web.Response:
    """The OpenAPI document of this API, generated when the app was built."""
    return web.Response(text=request.app[OPENAPI_JSON], content_type="application/json")
