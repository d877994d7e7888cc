"""Script calls coalesced into one pipeline per event-loop turn (``ScriptPipeline``): each
caller gets its own reply or its own error, on the real Redis.

The calls of one test are started together with ``asyncio.gather``, so they are all queued
in the same loop turn; a spy on the client's ``pipeline`` counts the batches sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from api.cli.launcher import EmbeddedRedis
from core.errors import NotReplicated
from core.events import ReservationPlaced
from core.gateway import Placed, RedisGateway
from core.gateway.pipelining import ScriptPipeline
from core.settings import Settings
from tests.conftest import ON_CLUSTER, GatewayFactory
from tests.helpers import open_sale
from tests.http_helpers import log_events
from tests.test_lost_replies import RESERVE_REPLY, lossy_client


def count_pipelines(monkeypatch: pytest.MonkeyPatch, client: aioredis.Redis) -> list[int]:
    """Spy on ``client.pipeline``: the list grows by one per pipeline opened."""
    opened: list[int] = []
    real = client.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        opened.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "pipeline", pipeline)
    return opened


async def outcomes(gateway: RedisGateway, users: list[str]) -> list[Placed | BaseException]:
    """Every user's reserve call of one unit of ``sale-1``, all in one loop turn."""
    calls = [gateway.reserve("sale-1", user, 1, None) for user in users]
    return list(await asyncio.gather(*calls, return_exceptions=True))


def kinds(answers: list[Placed | BaseException]) -> list[str]:
    return ["placed" if isinstance(a, Placed) else type(a).__name__ for a in answers]


async def test_callers_of_one_turn_share_a_pipeline_and_each_gets_its_own_answer(
    gateway: RedisGateway, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
):
    await open_sale(gateway, stock=3, per_user_limit=1)
    opened = count_pipelines(monkeypatch, redis_client)
    answers = await outcomes(gateway, ["ann", "ann", "bob", "cat", "dan", "eve"])
    assert len(opened) == 1  # one batch, one round trip
    # The scripts run in the order they were asked for: placements, a limit, sold outs.
    assert kinds(answers) == [
        "placed",
        "LimitReached",
        "placed",
        "placed",
        "SoldOut",
        "SoldOut",
    ]
    ids = [a.reservation_id for a in answers if isinstance(a, Placed)]
    assert len(set(ids)) == 3
    placed = [e for e in await log_events(gateway) if isinstance(e, ReservationPlaced)]
    assert sorted((e.reservation_id, e.user_id) for e in placed) == sorted(
        zip(ids, ["ann", "bob", "cat"], strict=True)
    )


async def test_a_call_whose_reply_is_an_error_does_not_fail_its_neighbours(
    redis_client: aioredis.Redis,
):
    incr = redis_client.register_script("return redis.call('INCR', KEYS[1])")
    await redis_client.hset("a-hash", "field", "1")  # INCR on it is a WRONGTYPE error
    scripts = ScriptPipeline(redis_client)
    answers = await asyncio.gather(
        scripts.run(incr, ["counter"], []),
        scripts.run(incr, ["a-hash"], []),
        scripts.run(incr, ["counter"], []),
        return_exceptions=True,
    )
    assert answers[0] == 1 and answers[2] == 2
    assert isinstance(answers[1], ResponseError) and "WRONGTYPE" in str(answers[1])


async def test_calls_meeting_noscript_after_a_flush_are_loaded_and_sent_again(
    make_gateway: GatewayFactory,
):
    # A Redis of its own: SCRIPT FLUSH empties the script cache of the whole server.
    server = EmbeddedRedis()
    client = aioredis.Redis.from_url(server.start())
    try:
        gateway = make_gateway(client)
        await open_sale(gateway, stock=10, per_user_limit=1)
        await gateway.load_scripts()
        await client.script_flush()
        answers = await outcomes(gateway, [f"user-{n}" for n in range(6)])
        assert kinds(answers) == ["placed"] * 6
        placed = [e for e in await log_events(gateway) if isinstance(e, ReservationPlaced)]
        assert len(placed) == 6  # each ran once: a NOSCRIPT reply means it did not run
    finally:
        await client.aclose()
        server.stop()


def lose_first_batch_reply() -> Callable[[bytes], bool]:
    """A ``lose`` predicate: the first reply chunk that carries reserve replies."""
    lost = False

    def lose(data: bytes) -> bool:
        nonlocal lost
        if not lost and RESERVE_REPLY in data:
            lost = True
            return True
        return False

    return lose


@pytest.mark.single_redis(reason="a TCP proxy in front of one server")
async def test_a_batch_whose_replies_are_lost_is_retried_and_each_caller_gets_its_placement(
    make_gateway: GatewayFactory, settings: Settings, gateway: RedisGateway
):
    await open_sale(gateway, stock=5, per_user_limit=1)
    async with lossy_client(settings, lose_first_batch_reply()) as (client, proxy):
        lossy = make_gateway(client)
        answers = await outcomes(lossy, ["ann", "bob", "cat", "dan", "eve", "fay", "gus"])
    assert proxy.dropped == 1
    # Every script ran twice with the same ids; the retries answered the first outcomes.
    assert kinds(answers) == ["placed"] * 5 + ["SoldOut"] * 2
    assert all(not a.replayed for a in answers if isinstance(a, Placed))
    placed = [e for e in await log_events(gateway) if isinstance(e, ReservationPlaced)]
    assert sorted(e.reservation_id for e in placed) == sorted(
        a.reservation_id for a in answers if isinstance(a, Placed)
    )
    view = await gateway.get_sale("sale-1")
    assert view is not None and (view.remaining, view.held) == (0, 5)


async def test_one_wait_covers_a_batch_and_each_placement_learns_it_was_not_replicated(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
):
    # One more replica than the test Redis has (none; one per primary of a cluster): WAIT
    # answers fewer after its timeout.
    waiting = make_gateway(wait_replicas=2 if ON_CLUSTER else 1, wait_timeout_ms=50)
    await open_sale(make_gateway(), stock=2, per_user_limit=1)
    opened = count_pipelines(monkeypatch, redis_client)
    answers = await outcomes(waiting, ["ann", "ann", "bob", "cat"])
    assert len(opened) == 1
    assert [type(a).__name__ for a in answers] == [
        "NotReplicated",
        "LimitReached",
        "NotReplicated",
        "SoldOut",
    ]
    held = [a.reservation_id for a in answers if isinstance(a, NotReplicated)]
    placed = [e for e in await log_events(waiting) if isinstance(e, ReservationPlaced)]
    assert sorted(held) == sorted(e.reservation_id for e in placed)
