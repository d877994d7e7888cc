"""Every Redis key and stream name, built in one place.

All keys of a sale carry the hash tag ``{pN}`` of the sale's partition, and so does the
partition's event stream, so each Lua script touches a single Redis Cluster slot.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

PREFIX = "fs"
HOLDERS_SUFFIX = ":users"
CONSUMER_GROUP = "projector"


def partition_of(sale_id: str, partitions: int) -> int:
    """Return the partition a sale lives in (stable across processes and restarts)."""
    return zlib.crc32(sale_id.encode()) % partitions


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """Key names of one partition; every name carries the partition's hash tag."""

    partition: int

    @property
    def tag(self) -> str:
        return f"{{p{self.partition}}}"

    @property
    def events(self) -> str:
        """The partition's event stream."""
        return f"{PREFIX}:{self.tag}:events"

    @property
    def deadlines(self) -> str:
        """Sorted set of pending reservation ids scored by their expiry time (ms)."""
        return f"{PREFIX}:{self.tag}:deadlines"

    @property
    def sale_prefix(self) -> str:
        """Prefix of every sale hash of the partition (for Lua that iterates sales)."""
        return f"{PREFIX}:{self.tag}:sale:"

    def sale(self, sale_id: str) -> str:
        """Hash holding a sale's configuration and counters."""
        return f"{self.sale_prefix}{sale_id}"

    def holders(self, sale_id: str) -> str:
        """Hash of user id -> quantity held or bought in a sale."""
        return f"{self.sale(sale_id)}{HOLDERS_SUFFIX}"

    def reservations(self, sale_id: str) -> str:
        """Set of the reservation ids of a sale."""
        return f"{PREFIX}:{self.tag}:sale:{sale_id}:reservations"

    def user_reservations(self, sale_id: str, user_id: str) -> str:
        """Set of the reservation ids one buyer placed in a sale."""
        return f"{PREFIX}:{self.tag}:sale:{sale_id}:user:{user_id}"

    @property
    def reservation_prefix(self) -> str:
        """Prefix of every reservation hash of the partition (for Lua that iterates them)."""
        return f"{PREFIX}:{self.tag}:res:"

    def reservation(self, reservation_id: str) -> str:
        """Hash holding one reservation."""
        return f"{self.reservation_prefix}{reservation_id}"

    def idempotency(self, sale_id: str, user_id: str, key: str) -> str:
        """String mapping a buyer's Idempotency-Key to the reservation it created."""
        return f"{PREFIX}:{self.tag}:idem:{sale_id}:{user_id}:{key}"

    def stock_idempotency(self, sale_id: str, key: str) -> str:
        """String marking an admin's stock adjustment Idempotency-Key as applied."""
        return f"{PREFIX}:{self.tag}:idem-stock:{sale_id}:{key}"

    def lease(self, group: str) -> str:
        """String naming the consumer of ``group`` that owns the partition (its lease),
        expiring unless the holder renews it."""
        return f"{PREFIX}:{self.tag}:lease:{group}"

    def operation(self, operation_id: str) -> str:
        """String recording a sale operation's first outcome for a short while, so that a
        retried script call with the same operation id answers the same."""
        return f"{PREFIX}:{self.tag}:op:{operation_id}"


def partition_of_reservation(reservation_id: str) -> int | None:
    """Read the partition encoded in a reservation id (``<partition>-<hex>``), or None."""
    head, sep, tail = reservation_id.partition("-")
    if not sep or not head.isascii() or not head.isdigit() or not tail or len(head) > 4:
        return None
    return int(head)


def dead_letter_stream() -> str:
    """Stream where events that cannot be projected are parked."""
    return f"{PREFIX}:dead-letter"


def consumer_members(group: str) -> str:
    """Sorted set of the live consumers of ``group``, scored by when each expires (ms)."""
    return f"{PREFIX}:members:{group}"
