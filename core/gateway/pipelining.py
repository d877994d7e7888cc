"""Coalescing script calls: every EVALSHA asked for during one event-loop turn goes to Redis
in one pipeline, on one connection, in one round trip.

Under a stampede a process has a hundred purchases in flight; sent one by one, each pays a
round trip and the client's per-command overhead (issue 10 measured one process at 19-24k
script calls/s that way, and at 49-52k/s with one pipeline per loop turn). Nothing about a
call changes: each script still runs atomically on its own, and each caller still
gets its own reply or its own error.

- A reply that is an error (a script that failed, or any ``ResponseError``) fails its own
  caller only: the pipeline runs with ``raise_on_error=False`` and every result is mapped
  back to the caller that asked for it.
- NOSCRIPT (the server's script cache was flushed or it restarted): the scripts are loaded
  again and only the calls that met it are sent once more (they did not run).
- A lost reply (the connection failed mid-pipeline) fails every caller of that batch with
  the connection error, whatever ran: each caller retries with the same ids, which is safe
  because every state-changing script answers a repeated run with its first outcome.
- WAIT: calls that need their writes on replicas get one WAIT after the batch, on the same
  connection, which covers every write the connection made; each such caller gets the
  number of replicas that acknowledged.

On a Redis Cluster the batch is a cluster pipeline: it sends each node its own calls, in
order, on one connection of that node, so every caller still gets its own reply or error.
What changes:

- WAIT counts the replicas of one primary, for the writes of one connection: each node
  that ran replicated calls gets its own WAIT, sent after its calls on the same
  connection. A call that a MOVED reply sent to another node (redis-py resends it there
  on its own) is not covered by that WAIT, so it is sent again in a new round, to its new
  node (a repeated run answers its first outcome and writes again, see reservations).
- NOSCRIPT comes from a primary that lacks the scripts (a replica promoted by a failover
  never got them): they are loaded on every primary again.
- A connection that fails, or a cluster that says it is down, also makes the client read
  the cluster's layout again before the callers retry.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from core.gateway.clients import RedisClient, load_everywhere, refresh_layout

# Rounds of "load the scripts again, send what met NOSCRIPT again" before giving up.
NOSCRIPT_ROUNDS = 2


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: list[str]
    args: list[Any]
    replicated: bool
    answer: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class Replicated:
    """A script's reply, and how many replicas acknowledged its batch's writes (WAIT)."""

    reply: Any
    acknowledged: int


class ScriptPipeline:
    """Runs script calls, coalesced into one pipeline per event-loop turn.

    A call queues itself and awaits its own answer; the first call of a turn schedules the
    flush for the next turn, by which time every request handler that was ready in this
    one has queued its call too. Batches do not wait for each other: a batch still waiting
    for its replies does not hold back the next one.
    """

    def __init__(
        self, client: RedisClient, wait_replicas: int = 0, wait_timeout_ms: int = 1000
    ) -> None:
        self.client = client
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._queued: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """The reply of ``script`` run with ``keys`` and ``args``.

        Raises this call's own Redis error (its reply was an error), or the connection
        error that lost the replies of its whole batch.
        """
        return await self._enqueue(script, keys, args, replicated=False)

    async def run_replicated(
        self, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> Replicated:
        """Like ``run``, then WAIT for ``wait_replicas`` replicas (at most
        ``wait_timeout_ms``) on the connection that ran it: one WAIT per batch."""
        reply, acknowledged = await self._enqueue(script, keys, args, replicated=True)
        return Replicated(reply, acknowledged)

    def _enqueue(
        self, script: AsyncScript, keys: list[str], args: list[Any], *, replicated: bool
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, replicated, loop.create_future())
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append(call)
        return call.answer

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                missing = await self._round(pipe, batch)
                for _ in range(NOSCRIPT_ROUNDS):
                    if not missing:
                        return
                    # They did not run (NOSCRIPT), or ran where the WAIT did not look (a
                    # MOVED on a cluster): load the scripts again and send them once more.
                    for script in {id(c.script): c.script for c in missing}.values():
                        await load_everywhere(self.client, script.script)
                    missing = await self._round(pipe, missing)
            _fail(missing, NoScriptError("NOSCRIPT again after loading the scripts"))
        except Exception as e:  # every caller still waiting learns what became of its call
            await refresh_layout(self.client, e)
            _fail(batch, e)

    async def _round(self, pipe: Any, calls: list[_Call]) -> list[_Call]:
        """Send ``calls`` in one pipeline and answer each of them, except those that met
        NOSCRIPT (or, on a cluster, replicated ones that ran on another node than their
        WAIT), which it returns."""
        for call in calls:
            # Raw: a cluster pipeline refuses its evalsha method, not the command.
            pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        waits = self._queue_waits(pipe, [call for call in calls if call.replicated])
        replies = await pipe.execute(raise_on_error=False)
        acknowledged: dict[str | None, Any] = {}
        for name in reversed(waits):
            acknowledged[name] = replies.pop()
        missing = []
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, NoScriptError):
                missing.append(call)
            elif call.answer.done():  # its caller was cancelled
                continue
            elif isinstance(reply, Exception):
                call.answer.set_exception(reply)
            elif not call.replicated:
                call.answer.set_result(reply)
            elif (node := self._node_of(call)) not in acknowledged:
                missing.append(call)  # MOVED elsewhere: its WAIT was not on its connection
            elif isinstance(acknowledged[node], Exception):
                call.answer.set_exception(acknowledged[node])
            else:
                call.answer.set_result((reply, int(acknowledged[node])))
        return missing

    def _queue_waits(self, pipe: Any, replicated: list[_Call]) -> list[str | None]:
        """Queue the WAITs of ``replicated`` after their calls; returns the node name of each
        WAIT in order (None: the one server)."""
        if not replicated:
            return []
        if not isinstance(self.client, RedisCluster):
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            return [None]
        nodes: dict[str, ClusterNode] = {}
        for call in replicated:
            node = self.client.get_node_from_key(call.keys[0])
            if node is not None:
                nodes[node.name] = node
        for node in nodes.values():
            pipe.execute_command(
                "WAIT", self.wait_replicas, self.wait_timeout_ms, target_nodes=node
            )
        return list(nodes)

    def _node_of(self, call: _Call) -> str | None:
        """Name of the node that owns the call's keys now (None: the one server)."""
        if not isinstance(self.client, RedisCluster):
            return None
        node = self.client.get_node_from_key(call.keys[0])
        return node.name if node is not None else ""


def _fail(calls: list[_Call], error: Exception) -> None:
    for call in calls:
        if not call.answer.done():
            call.answer.set_exception(error)
