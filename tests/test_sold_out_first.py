"""A sale this process just saw sold out is refused before any other work: no auth, no
body, no Redis call; a request with an Idempotency-Key still goes the whole way.

The refusal tells nothing that GET /v1/sales does not. The HTTP tests run on a Redis of
their own, so that INFO commandstats counts this process's script calls only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from api.cli.launcher import EmbeddedRedis
from core.errors import SoldOut
from core.gateway import RedisGateway
from core.settings import Settings
from tests.conftest import GatewayFactory
from tests.daemons import eventually
from tests.helpers import open_sale
from tests.http_helpers import JSON, bearer, buyer, expect_problem, serve

RESERVE = "/v1/sales/sale-1/reservations"


@pytest.fixture
async def own_redis(settings: Settings) -> AsyncIterator[Settings]:
    """The test settings on a Redis server of the test's own, with a long sold-out hint."""
    server = EmbeddedRedis()
    url = server.start()
    try:
        yield settings.model_copy(update={"redis_url": url, "sold_out_hint_ms": 60_000})
    finally:
        server.stop()


async def script_calls(client: aioredis.Redis) -> int:
    """EVALSHA calls the server has run so far."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def attempts_of(metrics: str, outcome: str) -> float:
    """The reservation attempts of ``outcome`` in a /metrics text."""
    prefix = f'flashsale_reservation_attempts_total{{outcome="{outcome}"}} '
    rows = [row for row in metrics.splitlines() if row.startswith(prefix)]
    return float(rows[0][len(prefix) :]) if rows else 0.0


async def test_a_sold_out_sale_is_refused_before_auth_body_and_redis(own_redis: Settings):
    client = aioredis.Redis.from_url(own_redis.redis_url or "")
    try:
        await open_sale(RedisGateway.from_settings(client, own_redis), stock=1)
        async with serve(own_redis, client) as http:
            for user in ("ann", "bob"):  # bob's refusal comes from Redis: the hint is set
                await http.post(RESERVE, json={"qty": 1}, headers=buyer(user))
            before = await script_calls(client)
            for headers, body in (
                (bearer("not-a-jwt"), b'{"qty": 1}'),  # a 401 on a sale with stock
                ({**buyer("cat"), **JSON}, b"{not json"),  # a 400
                ({**buyer("dan"), **JSON}, b'{"qty": 0}'),  # a 422
                (buyer("eve"), None),
            ):
                async with http.post(RESERVE, data=body, headers=headers) as r:
                    await expect_problem(r, 409, "sold_out")
            assert await script_calls(client) == before  # Redis saw none of them
            async with http.get("/metrics") as r:
                assert attempts_of(await r.text(), "sold_out") == 5
            # An Idempotency-Key goes the whole way: auth first, then Redis.
            keyed = {"Idempotency-Key": "key-1"}
            async with http.post(
                RESERVE, json={"qty": 1}, headers={**bearer("not-a-jwt"), **keyed}
            ) as r:
                await expect_problem(r, 401, "unauthorized")
            async with http.post(RESERVE, json={"qty": 1}, headers={**buyer("fay"), **keyed}) as r:
                await expect_problem(r, 409, "sold_out")
            assert await script_calls(client) == before + 1
    finally:
        await client.aclose()


async def test_a_sale_with_stock_still_checks_auth_and_body_first(own_redis: Settings):
    client = aioredis.Redis.from_url(own_redis.redis_url or "")
    try:
        await open_sale(RedisGateway.from_settings(client, own_redis), stock=1, per_user_limit=2)
        async with serve(own_redis, client) as http:
            async with http.post(RESERVE, json={"qty": 2}, headers=buyer("ann")) as r:
                await expect_problem(r, 409, "sold_out")  # refused for 2 units, not for 1
            for headers, body, status in (
                (bearer("not-a-jwt"), b'{"qty": 1}', 401),
                ({**buyer("cat"), **JSON}, b"{not json", 400),
                ({**buyer("dan"), **JSON}, b'{"qty": 0}', 422),
            ):
                async with http.post(RESERVE, data=body, headers=headers) as r:
                    await expect_problem(r, status)
            async with http.post(RESERVE, json={"qty": 1}, headers=buyer("ann")) as r:
                assert r.status == 202
    finally:
        await client.aclose()


async def test_the_sold_out_hint_is_renewed_while_redis_says_so_and_lapses_after(
    make_gateway: GatewayFactory, gateway: RedisGateway
):
    age = 1.0
    hinted = make_gateway(sold_out_hint_seconds=age)
    await open_sale(gateway, stock=1)
    await hinted.reserve("sale-1", "ann", 1, None)
    with pytest.raises(SoldOut):
        await hinted.reserve("sale-1", "bob", 1, None)  # Redis's refusal sets the hint
    # Well past its age, it still holds: background reads renewed it.
    until = time.monotonic() + 2.5 * age
    while time.monotonic() < until:
        assert hinted.answers_sold_out("sale-1")
        await asyncio.sleep(0.02)
    # Stock comes back through another process: no renewal, and the hint lapses.
    await gateway.adjust_stock("sale-1", 1, None)

    async def lapsed() -> bool:
        return not hinted.answers_sold_out("sale-1")

    await eventually(lapsed, 3 * age, "the hint was renewed though stock came back")
    assert not (await hinted.reserve("sale-1", "bob", 1, None)).replayed
