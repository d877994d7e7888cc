"""What the operators' tools keep in Redis beside the sales: the last verify result, so
that every API worker answers the same one whichever ran it, and the verify lock, so that
one verify runs at a time over every API process and host."""

from __future__ import annotations

import functools

from redis.commands.core import AsyncScript

from core.gateway.decode import text
from core.gateway.scripts import GatewayBase, load_lua, new_id
from core.keys import last_verify, verify_lock


class OperatorRecords(GatewayBase):
    """The last verify result, stored as the caller serialized it, and the verify lock."""

    async def save_verify_result(self, result: str) -> None:
        """Keep ``result`` as the last verify result (replacing the one before)."""

        async def write() -> None:
            await self.client.set(last_verify(), result)

        # A plain SET of the same value: safe to send again after a lost reply.
        await self._retrying(write, "redis write")

    async def last_verify_result(self) -> str | None:
        """The last verify result kept, or None when none was run yet."""

        async def read() -> str | None:
            raw = await self.client.get(last_verify())
            return None if raw is None else text(raw)

        return await self._retrying(read, "redis read")

    @functools.cached_property
    def _release_lock(self) -> AsyncScript:
        # Registered on first use, like pruning's: verify is rare and off the purchase path.
        return self.client.register_script(load_lua("lease_release"))

    async def take_verify_lock(self, ttl_ms: int) -> str | None:
        """Take the verify lock for ``ttl_ms`` (SET NX PX with a new random token): the
        token to give it back with, or None when another run holds it.

        The time to live is what frees the lock of a process that died holding it: give it
        a little more than a run may take, so that it never ends under a live run.
        """
        token = new_id()

        async def take() -> bool:
            if await self.client.set(verify_lock(), token, nx=True, px=ttl_ms):
                return True
            # Held: by another run, or by this one when an earlier try's reply was lost.
            held = await self.client.get(verify_lock())
            return held is not None and text(held) == token

        return token if await self._retrying(take, "redis write") else None

    async def release_verify_lock(self, token: str) -> bool:
        """Give the verify lock back if ``token`` still holds it (compare and delete,
        ``lease_release.lua``): a run that outlived its time to live leaves the next run's
        lock alone. True when released; safe to repeat."""

        async def release() -> bool:
            return bool(await self._release_lock(keys=[verify_lock()], args=[token]))

        return await self._retrying(release, "redis script")
