"""A TCP proxy in front of a real Redis that loses replies, for the lost-reply tests.

Every byte from the client reaches Redis, so every command runs; a chunk of Redis's answer
is, with probability ``drop``, not forwarded: both sides are closed instead, as when a
connection resets or a socket times out after the server did the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable


class ReplyDroppingProxy:
    """Forwards 127.0.0.1:<port> to ``target``; drops server replies with a seeded RNG,
    and also every reply for which ``lose(data)`` is true."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        drop: float = 0.0,
        seed: int = 0,
        lose: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.drop = drop
        self.lose = lose
        self.dropped = 0
        self.forwarded = 0
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start the proxy first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        """Stop listening and cut every proxied connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> ReplyDroppingProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        writers = (client_w, server_w)
        try:
            await asyncio.gather(
                self._pump(client_r, server_w, writers, lossy=False),
                self._pump(server_r, client_w, writers, lossy=True),
            )
        except asyncio.CancelledError:
            pass
        finally:
            for writer in writers:
                writer.close()
            self._tasks.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        writers: tuple[asyncio.StreamWriter, ...],
        lossy: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if lossy and (
                    self._rng.random() < self.drop or (self.lose is not None and self.lose(data))
                ):
                    self.dropped += 1
                    break
                if lossy:
                    self.forwarded += 1
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        for w in writers:
            with contextlib.suppress(Exception):
                w.close()
