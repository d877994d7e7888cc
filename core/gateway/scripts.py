"""The gateway's base: the Lua script registry, running a script (coalesced with the other
calls of the same event-loop turn) with its rejections mapped to errors, and the retry
policy for calls whose reply was lost."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import structlog
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MaxConnectionsError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.errors import REJECTIONS, InfrastructureError
from core.gateway.clients import RedisClient, load_everywhere
from core.gateway.decode import text
from core.gateway.hints import SoldOutHints
from core.gateway.pipelining import ScriptPipeline
from core.keys import PartitionKeys, partition_of

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Errors after which a command may or may not have run: its reply was lost.
LOST_REPLY = (RedisConnectionError, RedisTimeoutError)
# Errors of a command that did not run and may soon: no free connection in the pool (it is
# a ConnectionError too, so it comes first); on a cluster, a slot being moved (TRYAGAIN, and
# MOVED or ASK still bouncing between nodes that do not yet agree where the slot is), or a
# cluster in the middle of a failover (down, or a slot without a known owner).
NOT_RUN = (
    MaxConnectionsError,
    TryAgainError,
    AskError,  # MovedError too
    ClusterDownError,
    SlotNotCoveredError,
)
# How long create, close, stock adjustment and expiry remember an operation id's outcome:
# far longer than any retry of the same call, short enough that the records take little
# memory. (Confirm and cancel keep theirs in the reservation's hash.)
OPERATION_TTL_SECONDS = 300
# How long a partition's mark (``core/lua/mark.lua``) outlives the last write to it.
MARK_TTL_MS = 3_600_000


def new_id() -> str:
    """32 random hex digits: an id for a reservation, an event or an operation (as unique
    as a uuid4's hex, at a quarter of its cost on the purchase path)."""
    return os.urandom(16).hex()


def load_lua(name: str) -> str:
    """Source of ``core/lua/<name>.lua``."""
    return resources.files("core").joinpath("lua", f"{name}.lua").read_text()


class PartitionMarks:
    """How many replicas hold every write made so far to some partitions.

    For each partition it writes the partition's mark (``core/lua/mark.lua``) and runs WAIT
    on that connection, through ``scripts`` (one pipeline and one WAIT per node): WAIT
    counts its own connection's writes only, and replication is one ordered stream per
    primary, so replicas that have the mark have every write made before it, whichever
    connection made it. The projector checks its batches with it, and the admin's sale
    writes their answers."""

    def __init__(self, client: RedisClient, partitions: int, scripts: ScriptPipeline) -> None:
        self.script: AsyncScript = client.register_script(load_lua("mark"))
        self._keys = [PartitionKeys(p, partitions).mark for p in range(partitions)]
        self._scripts = scripts

    async def acknowledged(self, partitions: Iterable[int]) -> int:
        """The fewest replicas that acknowledged the mark of any of ``partitions`` within
        the pipeline's WAIT timeout (its ``wait_replicas`` when there are none)."""
        replies = await asyncio.gather(
            *(
                self._scripts.run_replicated(self.script, [self._keys[p]], [MARK_TTL_MS])
                for p in set(partitions)
            )
        )
        return min((r.acknowledged for r in replies), default=self._scripts.wait_replicas)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the gateway retries a call, with the same ids each time.

    Between tries it sleeps ``backoff`` seconds, doubled each time up to ``max_backoff``,
    and it starts no new try once ``deadline`` seconds have passed since the first. A call
    whose reply was lost (it may have run) gets at most ``attempts`` tries; a call that
    did not run (a full pool, a slot being moved, a failover) is tried until the deadline,
    so that buyers wait out a slot move of up to that long instead of getting 503s.
    """

    # Calls run in batches (one pipeline per loop turn), and the calls of a batch whose
    # reply was lost are retried together, in one batch again: their losses go together.
    attempts: int = 6
    backoff: float = 0.02
    max_backoff: float = 0.2
    deadline: float = 2.0


class GatewayBase:
    """What every command family of the gateway shares: the client, the partition count,
    the options, the registered scripts (EVALSHA, loaded once per client) and the way a
    call is run and retried."""

    def __init__(
        self,
        client: RedisClient,
        partitions: int,
        idempotency_ttl: int,
        sold_out_hint_seconds: float = 0.0,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.client = client
        self.retry = retry or RetryPolicy()
        self.partitions = partitions
        self.idempotency_ttl = idempotency_ttl
        # Replicas that must acknowledge a placement, a payment, a cancellation or an
        # admin's write to a sale (Redis WAIT) before its call returns.
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.sold_out_hints = SoldOutHints(sold_out_hint_seconds)
        # Every script call goes through it: one pipeline, one round trip per loop turn.
        self.scripts = ScriptPipeline(client, wait_replicas, wait_timeout_ms)
        self._background: set[asyncio.Task[None]] = set()
        self._create_sale: AsyncScript = client.register_script(load_lua("create_sale"))
        self._reserve: AsyncScript = client.register_script(load_lua("reserve"))
        self._fence: AsyncScript = client.register_script(load_lua("fence_sale"))
        self._read_batch: AsyncScript = client.register_script(load_lua("read_reservations"))
        self._confirm: AsyncScript = client.register_script(load_lua("confirm"))
        self._cancel: AsyncScript = client.register_script(load_lua("cancel"))
        self._expire: AsyncScript = client.register_script(load_lua("expire"))
        self._adjust_stock: AsyncScript = client.register_script(load_lua("adjust_stock"))
        self._close_sale: AsyncScript = client.register_script(load_lua("close_sale"))
        self._repair_sale: AsyncScript = client.register_script(load_lua("repair_sale"))
        self.marks = PartitionMarks(client, partitions, self.scripts)

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script now, so no request pays for a first-call NOSCRIPT retry."""
        scripts = (
            self._create_sale,
            self._reserve,
            self._fence,
            self._read_batch,
            self._confirm,
            self._cancel,
            self._expire,
            self._adjust_stock,
            self._close_sale,
            self._repair_sale,
            self.marks.script,
        )
        try:
            for script in scripts:
                await load_everywhere(self.client, script.script)
        except RedisError as e:
            raise InfrastructureError(f"cannot load the Lua scripts into redis: {e}") from e

    def keys_for_sale(self, sale_id: str) -> PartitionKeys:
        """Key builder of the partition that owns ``sale_id``."""
        return self.keys_for_partition(partition_of(sale_id, self.partitions))

    def keys_for_partition(self, partition: int) -> PartitionKeys:
        """Key builder of partition ``partition`` (of this gateway's partitions)."""
        return PartitionKeys(partition, self.partitions)

    def stream_names(self) -> list[str]:
        """Every partition's event stream, in partition order."""
        return [self.keys_for_partition(p).events for p in range(self.partitions)]

    async def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(await self.client.ping())
        except (RedisError, RedisClusterException):
            return False

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` on its own, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``call`` until it answers, again after a lost reply, within ``self.retry``.

        Only for calls that are safe to repeat: reads, and scripts run with the same ids.
        Raises ``InfrastructureError`` when Redis fails otherwise or the budget runs out.
        """
        started = time.monotonic()
        delay = self.retry.backoff
        attempt = 1
        while True:
            try:
                return await call()
            except NOT_RUN as e:  # not run, and may soon: wait and try again
                if time.monotonic() - started + delay >= self.retry.deadline:
                    raise InfrastructureError(f"{what}: redis busy: {e!r}") from e
                log.warning("redis_busy", what=what, attempt=attempt, error=repr(e))
            except LOST_REPLY as e:
                spent = time.monotonic() - started
                if attempt >= self.retry.attempts or spent + delay >= self.retry.deadline:
                    raise InfrastructureError(
                        f"{what}: no reply from redis after {attempt} attempts: {e}"
                    ) from e
                log.warning("redis_reply_lost", what=what, attempt=attempt, error=str(e))
            except (RedisError, RedisClusterException) as e:
                raise InfrastructureError(f"{what} failed: {e}") from e
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry.max_backoff)
            attempt += 1

    async def _call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> list[str]:
        """One run of a script; raises the script's rejection, lets Redis errors through."""
        return answer_of(await self.scripts.run(script, keys, args))

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> list[str]:
        """Run a script, again with the same arguments after a lost reply (every
        state-changing script answers a repeated run with its first outcome)."""
        return await self._retrying(lambda: self._call(script, keys, args), "redis script")


def answer_of(reply: list[Any]) -> list[str]:
    """A script's reply as text; raises the rejection it names (``err``, code)."""
    result = [text(item) for item in reply]
    if result[0] == "err":
        raise REJECTIONS[result[1]]()
    return result
