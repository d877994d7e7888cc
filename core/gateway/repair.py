"""Writes made off the purchase path: a sale's folded state written back in fenced parts
(repair), and final reservations removed once archived (pruning)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import structlog
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from core.errors import InfrastructureError
from core.gateway.decode import text
from core.gateway.scripts import GatewayBase, load_lua

log = structlog.get_logger(__name__)

# Items per repair_sale.lua call (about half a millisecond of Redis time; bench/bench_verify.py).
REPAIR_CHUNK = 200


@dataclass(frozen=True, slots=True)
class ReservationRecord:
    """One reservation as the repair script writes it; an empty ``status`` deletes it."""

    reservation_id: str
    status: str
    qty: int = 0
    user_id: str = ""
    created_at_ms: int = 0
    expires_at_ms: int = 0
    ended_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class SaleRepair:
    """What to write into one sale's Redis keys, folded from the log up to ``last_id``.

    ``holders`` maps user -> qty (0 removes the user); ``deadlines`` maps a reservation
    to its expiry in ms (0 removes it from the deadlines zset). Only what differs from
    Redis need be listed; the fields are written whole.
    """

    sale_id: str
    last_id: str
    fields: dict[str, int]
    holders: dict[str, int] = field(default_factory=dict)
    reservations: list[ReservationRecord] = field(default_factory=list)
    deadlines: dict[str, int] = field(default_factory=dict)


class Repairs(GatewayBase):
    """Repair and pruning: each write is fenced or checked in its script, safe to repeat."""

    async def repair_sale(self, repair: SaleRepair, chunk: int = REPAIR_CHUNK) -> str | None:
        """Write a sale's folded state into Redis, fenced on the log position it reflects.

        A large repair is written as several script calls of at most ``chunk`` items each
        (the counters and configuration go with the first), every one fenced on
        ``repair.last_id``: each call writes only while the stream has not moved, so what it
        writes is the fold's state at the stream's current position. Returns None when all
        of it was written; when the partition's stream moved past ``repair.last_id``, the
        calls from there on write nothing and the stream's last id is returned, so the
        caller can fold again and write what still differs.
        """
        for part in _split_repair(repair, chunk):
            moved_to = await self._repair_part(part)
            if moved_to is not None:
                return moved_to
        log.info("sale_repaired", sale_id=repair.sale_id, last_id=repair.last_id)
        return None

    async def _repair_part(self, repair: SaleRepair) -> str | None:
        keys = self.keys_for_sale(repair.sale_id)
        args: list[Any] = [repair.last_id, repair.sale_id]
        for pairs in (repair.fields, repair.holders):
            args += [len(pairs), *chain.from_iterable(pairs.items())]
        args += [len(repair.reservations), *chain.from_iterable(map(_record, repair.reservations))]
        args += [len(repair.deadlines), *chain.from_iterable(repair.deadlines.items())]
        # Safe to send again after a lost reply: the same writes, fenced on the same id.
        write = functools.partial(
            self._repair_sale,
            keys=[
                keys.sale(repair.sale_id),
                keys.holders(repair.sale_id),
                keys.reservations(repair.sale_id),
                keys.deadlines,
                keys.events,
                *(keys.reservation(r.reservation_id) for r in repair.reservations),
            ],
            args=args,
        )
        reply = await self._retrying(write, "redis repair")
        return None if text(reply[0]) == "ok" else text(reply[2])

    @functools.cached_property
    def _prune_reservations(self) -> AsyncScript:
        # Registered on first use: pruning runs in the consumer daemon, off the purchase
        # path, and EVALSHA loads the script on its first NOSCRIPT.
        return self.client.register_script(load_lua("prune_reservations"))

    async def prune_reservations(
        self, sale_id: str, reservations: list[tuple[str, str]]
    ) -> tuple[int, int]:
        """Remove final reservations of ``sale_id`` from Redis: ``(reservation_id, user_id)``
        pairs, one script call (keep the batch small: it holds Redis for its length).

        Only reservations whose hash says confirmed, cancelled or expired are removed;
        pending ones stay. Returns ``(gone, kept)``: ids now absent from Redis, ids left
        pending. Safe to repeat.
        """
        if not reservations:
            return 0, 0
        keys = self.keys_for_sale(sale_id)
        script_keys = [keys.reservations(sale_id)]
        for reservation_id, user_id in reservations:
            script_keys += [
                keys.reservation(reservation_id),
                keys.user_reservations(sale_id, user_id),
            ]
        try:
            gone, kept = await self._prune_reservations(
                keys=script_keys, args=[rid for rid, _ in reservations]
            )
        except RedisError as e:
            raise InfrastructureError(f"redis pruning failed: {e}") from e
        return int(gone), int(kept)


def _record(r: ReservationRecord) -> tuple[Any, ...]:
    ended = "" if r.ended_at_ms is None else r.ended_at_ms
    return (r.reservation_id, r.status, r.qty, r.user_id, r.created_at_ms, r.expires_at_ms, ended)


def _split_repair(repair: SaleRepair, chunk: int) -> Iterator[SaleRepair]:
    """``repair`` as parts of at most ``chunk`` holders, reservations and deadlines each,
    all fenced on its position; the first part carries the sale's fields."""
    holders = list(repair.holders.items())
    deadlines = list(repair.deadlines.items())
    parts = max(len(holders), len(repair.reservations), len(deadlines), 1)
    for start in range(0, parts, chunk):
        yield SaleRepair(
            repair.sale_id,
            repair.last_id,
            repair.fields if start == 0 else {},
            dict(holders[start : start + chunk]),
            repair.reservations[start : start + chunk],
            dict(deadlines[start : start + chunk]),
        )
