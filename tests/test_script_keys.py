"""Every key a Lua script touches is one its caller passed in KEYS, as Redis Cluster's managed
services demand (ElastiCache, MemoryDB and Dragonfly refuse scripts that touch others).

Each script is loaded with a prelude that shadows ``redis`` inside it: ``redis.call`` and
``redis.pcall`` check every key argument of the command (at the positions Redis itself
reports in ``COMMAND``) against KEYS, and fail the script when one is missing or the
command's key positions are unknown. The real scenarios then run through the gateway, the
expiry worker, the leases and the verify lock against the real Redis. The prelude counts
what it checked in a hash, so the test also proves that every script in ``core/lua`` ran its
commands through the check, and a deliberately wrong script shows that the check does catch
a stray key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from importlib import resources
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

import consumers.leases
import core.gateway.records
import core.gateway.repair
import core.gateway.scripts
from consumers.expiry import ExpiryWorker
from consumers.faults import ReplicasBehind
from consumers.leases import PartitionLeases
from consumers.replicas import ReplicaCheck
from core.errors import NotReplicated, SaleNotReplicated
from core.gateway import RedisGateway, ReservationRecord, SaleRepair, Touched
from core.models import NewSale
from tests.conftest import GatewayFactory
from tests.helpers import open_sale

# The check itself breaks a cluster's rule: every script records into RECORD, a key in a
# slot of its own. What it proves (every key in KEYS) is what lets the scripts run there.
pytestmark = pytest.mark.single_redis(reason="the key check records into one key of its own")

# Where the prelude records what it saw: "<script>:<COMMAND>" -> commands checked, and
# "violations" -> keys touched that were not in KEYS. (A test key, outside the key schema.)
RECORD = "script-key-check"

PRELUDE = """
local __script = %(script)s
local __record = %(record)s
local __spec = {%(spec)s}
local __declared = {}
for _, key in ipairs(KEYS) do __declared[key] = true end
local __redis = redis
local function __check(name, ...)
    local command = string.upper(name)
    local spec = __spec[command]
    local args = {...}
    local bad
    if not spec then
        bad = 'no known key positions for ' .. command
    elseif spec[1] > 0 then
        local last = spec[2]
        if last < 0 then last = #args + 1 + last end
        for i = spec[1], last, spec[3] do
            if not __declared[tostring(args[i])] then
                bad = command .. ' touches ' .. tostring(args[i]) .. ', not in KEYS'
                break
            end
        end
    end
    if bad then
        __redis.call('HINCRBY', __record, 'violations', 1)
        __redis.call('HSET', __record, 'violation', __script .. ': ' .. bad)
        error('undeclared key in ' .. __script .. ': ' .. bad)
    end
    __redis.call('HINCRBY', __record, __script .. ':' .. command, 1)
end
local redis = setmetatable({
    call = function(name, ...) __check(name, ...) return __redis.call(name, ...) end,
    pcall = function(name, ...) __check(name, ...) return __redis.pcall(name, ...) end,
}, {__index = __redis})
"""


def lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def key_positions(client: aioredis.Redis) -> str:
    """A Lua table of (first, last, step) key positions per command, from Redis's COMMAND.
    Commands whose keys move with their arguments, and container commands (whose
    subcommands hold the positions), are left out: a script using one fails the check."""
    entries = []
    for name, info in (await client.command()).items():
        if "movablekeys" in info["flags"] or info["subcommands"]:
            continue
        first, last, step = info["first_key_pos"], info["last_key_pos"], info["step_count"]
        entries.append(f"[{lua_string(str(name).upper())}] = {{{first}, {last}, {step}}}")
    return ", ".join(entries)


@pytest.fixture
async def checked(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], str]:
    """Every script registered from here on (gateway, pruning, leases, the verify lock) runs
    checked.
    Returns the prelude of a script name, for a test's own scripts."""
    spec = await key_positions(redis_client)
    original = core.gateway.scripts.load_lua

    def prelude(name: str) -> str:
        return PRELUDE % {"script": lua_string(name), "record": lua_string(RECORD), "spec": spec}

    def load(name: str) -> str:
        return prelude(name) + original(name)

    modules = (
        core.gateway.scripts,
        core.gateway.repair,
        core.gateway.records,
        consumers.leases,
    )
    for module in modules:
        monkeypatch.setattr(module, "load_lua", load)
    return prelude


async def recorded(client: aioredis.Redis) -> dict[str, int]:
    raw: dict[Any, Any] = await client.hgetall(RECORD)
    return {k.decode(): int(v) for k, v in raw.items() if k != b"violation"}


def every_script() -> set[str]:
    lua = resources.files("core").joinpath("lua")
    return {p.name.removesuffix(".lua") for p in lua.iterdir() if p.name.endswith(".lua")}


async def test_the_check_catches_an_undeclared_key(
    checked: Callable[[str], str], redis_client: aioredis.Redis
) -> None:
    assert "__check" in core.gateway.scripts.load_lua("reserve")
    # Like expire.lua once did: a key built from ARGV instead of passed in KEYS.
    body = "redis.call('SET', KEYS[1], 'x') return redis.call('HGET', ARGV[1] .. ARGV[2], 'f')"
    stray = redis_client.register_script(checked("stray") + body)
    with pytest.raises(ResponseError, match="undeclared key in stray: HGET touches fs:x, not in"):
        await stray(keys=["declared"], args=["fs:", "x"])
    assert await stray(keys=["declared", "fs:x"], args=["fs:", "x"]) is None
    unknown = redis_client.register_script(checked("unknown") + "return redis.call('SORT', 'k')")
    with pytest.raises(ResponseError, match="no known key positions for SORT"):
        await unknown(keys=["k"])
    counts = await recorded(redis_client)
    assert counts == {"violations": 2, "stray:SET": 2, "stray:HGET": 1}


async def test_every_script_touches_only_its_keys(
    checked: Callable[[str], str],
    make_gateway: GatewayFactory,
    redis_client: aioredis.Redis,
) -> None:
    gateway: RedisGateway = make_gateway()
    await gateway.load_scripts()
    await run_every_scenario(gateway, redis_client)
    counts = await recorded(redis_client)
    assert "violations" not in counts, await redis_client.hget(RECORD, "violation")
    ran = {name.split(":")[0] for name in counts}
    assert ran == every_script(), "a script ran no checked command"
    # The commands that change state went through the check, not only the first reads.
    for name in ("expire:XADD", "expire:HINCRBY", "expire:ZREM", "reserve:XADD", "cancel:XADD"):
        assert counts.get(name, 0) > 0, name
    for name in ("repair_sale:HSET", "prune_reservations:DEL", "fence_sale:HMGET"):
        assert counts.get(name, 0) > 0, name
    for name in ("lease_take:SET", "lease_renew:PEXPIRE", "lease_release:DEL", "mark:INCR"):
        assert counts.get(name, 0) > 0, name


class TouchedAlways:
    """A sale log that says the same users and reservations were touched after any
    position, so that the fence re-reads them through its KEYS."""

    def __init__(self, users: set[str], reservations: set[str]) -> None:
        self.users = users
        self.reservations = reservations

    async def touched_since(self, sale_id: str, partition: int, after: str) -> Touched:
        return Touched(after, set(self.users), set(self.reservations))


async def run_every_scenario(gateway: RedisGateway, client: aioredis.Redis) -> None:
    """Create, reserve (with and without an Idempotency-Key), confirm, cancel (and their
    repeats under WAIT), expire, adjust, close, snapshot (read and fence), repair, prune,
    the partition leases, the projector's replication check and the verify lock."""
    await open_sale(gateway, "sale-1", stock=20, per_user_limit=2)
    await open_sale(gateway, "sale-2", stock=20, per_user_limit=2, hold_seconds=0)
    kept = await gateway.reserve("sale-1", "ann", 1, "key-1")
    again = await gateway.reserve("sale-1", "ann", 1, "key-1")
    assert again.replayed and again.reservation_id == kept.reservation_id
    paid = await gateway.reserve("sale-1", "bob", 1, None)
    dropped = await gateway.reserve("sale-1", "cat", 1, None)
    assert await gateway.confirm(paid.reservation_id, "bob") is True
    assert await gateway.cancel(dropped.reservation_id, "cat") is True
    # Repeats that WAIT for a replica rewrite what they find done (whether or not the
    # session's Redis has a replica to acknowledge it).
    waiting = RedisGateway(
        client, gateway.partitions, gateway.idempotency_ttl, wait_replicas=1, wait_timeout_ms=10
    )
    with contextlib.suppress(NotReplicated):
        assert (await waiting.reserve("sale-1", "ann", 1, "key-1")).replayed
    with contextlib.suppress(NotReplicated):
        assert await waiting.confirm(paid.reservation_id, "bob") is False
    with contextlib.suppress(NotReplicated):
        assert await waiting.cancel(dropped.reservation_id, "cat") is False
    # A sale opened with an Idempotency-Key, and the repeat (under WAIT) that finds it open.
    for _ in range(2):
        with contextlib.suppress(SaleNotReplicated):
            await waiting.create_sale(NewSale(sale_id="sale-3", stock=1), "open-1")
    overdue = [await gateway.reserve("sale-2", f"u{i}", 1, None) for i in range(5)]
    partition = gateway.keys_for_sale("sale-2").partition
    assert await gateway.expire_due(partition, limit=2) == (2, 3)
    assert await ExpiryWorker(gateway).sweep() == 3
    assert await gateway.adjust_stock("sale-1", 5, None) is True
    assert await gateway.adjust_stock("sale-1", -2, "withdraw-1") is True
    snap = await gateway.snapshot_sale("sale-1", TouchedAlways({"ann"}, {kept.reservation_id}))
    assert snap.reservations[kept.reservation_id][0] == "pending"
    first = overdue[0].reservation_id
    repair = SaleRepair(
        "sale-1",
        snap.last_id,
        {"remaining": snap.counters["remaining"]},
        holders={"ann": 1, "zed": 0},
        reservations=[
            ReservationRecord(kept.reservation_id, "pending", 1, "ann", 1, 2**40),
            ReservationRecord("0-gone", ""),
        ],
        deadlines={kept.reservation_id: 2**40},
    )
    assert await gateway.repair_sale(repair) is None
    assert await gateway.close_sale("sale-1") is True
    gone, pending = await gateway.prune_reservations(
        "sale-2", [(first, "u0"), (overdue[1].reservation_id, "u1")]
    )
    assert (gone, pending) == (2, 0)
    leases = PartitionLeases(client, gateway.partitions, "projector", "c1", lease_ms=5000)
    assert await leases.refresh() == set(range(gateway.partitions))
    assert await leases.refresh() == set(range(gateway.partitions))  # renewed
    await leases.release_all()
    # The projector's replication check (whether or not the session's Redis has a replica).
    check = ReplicaCheck(client, gateway.partitions, wait_replicas=1, wait_timeout_ms=10)
    with contextlib.suppress(ReplicasBehind):
        await check.wait_for(range(gateway.partitions))
    token = await gateway.take_verify_lock(60_000)
    assert token is not None and await gateway.release_verify_lock(token) is True


async def test_expiry_checks_each_id_again(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    """Ids read as overdue but confirmed, expired by another worker or gone meanwhile are
    left alone, and a pending one whose sale was not passed waits for a later call."""
    gateway = make_gateway()
    await open_sale(gateway, stock=5, per_user_limit=5, hold_seconds=0)
    placed = [await gateway.reserve("sale-1", "ann", 1, None) for _ in range(4)]
    keys = gateway.keys_for_sale("sale-1")
    await redis_client.hset(keys.reservation(placed[0].reservation_id), "status", "confirmed")
    await redis_client.delete(keys.reservation(placed[1].reservation_id))
    rids = [p.reservation_id for p in placed]
    script_keys = [keys.deadlines, keys.events, keys.operation("op-1")]
    script_keys += [keys.reservation(rid) for rid in rids[:3]]
    args: list[Any] = [60, 3, *rids[:3]]  # no sale passed: the pending one stays
    assert await gateway._expire(keys=script_keys, args=args) == [0, 2]
    assert await redis_client.zcard(keys.deadlines) == 2  # the stale two left the deadlines
    script_keys += [keys.sale("sale-1"), keys.holders("sale-1")]
    args += ["sale-1"]
    assert await gateway._expire(keys=script_keys, args=args) == [1, 1]
    assert await gateway._expire(keys=script_keys, args=args) == [1, 1]  # a repeat: the same
    other = [keys.deadlines, keys.events, keys.operation("op-2"), *script_keys[3:]]
    assert await gateway._expire(keys=other, args=args) == [0, 1]  # another worker: nothing
    view = await gateway.get_sale("sale-1")
    assert view is not None and (view.remaining, view.held, view.released) == (2, 3, 1)
    assert await ExpiryWorker(gateway).sweep() == 1
