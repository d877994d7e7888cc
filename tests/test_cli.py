"""The ``flashsale`` command's guard rails: secrets, buyer tokens, Redis timeouts."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp
import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis
from playwright.async_api import Browser, expect
from pydantic import ValidationError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.connections import redis_client_for
from core.settings import DEFAULT_ADMIN_TOKEN, DEFAULT_JWT_SECRET, Settings
from tests.daemons import cli, env_for, running, start, stop_all, terminate

DEFAULTS = {
    "FLASHSALE_ADMIN_TOKEN": DEFAULT_ADMIN_TOKEN,
    "FLASHSALE_JWT_SECRET": DEFAULT_JWT_SECRET,
}


def _without_secrets(settings: Settings, **extra: str) -> dict[str, str]:
    env = env_for(settings.redis_url or "", settings.database_url or "") | extra
    del env["FLASHSALE_ADMIN_TOKEN"], env["FLASHSALE_JWT_SECRET"]
    return env


# --- serve and consume refuse the public defaults ---------------------------------------------


@pytest.mark.parametrize(
    ("command", "given", "named"),
    [
        ("serve", {}, "FLASHSALE_ADMIN_TOKEN and FLASHSALE_JWT_SECRET"),
        ("consume", {}, "FLASHSALE_ADMIN_TOKEN and FLASHSALE_JWT_SECRET"),
        ("serve", DEFAULTS, "FLASHSALE_ADMIN_TOKEN and FLASHSALE_JWT_SECRET"),
        (
            "serve",
            {
                "FLASHSALE_ADMIN_TOKEN": "a-real-admin-token",
                "FLASHSALE_JWT_SECRET": DEFAULT_JWT_SECRET,
            },
            "FLASHSALE_JWT_SECRET",
        ),
        (
            "consume",
            {"FLASHSALE_ADMIN_TOKEN": DEFAULT_ADMIN_TOKEN, "FLASHSALE_JWT_SECRET": "x" * 32},
            "FLASHSALE_ADMIN_TOKEN",
        ),
    ],
)
async def test_serve_and_consume_refuse_default_or_missing_secrets(
    settings: Settings, command: str, given: dict[str, str], named: str
):
    env = _without_secrets(settings, FLASHSALE_PORT="0") | given
    rc, out = await cli(env, command, within=30)
    assert rc == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith(
        f"error: ConfigurationError: refusing to run with the public default {named}:"
    ), out


# --- flashsale token ----------------------------------------------------------------------------


async def test_token_mints_a_buyer_jwt_with_the_configured_secret(settings: Settings):
    secret = "token-test-secret-0123456789abcdef"
    env = _without_secrets(settings) | {"FLASHSALE_JWT_SECRET": secret}
    before = int(time.time())
    rc, out = await cli(env, "token", "alice@example.com", "--ttl", "120")
    assert rc == 0, out
    token = out.strip()
    claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["sub", "exp"]})
    assert claims["sub"] == "alice@example.com"
    assert before + 120 <= claims["exp"] <= int(time.time()) + 120
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, DEFAULT_JWT_SECRET, algorithms=["HS256"])

    rc, out = await cli(_without_secrets(settings), "token", "alice")
    assert rc == 2 and len(out.strip().splitlines()) == 1 and "FLASHSALE_JWT_SECRET" in out
    rc, out = await cli(env, "token", "not a user id")
    assert rc == 2 and "USER_ID" in out


# --- up generates secrets for the run ---------------------------------------------------------


async def test_up_without_secrets_generates_random_ones_and_says_how_to_use_them(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool, tmp_path: Path
):
    env = _without_secrets(settings, FLASHSALE_PORT="0")
    log_path = tmp_path / "up.log"
    proc = start(["up"], env, log_path)
    try:
        deadline = time.monotonic() + 60
        while "flashsale is up: " not in (text := log_path.read_text()):
            running((proc, log_path))()
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.1)
        admin = re.search(r"admin token for this run: (\S+)", text)
        buyer = re.search(
            r"buyer tokens for this run: FLASHSALE_JWT_SECRET=(\S+) flashsale token", text
        )
        base = re.search(r"flashsale is up: (http://\S+)", text)
        assert admin and buyer and base, text
        admin_token, jwt_secret = admin.group(1), buyer.group(1)
        assert admin_token != DEFAULT_ADMIN_TOKEN and jwt_secret != DEFAULT_JWT_SECRET
        assert len(admin_token) >= 24 and len(jwt_secret) >= 32

        # The printed command, run as printed, mints a token the running service accepts.
        rc, out = await cli(
            _without_secrets(settings) | {"FLASHSALE_JWT_SECRET": jwt_secret}, "token", "bob"
        )
        assert rc == 0, out
        buyer_token = out.strip()
        sale = {"sale_id": "generated-secrets", "stock": 5}
        async with aiohttp.ClientSession(base.group(1)) as http:
            for token, status in ((DEFAULT_ADMIN_TOKEN, 403), (admin_token, 201)):
                headers = {"Authorization": f"Bearer {token}"}
                async with http.post("/v1/sales", json=sale, headers=headers) as response:
                    assert response.status == status, await response.text()
            url = "/v1/sales/generated-secrets/reservations"
            for token, status in (
                (jwt.encode({"sub": "bob", "exp": time.time() + 60}, DEFAULT_JWT_SECRET), 401),
                (buyer_token, 202),
            ):
                headers = {"Authorization": f"Bearer {token}"}
                async with http.post(url, json={"qty": 1}, headers=headers) as response:
                    assert response.status == status, await response.text()
        assert await terminate(proc) == 0
    finally:
        stop_all(proc)


# --- up prints the pages, the buyer page signed in -------------------------------------------


async def test_up_prints_the_console_and_a_buyer_page_that_buys_with_its_minted_token(
    settings: Settings,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    browser: Browser,
    tmp_path: Path,
):
    env = _without_secrets(settings, FLASHSALE_PORT="0", FLASHSALE_WORKERS="1")
    log_path = tmp_path / "up.log"
    proc = start(["up"], env, log_path)
    try:
        deadline = time.monotonic() + 60
        while "buyer page: " not in (text := log_path.read_text()):
            running((proc, log_path))()
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.1)
        admin = re.search(r"admin token for this run: (\S+)", text)
        console = re.search(
            r"^console: +(http://\S+/console)  \(admin token: the one printed above", text, re.M
        )
        page = re.search(r"^buyer page: (http://\S+/buy/SALE_ID#token=(\S+))  \(buyer", text, re.M)
        assert admin and console and page, text
        async with aiohttp.ClientSession() as http:
            async with http.get(console.group(1)) as response:
                assert response.status == 200
                assert response.content_type == "text/html"
            base = console.group(1).removesuffix("/console")
            sale = {"sale_id": "from-up", "stock": 2}
            headers = {"Authorization": f"Bearer {admin.group(1)}"}
            async with http.post(f"{base}/v1/sales", json=sale, headers=headers) as response:
                assert response.status == 201, await response.text()
        # The printed address, with the sale's id put in, buys as the printed buyer.
        tab = await browser.new_page()
        await tab.goto(page.group(1).replace("/buy/SALE_ID#", "/buy/from-up#"))
        await expect(tab.locator("#token-who")).to_contain_text("Buying as web-buyer")
        await tab.locator("#buy").click()
        await expect(tab.locator("#reservations li .res-status")).to_have_text(
            "Pending: held for you"
        )
        async with aiohttp.ClientSession() as http:
            url = f"{base}/v1/sales/from-up/reservations/mine"
            headers = {"Authorization": f"Bearer {page.group(2)}"}
            async with http.get(url, headers=headers) as response:
                mine = await response.json()
        assert [r["status"] for r in mine["reservations"]] == ["pending"]
        assert await terminate(proc) == 0
    finally:
        stop_all(proc)


# --- Redis socket timeout against block and wait times ----------------------------------------


def test_block_or_wait_longer_than_the_socket_timeout_is_refused():
    for name in ("consumer_block_ms", "wait_timeout_ms"):
        with pytest.raises(ValidationError) as refused:
            Settings.model_validate({"redis_socket_timeout_ms": 3000, name: 2001})
        message = str(refused.value)
        assert f"FLASHSALE_{name.upper()}=2001" in message
        assert "FLASHSALE_REDIS_SOCKET_TIMEOUT_MS" in message
        Settings.model_validate(
            {"redis_socket_timeout_ms": 3000, name: 2000}
        )  # headroom of 1 s: fine
    Settings(redis_socket_timeout_ms=60_000, consumer_block_ms=30_000, wait_timeout_ms=30_000)


async def test_cli_refuses_a_block_time_the_socket_timeout_would_cut(settings: Settings):
    env = env_for(
        settings.redis_url or "",
        settings.database_url or "",
        FLASHSALE_CONSUMER_BLOCK_MS="15000",
    )
    rc, out = await cli(env, "consume", within=30)
    assert rc == 2, out
    assert "FLASHSALE_CONSUMER_BLOCK_MS=15000" in out and "SOCKET_TIMEOUT_MS" in out


async def test_client_gives_up_after_the_socket_timeout_and_blocks_within_it(settings: Settings):
    """Why the bound exists: a command blocking past the socket timeout fails on a healthy
    server; one blocking within it returns normally."""
    short = settings.model_copy(update={"redis_socket_timeout_ms": 1000})
    client = redis_client_for(short, pool_size=2)
    try:
        assert await client.blpop(["fs:test:nothing"], timeout=0.3) is None  # within: fine
        with pytest.raises(RedisTimeoutError):
            await client.blpop(["fs:test:nothing"], timeout=2)  # past it: cut off
    finally:
        await client.aclose()
