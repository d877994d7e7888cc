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
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

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
        self, client: aioredis.Redis, wait_replicas: int = 0, wait_timeout_ms: int = 1000
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
                    # They did not run: load the scripts again and send them once more.
                    for script in {id(c.script): c.script for c in missing}.values():
                        await self.client.script_load(script.script)
                    missing = await self._round(pipe, missing)
            _fail(missing, NoScriptError("NOSCRIPT again after loading the scripts"))
        except Exception as e:  # every caller still waiting learns what became of its call
            _fail(batch, e)

    async def _round(self, pipe: Any, calls: list[_Call]) -> list[_Call]:
        """Send ``calls`` in one pipeline and answer each of them, except those that met
        NOSCRIPT, which it returns."""
        wait = any(call.replicated for call in calls)
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        if wait:
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        replies = await pipe.execute(raise_on_error=False)
        acknowledged: Any = replies.pop() if wait else 0
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
            elif isinstance(acknowledged, Exception):
                call.answer.set_exception(acknowledged)
            else:
                call.answer.set_result((reply, int(acknowledged)))
        return missing


def _fail(calls: list[_Call], error: Exception) -> None:
    for call in calls:
        if not call.answer.done():
            call.answer.set_exception(error)
