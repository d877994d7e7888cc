"""Partition hash tags spread the partitions evenly over the masters of a Redis Cluster whose
slots are split evenly (as ``redis-cli --cluster create`` splits them), whatever the
partition count, and every process names the same keys."""

from __future__ import annotations

import math
import subprocess
import sys
from itertools import product

import pytest
from redis.crc import key_slot

from core.keys import SLOTS, TAG_LETTERS, PartitionKeys, partition_slot, partition_tag


def even_slot_ranges(masters: int) -> list[tuple[int, int]]:
    """The slot range of each master, as redis-cli's ``--cluster create`` assigns them."""
    per = SLOTS / masters
    ranges, first, cursor = [], 0, 0.0
    for i in range(masters):
        last = round(cursor + per - 1)
        if last > SLOTS - 1 or i == masters - 1:
            last = SLOTS - 1
        ranges.append((first, last))
        first, cursor = last + 1, cursor + per
    return ranges


def busiest(partitions: int, masters: int) -> int:
    """Partitions on the master holding the most, every key of a partition in its slot."""
    slots = [key_slot(PartitionKeys(p, partitions).events.encode()) for p in range(partitions)]
    return max(sum(lo <= s <= hi for s in slots) for lo, hi in even_slot_ranges(masters))


def test_even_ranges_are_redis_clis() -> None:
    assert even_slot_ranges(3) == [(0, 5460), (5461, 10922), (10923, 16383)]


@pytest.mark.parametrize("partitions", [4, 16, 64, 256])
@pytest.mark.parametrize("masters", [3, 5])
def test_no_master_holds_more_than_its_share(partitions: int, masters: int) -> None:
    assert busiest(partitions, masters) <= math.ceil(partitions / masters)


def test_any_partition_count_spreads_evenly() -> None:
    for partitions in range(1, 200):
        for masters in range(2, 8):
            assert busiest(partitions, masters) <= math.ceil(partitions / masters), (
                partitions,
                masters,
            )


def test_plain_tags_did_not_spread() -> None:
    """What the tags fix: ``{p0}``..``{p15}`` put 7 of 16 partitions on one of 3 masters."""
    slots = [key_slot(f"{{p{p}}}".encode()) for p in range(16)]
    assert max(sum(lo <= s <= hi for s in slots) for lo, hi in even_slot_ranges(3)) == 7
    assert busiest(16, 3) == 6


@pytest.mark.parametrize("partitions", [1, 4, 16, 64, 256, 1024])
def test_each_partition_lands_on_its_slot_and_keeps_one_slot(partitions: int) -> None:
    tags = [partition_tag(p, partitions) for p in range(partitions)]
    assert len(set(tags)) == partitions
    for p, tag in enumerate(tags):
        assert tag.startswith(f"p{p}.") and "}" not in tag and "{" not in tag
        keys = PartitionKeys(p, partitions)
        names = [
            keys.events,
            keys.deadlines,
            keys.sale("s"),
            keys.holders("s"),
            keys.reservations("s"),
            keys.user_reservations("s", "u"),
            keys.reservation(f"{p}-abc"),
            keys.idempotency("s", "u", "k"),
            keys.stock_idempotency("s", "k"),
            keys.sale_idempotency("s", "k"),
            keys.mark,
            keys.lease("projector"),
            keys.operation("op"),
        ]
        assert {key_slot(n.encode()) for n in names} == {partition_slot(p, partitions)}


def test_tag_letters_reach_every_slot() -> None:
    """Four tag letters reach every slot's remainder, so a tag exists for any target."""
    reached = {key_slot("".join(letters).encode()) for letters in product(TAG_LETTERS, repeat=4)}
    assert len(reached) == SLOTS


def test_tags_are_the_same_in_another_process() -> None:
    code = (
        "from core.keys import PartitionKeys as K;"
        "print(' '.join(K(p, n).events for n in (16, 64) for p in range(n)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [PartitionKeys(p, n).events for n in (16, 64) for p in range(n)]
    assert PartitionKeys(3, 16).events == "fs:{p3.BoGb}:events"  # as deployed: never changes
