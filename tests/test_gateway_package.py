"""The gateway package: built from the settings in one place, its Lua found after the split."""

from __future__ import annotations

from importlib import resources

import pytest
import redis.asyncio as aioredis

from core.errors import SoldOut
from core.gateway import RedisGateway, RetryPolicy, load_lua
from core.models import NewSale
from core.settings import Settings


async def test_from_settings_carries_every_option(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    chosen = settings.model_copy(
        update={"partitions": 8, "idempotency_ttl_seconds": 120, "sold_out_hint_ms": 250}
    )
    policy = RetryPolicy(attempts=2)
    gateway = RedisGateway.from_settings(redis_client, chosen, retry=policy)
    assert gateway.partitions == 8
    assert gateway.idempotency_ttl == 120
    assert gateway.sold_out_hints.ttl == 0.25
    assert (gateway.wait_replicas, gateway.wait_timeout_ms) == (
        chosen.wait_replicas,
        chosen.wait_timeout_ms,
    )
    assert gateway.retry is policy
    assert RedisGateway.from_settings(redis_client, chosen).retry == RetryPolicy()

    # It works against Redis: a sale on one of 8 partitions, sold out, then remembered.
    await gateway.load_scripts()
    await gateway.create_sale(NewSale(sale_id="pkg", stock=1))
    assert gateway.keys_for_sale("pkg").partition < 8
    await gateway.reserve("pkg", "u1", 1, None)
    with pytest.raises(SoldOut):
        await gateway.reserve("pkg", "u2", 1, None)
    assert gateway.sold_out_hints.says_sold_out("pkg", 1)


def test_every_lua_file_is_found_through_the_package() -> None:
    names = sorted(
        f.name.removesuffix(".lua")
        for f in resources.files("core").joinpath("lua").iterdir()
        if f.name.endswith(".lua")
    )
    assert "reserve" in names and "prune_reservations" in names
    for name in names:
        assert "KEYS" in load_lua(name), name
