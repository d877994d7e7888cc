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

On a Redis Cluster the batch is split by node, and each node gets a pipeline of its own
(its calls in order, on one connection of that node), all sent at once, so every caller
still gets its own reply or error. What changes:

- A node that fails (killed, unreachable) fails the callers of its own calls only: the
  other nodes' calls ran and are answered. (One cluster pipeline for the whole batch
  would lose every reply of the batch with it, and during a failover buyers of healthy
  primaries would see 503s too.)

- Each call goes to the node chosen here (the owner of its keys' slot), and redirections
  come back as replies instead of being followed by redis-py on other connections, so
  that a call runs where its WAIT looks. A call that met MOVED (the slot's owner is
  recorded), ASK (it goes once more with ASKING before it, to the node named) or TRYAGAIN
  (its keys are split by a slot being moved; a short pause first) did not run, and is
  sent again in the next round, like one that met NOSCRIPT.
- WAIT counts the replicas of one primary, for the writes of one connection: each node
  that ran replicated calls gets its own WAIT, after its calls on the same connection.
- NOSCRIPT comes from a node that lacks the scripts (a replica promoted by a failover
  keeps the cache it had): they are loaded on every node again.
- A connection that fails, or a cluster that says it is down, also makes the client read
  the cluster's layout again before the callers retry.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    SlotNotCoveredError,
    TryAgainError,
)

from core.gateway.clients import RedisClient, load_everywhere, refresh_layout

# Rounds of sending what did not run (NOSCRIPT; on a cluster MOVED, ASK, TRYAGAIN) again
# before its caller is told why.
ROUNDS = 5
# Between rounds after a TRYAGAIN: the keys of a call are split by a slot being moved.
TRYAGAIN_PAUSE_S = 0.05


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: list[str]
    args: list[Any]
    replicated: bool
    answer: asyncio.Future[Any]
    #: Why the last round did not run it (NOSCRIPT, or on a cluster a redirection).
    error: Exception | None = None
    #: On a cluster: send ASKING first, to ``ask_node`` (host, port), which an ASK named.
    asking: bool = False
    ask_node: tuple[str, int] | None = None


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
        ``wait_timeout_ms``) on the connection that ran it: one WAIT per batch (on a
        cluster, per node of the batch)."""
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
            again = await self._round(batch)
            for _ in range(ROUNDS - 1):
                if not again:
                    return
                # What did not run: after NOSCRIPT, load the scripts again; after
                # TRYAGAIN (a slot half moved), give the move a moment.
                noscript = [c for c in again if isinstance(c.error, NoScriptError)]
                for script in {id(c.script): c.script for c in noscript}.values():
                    await load_everywhere(self.client, script.script)
                if any(isinstance(c.error, TryAgainError) for c in again):
                    await asyncio.sleep(TRYAGAIN_PAUSE_S)
                again = await self._round(again)
            for call in again:  # still not run: its caller decides (a retry, or a 503)
                _fail([call], call.error or NoScriptError("NOSCRIPT"))
        except Exception as e:  # every caller still waiting learns what became of its call
            await refresh_layout(self.client, e)
            _fail(batch, e)

    async def _round(self, calls: list[_Call]) -> list[_Call]:
        """Send ``calls`` and answer each of them, except those that did not run (NOSCRIPT;
        on a cluster also MOVED, ASK and TRYAGAIN), which it returns with ``error`` set,
        ready to be sent again.

        On a cluster each node gets a pipeline of its own: a node that fails (killed, or
        unreachable) fails its own callers only, not those of the nodes that answered; so
        does a slot the client knows no owner of.
        """
        if not isinstance(self.client, RedisCluster):
            return await self._round_on(None, calls)
        by_node: dict[str, tuple[ClusterNode, list[_Call]]] = {}
        uncovered: list[_Call] = []
        for call in calls:
            try:
                node = self._node_for(call)
            except SlotNotCoveredError:
                uncovered.append(call)
                continue
            by_node.setdefault(node.name, (node, []))[1].append(call)
        outcomes = await asyncio.gather(
            *(self._round_on(node, group) for node, group in by_node.values()),
            return_exceptions=True,
        )
        results: list[tuple[list[_Call], list[_Call] | Exception]] = []
        for (_, group), outcome in zip(by_node.values(), outcomes, strict=True):
            if not isinstance(outcome, list | Exception):  # a cancellation, not a failure
                raise outcome
            results.append((group, outcome))
        if uncovered:
            results.append((uncovered, SlotNotCoveredError("no node serves the slot")))
        failures = [outcome for _, outcome in results if isinstance(outcome, Exception)]
        if failures:
            # Before the callers hear of it, so that their retries go to the new layout.
            await refresh_layout(self.client, failures[0])
        again: list[_Call] = []
        for group, outcome in results:
            if isinstance(outcome, list):
                again += outcome
            else:
                _fail(group, outcome)
        return again

    async def _round_on(self, node: ClusterNode | None, calls: list[_Call]) -> list[_Call]:
        """Send ``calls`` to ``node`` (None: the one server) in one pipeline, WAIT after
        them when some are replicated; returns those that did not run (see ``_round``)."""
        pipe: Any = self.client.pipeline(transaction=False)
        async with pipe:
            for call in calls:
                evalsha = ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
                if node is None:
                    pipe.execute_command(*evalsha)
                    continue
                if call.asking:  # the slot is moving to ``node``: ASKING lets this call in
                    pipe.execute_command("ASKING", target_nodes=node)
                # Raw, to the node chosen here: a cluster pipeline refuses its evalsha method.
                pipe.execute_command(*evalsha, target_nodes=node)
            replicated = any(call.replicated for call in calls)
            if replicated and node is None:
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            elif replicated:
                pipe.execute_command(
                    "WAIT", self.wait_replicas, self.wait_timeout_ms, target_nodes=node
                )
            if node is not None:
                # Redirections come back as replies: a call must run where its WAIT goes.
                replies = await pipe.execute(raise_on_error=False, allow_redirections=False)
            else:
                replies = await pipe.execute(raise_on_error=False)
        acknowledged: Any = replies.pop() if replicated else None
        replies = _evalsha_replies(calls, node, replies)
        if any(isinstance(reply, ClusterDownError) for reply in replies):
            # A failover under way: its callers retry once the layout is read again.
            await refresh_layout(self.client, ClusterDownError("CLUSTERDOWN"))
        again = []
        # A client of one server cannot follow a redirection: on a cluster node taken for
        # one (FLASHSALE_REDIS_CLUSTER=off, or a node silent when asked) MOVED is an error.
        follows = isinstance(self.client, RedisCluster)
        for call, reply in zip(calls, replies, strict=True):
            call.asking = False
            call.error = None
            if isinstance(reply, NoScriptError | TryAgainError):
                call.error = reply
                again.append(call)
            elif isinstance(reply, MovedError) and follows:  # (a MOVED is a kind of ASK)
                assert isinstance(self.client, RedisCluster)
                await self.client.nodes_manager.move_slot(reply)
                call.error = reply
                again.append(call)
            elif isinstance(reply, AskError) and follows:
                call.asking = True
                call.ask_node = (reply.host, int(reply.port))
                call.error = reply
                again.append(call)
            elif call.answer.done():  # its caller was cancelled
                continue
            elif isinstance(reply, Exception):
                call.answer.set_exception(reply)
            elif not call.replicated:
                call.answer.set_result(reply)
            elif isinstance(acknowledged, Exception):
                call.answer.set_exception(acknowledged)
            else:
                call.answer.set_result((reply, int(acknowledged)))
        return again

    def _node_for(self, call: _Call) -> ClusterNode:
        """The cluster node to send ``call`` to: the one an ASK named, else the owner of
        its keys' slot."""
        assert isinstance(self.client, RedisCluster)
        if call.asking and call.ask_node is not None:
            host, port = call.ask_node
            node = self.client.get_node(host=host, port=port)
            if node is not None:
                return node
            call.asking = False  # a node the client does not know: ask the owner again
        node = self.client.get_node_from_key(call.keys[0])
        if node is None:
            raise SlotNotCoveredError(f"no node serves the slot of {call.keys[0]!r}")
        return node


def _evalsha_replies(calls: list[_Call], node: ClusterNode | None, replies: list[Any]) -> list[Any]:
    """Each call's EVALSHA reply, without the replies to the ASKING sent before some."""
    if node is None:
        return replies
    mine = []
    position = 0
    for call in calls:
        if call.asking:
            position += 1
        mine.append(replies[position])
        position += 1
    return mine


def _fail(calls: list[_Call], error: Exception) -> None:
    for call in calls:
        if not call.answer.done():
            call.answer.set_exception(error)
