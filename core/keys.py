"""Every Redis key and stream name, built in one place.

All keys of a sale carry the hash tag of the sale's partition, and so does the partition's
event stream, so each Lua script touches a single Redis Cluster slot. The tag of partition
``i`` of ``P`` is ``p<i>.`` and four letters chosen so that the tag's slot is the middle of
the ``i``-th of ``P`` equal slot ranges (see :func:`partition_tag`): the partitions spread
evenly over the masters of a cluster whose slots are split evenly, whatever ``P``.
"""

from __future__ import annotations

import functools
import zlib
from binascii import crc_hqx
from dataclasses import dataclass
from itertools import product

PREFIX = "fs"
CONSUMER_GROUP = "projector"
# Redis Cluster's hash slots: a key's slot is CRC16-XMODEM of its hash tag, mod SLOTS.
SLOTS = 16384
# Letters whose bytes are 0x42 xor a 4-bit space (0x01, 0x04, 0x08, 0x20): the CRC16 of
# four of them is affine in those 16 bits, and reaches every slot (tests check it).
TAG_LETTERS = "BCFGJKNObcfgjkno"


def partition_of(sale_id: str, partitions: int) -> int:
    """Return the partition a sale lives in (stable across processes and restarts)."""
    return zlib.crc32(sale_id.encode()) % partitions


def partition_slot(partition: int, partitions: int) -> int:
    """The cluster slot partition ``partition`` of ``partitions`` aims at: the middle of the
    ``partition``-th of ``partitions`` equal slot ranges."""
    return (2 * partition + 1) * SLOTS // (2 * partitions)


def _slot_part(data: bytes) -> int:
    return crc_hqx(data, 0) % SLOTS


@functools.cache
def _pairs() -> tuple[list[tuple[str, int]], dict[int, str]]:
    """Every two letters of TAG_LETTERS, in order, with their CRC16 share as the first two
    of four (followed by two zero bytes), and the first two letters giving each share as
    the last two."""
    pairs = ["".join(p) for p in product(TAG_LETTERS, repeat=2)]
    heads = [(p, _slot_part(p.encode() + b"\0\0")) for p in pairs]
    tails: dict[int, str] = {}
    for p in pairs:
        tails.setdefault(_slot_part(p.encode()), p)
    return heads, tails


@functools.cache
def partition_tag(partition: int, partitions: int) -> str:
    """The hash tag (without braces) of partition ``partition`` of ``partitions``:
    ``p<partition>.`` and four of TAG_LETTERS, whose slot is ``partition_slot``.

    CRC16-XMODEM starts from zero and has no final xor, so it is linear: the CRC of
    ``prefix + head + tail`` is the xor of those of ``prefix + 4 zero bytes``,
    ``head + 2 zero bytes`` and ``tail``. The first head (in TAG_LETTERS order) for
    which some tail completes the wanted slot is taken, with the first such tail: the same
    tag in every process, found in at most 256 lookups and computed once.
    """
    prefix = f"p{partition}."
    want = partition_slot(partition, partitions) ^ _slot_part(prefix.encode() + b"\0" * 4)
    heads, tails = _pairs()
    for head, share in heads:
        tail = tails.get(want ^ share)
        if tail is not None:
            return f"{prefix}{head}{tail}"
    raise AssertionError(f"no tag reaches slot {partition_slot(partition, partitions)}")


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """Key names of partition ``partition`` of ``partitions``; every name carries the
    partition's hash tag, which depends on both (see :func:`partition_tag`)."""

    partition: int
    partitions: int

    @property
    def tag(self) -> str:
        """The hash tag in braces, as it appears in every key name of the partition."""
        return f"{{{partition_tag(self.partition, self.partitions)}}}"

    @property
    def events(self) -> str:
        """The partition's event stream."""
        return f"{PREFIX}:{self.tag}:events"

    @property
    def deadlines(self) -> str:
        """Sorted set of pending reservation ids scored by their expiry time (ms)."""
        return f"{PREFIX}:{self.tag}:deadlines"

    def sale(self, sale_id: str) -> str:
        """Hash holding a sale's configuration and counters."""
        return f"{PREFIX}:{self.tag}:sale:{sale_id}"

    def holders(self, sale_id: str) -> str:
        """Hash of user id -> quantity held or bought in a sale."""
        return f"{self.sale(sale_id)}:users"

    def reservations(self, sale_id: str) -> str:
        """Set of the reservation ids of a sale."""
        return f"{PREFIX}:{self.tag}:sale:{sale_id}:reservations"

    def user_reservations(self, sale_id: str, user_id: str) -> str:
        """Set of the reservation ids one buyer placed in a sale."""
        return f"{PREFIX}:{self.tag}:sale:{sale_id}:user:{user_id}"

    def reservation(self, reservation_id: str) -> str:
        """Hash holding one reservation."""
        return f"{PREFIX}:{self.tag}:res:{reservation_id}"

    def idempotency(self, sale_id: str, user_id: str, key: str) -> str:
        """String mapping a buyer's Idempotency-Key to the reservation it created."""
        return f"{PREFIX}:{self.tag}:idem:{sale_id}:{user_id}:{key}"

    def stock_idempotency(self, sale_id: str, key: str) -> str:
        """String marking an admin's stock adjustment Idempotency-Key as applied."""
        return f"{PREFIX}:{self.tag}:idem-stock:{sale_id}:{key}"

    def sale_idempotency(self, sale_id: str, key: str) -> str:
        """String holding what an admin's sale creation with this Idempotency-Key asked
        for (``create_sale.lua``), so that a repeat answers the same sale."""
        return f"{PREFIX}:{self.tag}:idem-sale:{sale_id}:{key}"

    def lease(self, group: str) -> str:
        """String naming the consumer of ``group`` that owns the partition (its lease),
        expiring unless the holder renews it."""
        return f"{PREFIX}:{self.tag}:lease:{group}"

    @property
    def mark(self) -> str:
        """Counter written before a WAIT for replicas, by the projector and the admin's
        sale writes (``core/lua/mark.lua``), expiring an hour after the last write."""
        return f"{PREFIX}:{self.tag}:mark"

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


def last_verify() -> str:
    """String holding the last verify result the API ran (JSON), for every API worker."""
    return f"{PREFIX}:last-verify"


def verify_lock() -> str:
    """String holding the token of the verify run in progress, with a time to live: one run
    at a time over every API process and host (no tag: one key)."""
    return f"{PREFIX}:verify-lock"
