"""`flashsale demo` end to end, as a user runs it (against the test servers)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis

from core.settings import DEFAULT_ADMIN_TOKEN, DEFAULT_JWT_SECRET, Settings
from tests.daemons import is_gone

FLASHSALE = str(Path(sys.executable).parent / "flashsale")


def _env(settings: Settings) -> dict[str, str]:
    """The test servers, and no secrets: the demo makes its own."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")},
        "FLASHSALE_REDIS_URL": settings.redis_url or "",
        "FLASHSALE_DATABASE_URL": settings.database_url or "",
        "FLASHSALE_PARTITIONS": "4",
    }


async def test_demo_sells_exactly_the_stock_and_reports_clean(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    env = _env(settings)
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
    # No secrets were set: it made random ones for the run and said how to use them.
    admin = re.search(r"^admin token for this run: (\S+)", err.decode(), re.M)
    buyer = re.search(
        r"^buyer tokens for this run: FLASHSALE_JWT_SECRET=(\S+) flashsale token USER_ID$",
        err.decode(),
        re.M,
    )
    assert admin and buyer, err.decode()
    assert admin.group(1) != DEFAULT_ADMIN_TOKEN and buyer.group(1) != DEFAULT_JWT_SECRET
    report = json.loads(out)
    # The pages' addresses to watch it: the buyer page of its sale, signed in as a buyer of
    # the run, and the console with a hint of its admin token.
    page = re.search(
        r"^buyer page: http://127.0.0.1:\d+/buy/(\S+)#token=(\S+)  ", err.decode(), re.M
    )
    assert page and page.group(1) == report["sale_id"], err.decode()
    claims = jwt.decode(page.group(2), buyer.group(1), algorithms=["HS256"])
    assert claims["sub"] == "web-buyer"
    assert re.search(
        r"^console: +http://127.0.0.1:\d+/console  \(admin token: the one printed above",
        err.decode(),
        re.M,
    )
    assert report["ok"] is True
    first, second = report["first"], report["second"]
    assert first["sold"] == 30
    assert sum(first["turned_away"].values()) == 600 - 30
    # The rate the first wave reached: its attempts over first request to last answer.
    assert first["seconds"] > 0
    assert first["attempts_per_second"] == pytest.approx(600 / first["seconds"])
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


async def test_demo_report_shows_the_attempts_per_second_of_each_wave(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    child = await asyncio.create_subprocess_exec(
        FLASHSALE,
        "demo",
        "--stock",
        "10",
        "--buyers",
        "200",
        "--hold-seconds",
        "3",
        env=_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=120)
    # Whether the sale passed is the JSON test's business; this one reads the report.
    assert child.returncode in (0, 1), err.decode()[-2000:]
    report = out.decode()
    assert report.startswith("flashsale demo report"), report
    took = re.findall(
        r"^  {3}took +([\d.]+) s, first request sent to last answer received$", report, re.M
    )
    rates = re.findall(r"^  {3}attempts/s reached +([\d,]+)$", report, re.M)
    # One line each for the first wave (200 attempts) and the second (40).
    assert len(took) == len(rates) == 2, report
    for attempts, seconds, rate in zip((200, 40), took, rates, strict=True):
        assert float(seconds) > 0, report
        # The time is printed to 0.01 s: the rate was worked out from the unrounded one.
        fastest, slowest = max(float(seconds) - 0.005, 1e-9), float(seconds) + 0.005
        reached = int(rate.replace(",", ""))
        assert attempts / slowest - 1 <= reached <= attempts / fastest + 1, report


def _loadgen_children(parent: int) -> list[int]:
    """Pids of ``python -m api.cli.loadgen`` processes whose parent is ``parent``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rpartition(") ")[2].split()
        if int(fields[1]) == parent and fields[0] != "Z" and b"api.cli.loadgen" in cmdline:
            found.append(int(proc.name))
    return found


async def test_demo_interrupted_leaves_no_load_generator_behind(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    child = await asyncio.create_subprocess_exec(
        FLASHSALE,
        "demo",
        "--stock",
        "10",
        "--buyers",
        "50000",  # a first wave that is still firing when the interrupt comes
        env=_env(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    loadgen: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (loadgen := _loadgen_children(child.pid)):
            assert child.returncode is None, "the demo ended before its load generator started"
            assert time.monotonic() < deadline, "no load generator appeared"
            await asyncio.sleep(0.05)
        child.send_signal(signal.SIGINT)  # as Ctrl-C would, but to the demo alone
        _, err = await asyncio.wait_for(child.communicate(), timeout=60)
        assert child.returncode == 130, err.decode()[-2000:]
        assert all(is_gone(pid) for pid in loadgen), f"load generator {loadgen} still runs"
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        for pid in loadgen:
            if not is_gone(pid):
                os.kill(pid, signal.SIGKILL)
