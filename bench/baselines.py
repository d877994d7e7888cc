"""The bare baselines flashsale is measured against: the least an aiohttp process can do.

``hello``: reads the small JSON body of a POST (or nothing, for a GET) and answers a small
JSON document; what a sold-out refusal or the public sale view cannot beat.

``evalsha``: parses the JSON body and runs ``core/lua/reserve.lua`` itself, with the same
KEYS and ARGV the gateway passes, as one EVALSHA on a redis-py asyncio client, then answers
JSON; what a placement cannot beat. The buyer id is a counter (no JWT is checked).

Run one process:  python -m bench.baselines hello|evalsha --port P [--sale SALE_ID]
(``evalsha`` reads ``FLASHSALE_REDIS_URL`` and ``FLASHSALE_PARTITIONS``). Each process
binds with SO_REUSEPORT, so N of them share one port as ``flashsale serve --workers N``
does, and runs on uvloop like ``flashsale`` (``api.cli.processes.run_async``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import uuid
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from api.cli.processes import run_async
from core.gateway.scripts import load_lua
from core.keys import PartitionKeys, partition_of
from core.settings import Settings

__all__ = ["evalsha_app", "hello_app"]

_ANSWER = {"status": "ok", "code": "hello"}


async def _hello(request: web.Request) -> web.Response:
    if request.can_read_body:
        json.loads(await request.read())
    return web.json_response(_ANSWER)


async def _ready(_: web.Request) -> web.Response:
    """Names this process, so that the benchmark can wait until every one listens."""
    return web.json_response({"pid": os.getpid()})


def _app() -> web.Application:
    app = web.Application()
    app.router.add_get("/ready", _ready)
    return app


def hello_app() -> web.Application:
    """The ``hello`` baseline: any GET or POST, JSON in (when a body is sent), JSON out."""
    app = _app()
    app.router.add_route("*", "/{tail:.*}", _hello)
    return app


def evalsha_app(redis_url: str, partitions: int, sale_id: str) -> web.Application:
    """The ``evalsha`` baseline: every POST runs reserve.lua once for ``sale_id``."""
    client = aioredis.Redis.from_url(redis_url, max_connections=200)
    script = client.register_script(load_lua("reserve"))
    keys = PartitionKeys(partition_of(sale_id, partitions), partitions)
    buyers = itertools.count()
    prefix = f"base-{os.getpid()}-"

    async def reserve(request: web.Request) -> web.Response:
        body: dict[str, Any] = json.loads(await request.read())
        user_id = f"{prefix}{next(buyers)}"
        reservation_id = f"{keys.partition}-{uuid.uuid4().hex}"
        result = await script(
            keys=[
                keys.sale(sale_id),
                keys.holders(sale_id),
                keys.idempotency(sale_id, user_id, ""),
                keys.reservation(reservation_id),
                keys.reservations(sale_id),
                keys.deadlines,
                keys.events,
                keys.user_reservations(sale_id, user_id),
            ],
            args=[uuid.uuid4().hex, sale_id, user_id, body["qty"], reservation_id, 3600, "", ""],
        )
        return web.json_response({"reservation_id": result[1].decode(), "status": "pending"})

    async def close(_: web.Application) -> None:
        await client.aclose()

    app = _app()
    app.router.add_post("/{tail:.*}", reserve)
    app.on_cleanup.append(close)
    return app


async def _serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
    try:
        await asyncio.Event().wait()  # until the benchmark kills this process
    finally:
        await runner.cleanup()


def main() -> None:
    """Entry point: one baseline process on ``--port`` until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("app", choices=("hello", "evalsha"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sale", default="", help="the sale evalsha places in")
    args = parser.parse_args()
    if args.app == "hello":
        app = hello_app()
    else:
        settings = Settings()
        assert settings.redis_url, "evalsha needs FLASHSALE_REDIS_URL"
        app = evalsha_app(settings.redis_url, settings.partitions, args.sale)
    run_async(_serve(app, args.port))


if __name__ == "__main__":
    main()
