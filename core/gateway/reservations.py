"""Reservation commands: place (with the sold-out hints), confirm and cancel, each with its
WAIT for replicas when asked; expire."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from redis.commands.core import AsyncScript

from core.errors import (
    InfrastructureError,
    NotReplicated,
    ReservationOutcomeUnknown,
    SoldOut,
    WriteAction,
)
from core.gateway.decode import text, time_of
from core.gateway.reads import Reads
from core.gateway.scripts import OPERATION_TTL_SECONDS, answer_of, new_id
from core.keys import PartitionKeys, partition_of_reservation
from core.models import ReservationView

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Placed:
    """Outcome of a successful reserve call.

    ``replayed``: the Idempotency-Key was used by an earlier request, and ``view`` is that
    request's reservation as it is now (None if it is gone); otherwise ``expires_at`` is the
    new placement's deadline.
    """

    reservation_id: str
    replayed: bool
    expires_at: datetime | None
    view: ReservationView | None = None


class ReservationCommands(Reads):
    """The scripts that change one reservation; each logs its event in the same step."""

    def answers_sold_out(self, sale_id: str) -> bool:
        """True while this process knows ``sale_id`` is sold out even for one unit, so a
        request without an Idempotency-Key can be refused from memory before any work.

        Past half the hint's age, one background read of the sale renews it while Redis
        still says sold out (stamped with the read's start, so the hint's bound holds).
        """
        if not self.sold_out_hints.says_sold_out(sale_id, 1):
            return False
        if self.sold_out_hints.renewal_due(sale_id):
            self._in_background(self._renew_sold_out(sale_id))
        return True

    async def _renew_sold_out(self, sale_id: str) -> None:
        started = time.monotonic()
        try:
            view = await self.get_sale(sale_id)
        except InfrastructureError:
            return  # the hint simply lapses
        # Not after a ``forget`` (stock came back through this process) or a lapse.
        still = self.sold_out_hints.says_sold_out(sale_id, 1)
        if still and view is not None and view.status == "sold_out":
            self.sold_out_hints.remember(sale_id, 1, at=started)

    async def reserve(
        self, sale_id: str, user_id: str, qty: int, idempotency_key: str | None
    ) -> Placed:
        """Run the reserve script: one round trip that validates, holds and logs.

        Raises a ``RejectedError`` subclass with the script's reason when refused. A sale
        that Redis just called sold out is answered ``SoldOut`` from memory for a short
        while (see ``SoldOutHints``), except for requests with an Idempotency-Key, whose
        retry must find the reservation it may already have.

        The reservation id is chosen here, so a call whose reply was lost is run again with
        the same id and answers the placement it made. When Redis stays silent beyond the
        retry budget, ``ReservationOutcomeUnknown`` names the id, for the buyer to look up.
        """
        if idempotency_key is None and self.sold_out_hints.says_sold_out(sale_id, qty):
            raise SoldOut()
        keys = self.keys_for_sale(sale_id)
        reservation_id = f"{keys.partition}-{new_id()}"
        try:
            result = await self._reserve_script(
                keys, sale_id, user_id, qty, reservation_id, idempotency_key
            )
        except SoldOut:
            self.sold_out_hints.remember(sale_id, qty)
            raise
        except NotReplicated:
            raise
        except InfrastructureError as e:
            log.warning("reservation_outcome_unknown", reservation_id=reservation_id, error=str(e))
            raise ReservationOutcomeUnknown(reservation_id, str(e)) from e
        if result[3] == "1":
            try:
                view = await self.get_reservation(result[1])
            except InfrastructureError as e:
                raise ReservationOutcomeUnknown(result[1], str(e)) from e
            # A key naming this call's own id was stored by an earlier run of this call.
            if result[1] != reservation_id or view is None:
                return Placed(reservation_id=result[1], replayed=True, expires_at=None, view=view)
            return Placed(reservation_id=result[1], replayed=False, expires_at=view.expires_at)
        return Placed(reservation_id=result[1], replayed=False, expires_at=time_of(result[2]))

    async def _reserve_script(
        self,
        keys: PartitionKeys,
        sale_id: str,
        user_id: str,
        qty: int,
        reservation_id: str,
        idempotency_key: str | None,
    ) -> list[str]:
        script_keys = [
            keys.sale(sale_id),
            keys.holders(sale_id),
            keys.idempotency(sale_id, user_id, idempotency_key or ""),
            keys.reservation(reservation_id),
            keys.reservations(sale_id),
            keys.deadlines,
            keys.events,
            keys.user_reservations(sale_id, user_id),
        ]
        args: list[Any] = [
            new_id(),
            sale_id,
            user_id,
            qty,
            reservation_id,
            self.idempotency_ttl,
            "1" if idempotency_key else "",
            "1" if self.wait_replicas else "",
        ]
        return await self._acknowledged(self._reserve, script_keys, args, None, "reserve")

    async def _acknowledged(
        self,
        script: AsyncScript,
        keys: list[str],
        args: list[Any],
        reservation_id: str | None,
        action: WriteAction,
    ) -> list[str]:
        """Run a reservation's script (again after a lost reply); under ``wait_replicas``,
        then WAIT for that many replicas on the same connection.

        The script's last argument must say "1" when WAIT follows. Raises
        ``NotReplicated`` (naming ``reservation_id``, None: the one the reply names) when
        too few acknowledged in time; the write stands on the primary all the same. WAIT
        covers the writes of its own connection only, so both run on one (one WAIT after
        the calls of a coalesced batch covers them all; on a cluster, one per primary,
        after that primary's calls). An answer that writes nothing (a replayed
        Idempotency-Key, a reservation already confirmed or cancelled, or a repeated run
        of this call) rewrites a value as it is, which puts the connection past the
        earlier write it reports and makes WAIT cover that too.
        """
        if not self.wait_replicas:
            return await self._run(script, keys, args)
        replicated = await self._retrying(
            lambda: self.scripts.run_replicated(script, keys, args), f"redis {action} and WAIT"
        )
        result = answer_of(replicated.reply)
        if replicated.acknowledged < self.wait_replicas:
            rid = reservation_id or result[1]
            log.warning(
                "reservation_not_replicated",
                reservation_id=rid,
                action=action,
                acknowledged=replicated.acknowledged,
                wanted=self.wait_replicas,
            )
            raise NotReplicated(rid, replicated.acknowledged, self.wait_replicas, action)
        return result

    async def confirm(self, reservation_id: str, user_id: str | None) -> bool:
        """Confirm a pending reservation of ``user_id`` (None: an admin, any buyer's).

        Returns False when it was already confirmed (nothing changed). Raises
        ``ReservationNotFound``, ``ReservationPastDeadline`` or ``ReservationClosed``;
        under ``wait_replicas``, ``NotReplicated`` when too few replicas acknowledged the
        confirmation (it stands; the same call again answers once they do).
        """
        view = await self._reservation_of(reservation_id, user_id)
        keys = self.keys_for_partition(partition_of_reservation(reservation_id) or 0)
        operation = new_id()
        result = await self._acknowledged(
            self._confirm,
            [
                keys.reservation(reservation_id),
                keys.sale(view.sale_id),
                keys.deadlines,
                keys.events,
            ],
            [operation, reservation_id, user_id or "", "1" if self.wait_replicas else ""],
            reservation_id,
            "confirm",
        )
        return result[1] == "1"

    async def cancel(self, reservation_id: str, user_id: str) -> bool:
        """Cancel a pending reservation of ``user_id``; its stock and quota go back.

        Returns False when it was already cancelled (nothing changed). Raises
        ``ReservationNotFound``, ``ReservationPastDeadline`` or ``ReservationClosed``;
        under ``wait_replicas``, ``NotReplicated`` when too few replicas acknowledged the
        cancellation (it stands; the same call again answers once they do).
        """
        view = await self._reservation_of(reservation_id, user_id)
        keys = self.keys_for_partition(partition_of_reservation(reservation_id) or 0)
        operation = new_id()
        try:
            result = await self._acknowledged(
                self._cancel,
                [
                    keys.reservation(reservation_id),
                    keys.sale(view.sale_id),
                    keys.holders(view.sale_id),
                    keys.deadlines,
                    keys.events,
                ],
                [operation, reservation_id, user_id, "1" if self.wait_replicas else ""],
                reservation_id,
                "cancel",
            )
        finally:
            # The stock may be back, even when the reply was lost or not replicated.
            self.sold_out_hints.forget(view.sale_id)
        return result[1] == "1"

    async def expire_due(self, partition: int, limit: int = 200) -> tuple[int, int]:
        """Expire up to ``limit`` overdue reservations of a partition.

        Reads the overdue ids (at most ``limit``, by Redis's clock) and the sale of each,
        then runs ``expire.lua`` with every key it touches; the script checks each id
        again, so a reservation confirmed, cancelled or expired by another worker
        meanwhile is left as it is. Returns ``(expired, still_due)``; call again at once
        while ``still_due`` > 0.
        """
        keys = self.keys_for_partition(partition)
        due = await self._retrying(lambda: self._read_due(keys, limit), "redis expiry read")
        if not due:
            return 0, 0
        sales = list(dict.fromkeys(sale for sale in due.values() if sale))
        script_keys = [keys.deadlines, keys.events, keys.operation(new_id())]
        script_keys += [keys.reservation(rid) for rid in due]
        for sale in sales:
            script_keys += [keys.sale(sale), keys.holders(sale)]
        args: list[Any] = [OPERATION_TTL_SECONDS, len(due), *due, *sales]

        async def run() -> list[Any]:
            reply: list[Any] = await self.scripts.run(self._expire, script_keys, args)
            return reply

        expired, left = await self._retrying(run, "redis expiry")
        # A short read took every id due when it ran: what fell due since waits for the
        # next sweep (so a reservation the script cannot expire never makes a caller spin).
        return int(expired), (int(left) if len(due) == limit else 0)

    async def _read_due(self, keys: PartitionKeys, limit: int) -> dict[str, str]:
        """The first ``limit`` overdue reservation ids of a partition, each with its sale id
        ("" when its hash is gone): two plain reads."""
        seconds, micros = await self.client.time()
        now = seconds * 1000 + micros // 1000
        ids = [
            text(rid)
            for rid in await self.client.zrangebyscore(keys.deadlines, "-inf", now, 0, limit)
        ]
        if not ids:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.hget(keys.reservation(rid), "sale_id")
            sales: list[Any] = await pipe.execute()
        return {rid: text(sale) if sale else "" for rid, sale in zip(ids, sales, strict=True)}
