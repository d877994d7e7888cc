"""What the operators' tools keep in Redis beside the sales: the last verify result, so
that every API worker answers the same one whichever ran it."""

from __future__ import annotations

from core.gateway.decode import text
from core.gateway.scripts import GatewayBase
from core.keys import last_verify


class OperatorRecords(GatewayBase):
    """The last verify result, stored as the caller serialized it."""

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
