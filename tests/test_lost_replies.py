"""Purchases through a connection that loses Redis's replies: every placement is answered.

The HTTP app talks to Redis through ``ReplyDroppingProxy``, which lets every command run but
loses 7% of the reply chunks (the connection is cut instead; the app coalesces the script
calls of a loop turn into one pipeline, so one lost chunk loses the replies of a batch).
Buyers fire about 3,000 attempts at a limit-1 sale and a limit-3 sale; the projector then
catches up, and every reservation that exists must have been answered 202, and every 202
must exist, in Redis, in the log and in PostgreSQL alike.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.cli.launcher import EmbeddedRedis
from consumers.projector import Projector
from core.events import ReservationPlaced
from core.gateway import RedisGateway
from core.settings import Settings
from projections.verify import verify
from tests.conftest import GatewayFactory
from tests.daemons import caught_up, eventually
from tests.helpers import open_sale
from tests.http_helpers import buyer, log_events, serve
from tests.proxy import ReplyDroppingProxy

LIMITS = {"one": 1, "many": 3}
STOCK = {"one": 700, "many": 900}


@dataclass(frozen=True, slots=True)
class Attempt:
    sale_id: str
    user: str
    qty: int
    key: str | None


@dataclass(frozen=True, slots=True)
class Answer:
    attempt: Attempt
    status: int
    code: str | None
    reservation_id: str | None


def plan(rng: random.Random) -> list[Attempt]:
    """About 3,000 attempts: 1,500 at the limit-1 sale, 1,500 at the limit-3 sale."""
    attempts = [
        Attempt("one", f"a{rng.randrange(1200)}", 1, f"k{i}" if i % 3 == 0 else None)
        for i in range(1500)
    ]
    attempts += [
        Attempt("many", f"b{rng.randrange(450)}", rng.choice((1, 1, 2)), f"m{i}" if i % 3 else None)
        for i in range(1500)
    ]
    rng.shuffle(attempts)
    return attempts


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) > 1 else host))


def client_with_retries(url: str) -> aioredis.Redis:
    """A client that, like many, sends a command again itself after a lost reply."""
    return aioredis.Redis.from_url(
        url,
        max_connections=100,
        retry=Retry(NoBackoff(), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


async def fire(
    settings: Settings, attempts: list[Attempt], client: aioredis.Redis | None
) -> list[Answer]:
    """Send every attempt to an app whose Redis connection loses replies; a buyer with an
    Idempotency-Key who is answered 503 tries again with the same key, twice at most."""
    gate = asyncio.Semaphore(64)
    async with serve(settings, client, 64) as http:

        async def one(attempt: Attempt) -> Answer:
            headers = buyer(attempt.user)
            if attempt.key is not None:
                headers["Idempotency-Key"] = attempt.key
            async with gate:
                for _ in range(3):
                    async with http.post(
                        f"/v1/sales/{attempt.sale_id}/reservations",
                        json={"qty": attempt.qty},
                        headers=headers,
                    ) as response:
                        body = await response.json(content_type=None)
                    if response.status != 503 or attempt.key is None:
                        break
            return Answer(attempt, response.status, body.get("code"), body.get("reservation_id"))

        return list(await asyncio.gather(*(one(a) for a in attempts)))


async def project_all(client: aioredis.Redis, pool: asyncpg.Pool, partitions: int) -> None:
    """Run a projector until PostgreSQL holds every logged event."""
    projector = Projector(client, pool, partitions, consumer="lost-replies", block_ms=10)
    await projector.ensure_groups()
    for _ in range(1000):
        while batch := await projector.read_new(block_ms=10):
            await projector.handle(batch)
        if await caught_up(client, pool, partitions):
            return
    raise AssertionError("the projector did not catch up")


@pytest.mark.single_redis(reason="a TCP proxy in front of one server")
@pytest.mark.parametrize("client_retries", [False, True], ids=["app-client", "retrying-client"])
async def test_every_placement_is_answered_202_when_replies_are_lost(
    make_gateway: GatewayFactory,
    settings: Settings,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    client_retries: bool,
):
    direct = make_gateway()
    for sale_id, limit in LIMITS.items():
        await open_sale(direct, sale_id, stock=STOCK[sale_id], per_user_limit=limit)
    assert settings.redis_url is not None
    target = urlsplit(settings.redis_url)
    async with ReplyDroppingProxy(
        target.hostname or "127.0.0.1", target.port or 6379, drop=0.07, seed=8
    ) as proxy:
        url = through(settings.redis_url, proxy.port)
        # The server is known to be single: the app's one blocking probe (INFO cluster)
        # would wait out its timeout on the proxy, which runs in this same event loop.
        lossy = settings.model_copy(update={"redis_url": url, "redis_cluster": "off"})
        client = client_with_retries(url) if client_retries else None
        try:
            answers = await fire(lossy, plan(random.Random(8)), client)
        finally:
            if client is not None:
                await client.aclose()
    await project_all(redis_client, pool, settings.partitions)

    statuses = Counter((a.status, a.code) for a in answers)
    answered = {a.reservation_id for a in answers if a.status == 202}
    assert None not in answered
    async with pool.acquire() as conn:
        orders = {
            r["reservation_id"]: (r["sale_id"], r["user_id"], r["qty"])
            for r in await conn.fetch("SELECT reservation_id, sale_id, user_id, qty FROM orders")
        }
    placed = [e for e in await log_events(direct) if isinstance(e, ReservationPlaced)]
    summary = (
        f"{len(answers)} attempts {dict(statuses)}; {len(answered)} answered 202, "
        f"{len(orders)} orders, {len(placed)} placed; {proxy.dropped} replies lost"
    )
    print(summary)
    assert proxy.dropped > 10, summary  # the faults did happen
    assert answered == set(orders) == {e.reservation_id for e in placed}, summary
    assert len(placed) == len(orders), summary
    for sale_id, limit in LIMITS.items():
        view = await direct.get_sale(sale_id)
        assert view is not None
        sold = sum(qty for sale, _, qty in orders.values() if sale == sale_id)
        assert view.stock - view.remaining == sold, (sale_id, summary)
        per_buyer = Counter[str]()
        for sale, user, qty in orders.values():
            if sale == sale_id:
                per_buyer[user] += qty
        assert max(per_buyer.values()) <= limit
    report = await verify(direct, pool)
    assert report.clean, report.to_table()
    # Each buyer's own list shows exactly their orders.
    listed: dict[str, tuple[str, str, int]] = {}
    for sale_id, user in {(a.attempt.sale_id, a.attempt.user) for a in answers}:
        views = await direct.reservations_of(sale_id, user)
        assert views is not None
        listed |= {v.reservation_id: (v.sale_id, v.user_id, v.qty) for v in views}
    assert listed == orders


# --- one lost reply at a time ---------------------------------------------------------------

RESERVE_REPLY = b"*4\r\n$2\r\nok\r\n"  # the reserve script's {"ok", id, expires_at, replayed}


def lose_reserve_replies(count: int) -> Callable[[bytes], bool]:
    """A ``lose`` predicate for the proxy: the first ``count`` replies of the reserve script."""
    lost = 0

    def lose(data: bytes) -> bool:
        nonlocal lost
        if data.startswith(RESERVE_REPLY) and lost < count:
            lost += 1
            return True
        return False

    return lose


@asynccontextmanager
async def lossy_client(
    settings: Settings, lose: Callable[[bytes], bool]
) -> AsyncIterator[tuple[aioredis.Redis, ReplyDroppingProxy]]:
    """A client whose connection to the test Redis loses the replies ``lose`` picks."""
    assert settings.redis_url is not None
    async with lossy_client_of(settings.redis_url, lose) as pair:
        yield pair


@asynccontextmanager
async def lossy_client_of(
    url: str, lose: Callable[[bytes], bool]
) -> AsyncIterator[tuple[aioredis.Redis, ReplyDroppingProxy]]:
    """A client whose connection to the Redis at ``url`` loses the replies ``lose`` picks."""
    target = urlsplit(url)
    async with ReplyDroppingProxy(
        target.hostname or "127.0.0.1", target.port or 6379, lose=lose
    ) as proxy:
        client = aioredis.Redis.from_url(through(url, proxy.port))
        try:
            yield client, proxy
        finally:
            await client.aclose()


@pytest.mark.single_redis(reason="a TCP proxy in front of one server")
async def test_a_lost_reserve_reply_is_retried_and_answered_with_its_placement(
    make_gateway: GatewayFactory, settings: Settings, gateway: RedisGateway
):
    await open_sale(gateway, stock=5, per_user_limit=1)
    async with lossy_client(settings, lose_reserve_replies(2)) as (client, proxy):
        lossy = make_gateway(client)
        placed = await lossy.reserve("sale-1", "ann", 1, None)
    assert proxy.dropped == 2
    assert not placed.replayed and placed.expires_at is not None  # not limit_reached
    events = [e for e in await log_events(gateway) if isinstance(e, ReservationPlaced)]
    assert [e.reservation_id for e in events] == [placed.reservation_id]
    view = await gateway.get_sale("sale-1")
    assert view is not None and (view.remaining, view.held) == (4, 1)


@pytest.mark.single_redis(reason="a TCP proxy in front of one server")
async def test_reserve_answers_503_with_the_id_it_tried_and_the_buyer_finds_it(
    settings: Settings, gateway: RedisGateway
):
    await open_sale(gateway, stock=5, per_user_limit=1)
    async with (
        lossy_client(settings, lose_reserve_replies(100)) as (client, _),
        serve(settings, client) as http,
    ):
        async with http.post(
            "/v1/sales/sale-1/reservations", json={"qty": 1}, headers=buyer("ann")
        ) as r:
            body = await r.json(content_type=None)
            assert (r.status, body["code"]) == (503, "unavailable"), body
            assert r.headers["Retry-After"] == "1"
            rid = body["reservation_id"]
            assert r.headers["Location"] == f"/v1/reservations/{rid}"
            assert rid in body["detail"]
        # Reads are answered: the buyer looks the id up, and lists what they hold.
        async with http.get(r.headers["Location"], headers=buyer("ann")) as r:
            assert r.status == 200
            assert (await r.json())["status"] == "pending"
        async with http.get("/v1/sales/sale-1/reservations/mine", headers=buyer("ann")) as r:
            assert r.status == 200
            mine = await r.json()
    assert [m["reservation_id"] for m in mine["reservations"]] == [rid]
    placed = [e for e in await log_events(gateway) if isinstance(e, ReservationPlaced)]
    assert [e.reservation_id for e in placed] == [rid]  # placed once, however often it ran


def lose_every_other(*prefixes: bytes) -> Callable[[bytes], bool]:
    """A ``lose`` predicate: every other reply that starts with one of ``prefixes``, so each
    call's first reply is lost and its retry's reply arrives."""
    seen = 0

    def lose(data: bytes) -> bool:
        nonlocal seen
        if not data.startswith(prefixes):
            return False
        seen += 1
        return seen % 2 == 1

    return lose


@pytest.mark.single_redis(reason="a TCP proxy in front of one server")
async def test_admin_and_lifecycle_calls_whose_reply_is_lost_answer_what_they_did(
    make_gateway: GatewayFactory, settings: Settings, gateway: RedisGateway
):
    changed = (b"*3\r\n$2\r\nok\r\n", b"*2\r\n$2\r\nok\r\n$1\r\n1\r\n")
    async with lossy_client(settings, lose_every_other(*changed)) as (client, proxy):
        lossy = make_gateway(client)
        await open_sale(lossy, stock=5, per_user_limit=2)  # not sale_exists
        ann = await gateway.reserve("sale-1", "ann", 1, None)
        bob = await gateway.reserve("sale-1", "bob", 2, None)
        assert await lossy.adjust_stock("sale-1", 4, None) is True
        assert await lossy.confirm(ann.reservation_id, "ann") is True
        assert await lossy.cancel(bob.reservation_id, "bob") is True
        assert await lossy.close_sale("sale-1") is True
    assert proxy.dropped == 5  # one reply of each call
    kinds = Counter(type(e).__name__ for e in await log_events(gateway))
    assert kinds == Counter(
        SaleCreated=1,
        ReservationPlaced=2,
        StockAdjusted=1,
        ReservationConfirmed=1,
        ReservationCancelled=1,
        SaleClosed=1,
    )
    view = await gateway.get_sale("sale-1")
    assert view is not None
    assert (view.stock, view.remaining, view.held, view.confirmed) == (9, 8, 0, 1)


async def test_a_lost_reply_under_wait_replicas_is_retried_and_covered_by_wait(
    make_gateway: GatewayFactory,
):
    primary = EmbeddedRedis(extra_args=["--repl-diskless-sync-delay", "0"])
    url = primary.start()
    replica = EmbeddedRedis(extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
    replica_url = replica.start()
    client = aioredis.Redis.from_url(url)
    replica_client = aioredis.Redis.from_url(replica_url)
    try:

        async def replica_acknowledges() -> bool:
            async with client.client() as conn:  # WAIT covers its own connection's writes
                await conn.set("probe", "1")
                return int(await conn.wait(1, 200)) == 1

        await eventually(replica_acknowledges, 15, "replica did not sync")
        direct = make_gateway(client, idempotency_ttl_seconds=3600)
        await open_sale(direct, stock=5, per_user_limit=1)
        for key in (None, "key-1"):
            async with lossy_client_of(url, lose_reserve_replies(1)) as (lossy_client, proxy):
                waiting = make_gateway(
                    lossy_client,
                    idempotency_ttl_seconds=3600,
                    wait_replicas=1,
                    wait_timeout_ms=5000,
                )
                user = f"ann-{key}"
                placed = await waiting.reserve("sale-1", user, 1, key)
                assert proxy.dropped == 1
            assert not placed.replayed  # the retry answered its own placement
            rkey = direct.keys_for_sale("sale-1").reservation(placed.reservation_id)
            assert await replica_client.hget(rkey, "user_id") == user.encode()
        placed_events = [e for e in await log_events(direct) if isinstance(e, ReservationPlaced)]
        assert len(placed_events) == 2
    finally:
        await client.aclose()
        await replica_client.aclose()
        replica.stop()
        primary.stop()


# --- the buyer's own reservations ------------------------------------------------------------


async def test_a_buyer_lists_their_own_reservations_of_a_sale_whatever_their_status(
    settings: Settings, gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    # ``pool`` empties PostgreSQL: the list also reads the buyer's pruned ones from orders.
    await open_sale(gateway, stock=10, per_user_limit=3)
    await open_sale(gateway, "sale-2", stock=10, per_user_limit=3)
    first = await gateway.reserve("sale-1", "ann", 1, None)
    second = await gateway.reserve("sale-1", "ann", 2, None)
    await gateway.cancel(first.reservation_id, "ann")
    await gateway.confirm(second.reservation_id, "ann")
    third = await gateway.reserve("sale-1", "ann", 1, None)
    await gateway.reserve("sale-1", "bob", 1, None)
    await gateway.reserve("sale-2", "ann", 1, None)
    async with serve(settings, redis_client) as http:

        async def mine(user: str | None, sale_id: str = "sale-1") -> tuple[int, Any]:
            headers = buyer(user) if user else {}
            async with http.get(f"/v1/sales/{sale_id}/reservations/mine", headers=headers) as r:
                return r.status, await r.json(content_type=None)

        status, body = await mine("ann")
        assert status == 200 and body["sale_id"] == "sale-1"
        listed = [(r["reservation_id"], r["status"], r["qty"]) for r in body["reservations"]]
        deadlines = [r["expires_at"] for r in body["reservations"]]
        assert deadlines == sorted(deadlines)  # oldest first (placed within a ms: any order)
        assert sorted(listed) == sorted(
            [
                (first.reservation_id, "cancelled", 1),
                (second.reservation_id, "confirmed", 2),
                (third.reservation_id, "pending", 1),
            ]
        )
        assert all(r["user_id"] == "ann" and r["expires_at"] for r in body["reservations"])
        assert (await mine("carl"))[1]["reservations"] == []  # none in this sale
        # An id whose hash pruning removed a moment ago (it drops the id from the set next).
        keys = gateway.keys_for_sale("sale-1")
        await redis_client.sadd(keys.user_reservations("sale-1", "ann"), "0-pruned")
        assert (await mine("ann"))[1] == body
        status, body = await mine("ann", "no-such-sale")
        assert (status, body["code"]) == (404, "sale_not_found")
        status, body = await mine(None)
        assert (status, body["code"]) == (401, "unauthorized")
