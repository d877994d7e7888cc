"""`flashsale demo` end to end, as a user runs it (against the test servers)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from core.settings import Settings

FLASHSALE = str(Path(sys.executable).parent / "flashsale")


async def test_demo_sells_exactly_the_stock_and_reports_clean(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    env = {
        **os.environ,
        "FLASHSALE_REDIS_URL": settings.redis_url or "",
        "FLASHSALE_DATABASE_URL": settings.database_url or "",
        "FLASHSALE_PARTITIONS": "4",
    }
    child = await asyncio.create_subprocess_exec(
        FLASHSALE,
        "demo",
        "--stock",
        "30",
        "--buyers",
        "600",
        "--hold-seconds",
        "3",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=120)
    assert child.returncode == 0, err.decode()[-2000:]
    report = json.loads(out)
    assert report["ok"] is True
    first, second = report["first"], report["second"]
    assert first["sold"] == 30
    assert sum(first["turned_away"].values()) == 600 - 30
    # Every winner paid, cancelled or left; what was not paid came back and was resold.
    assert report["paid"] + report["cancelled"] + report["too_late"] + report["abandoned"] == 30
    assert report["expired"] == report["abandoned"] + report["too_late"]
    assert report["returned_to_shelf"] == 30 - report["paid"]
    assert second["sold"] == report["resold"] == report["returned_to_shelf"]
    assert report["confirmed"] == 30 and report["redis_remaining"] == 0
    assert report["oversold"] == 0 and report["duplicate_buyers"] == 0
    assert report["postgres_orders"] == 30 + report["resold"]
    assert report["verify_clean"] is True
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT user_id FROM orders WHERE sale_id = $1 AND status = 'confirmed'",
            report["sale_id"],
        )
    assert len({r["user_id"] for r in rows}) == 30
