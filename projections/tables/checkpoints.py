"""Statements on the three checkpoint tables: how far each reader of the log got.

``checkpoints``: per consumer group and partition, the highest position projected (moved
in the projector's batch transaction). ``prune_checkpoints``: per partition, the position
below which the pruning worker removed final reservations from Redis.
``rebuild_checkpoints``: per partition, the position the rebuilt tables reflect (written in
the rebuild's transactions).
"""

from __future__ import annotations

import asyncpg

Position = tuple[int, int]

_ADVANCE_GROUP = """
INSERT INTO checkpoints AS c (consumer_group, partition, stream_id, stream_ms, stream_seq)
SELECT $1, * FROM unnest($2::int[], $3::text[], $4::bigint[], $5::bigint[])
ON CONFLICT (consumer_group, partition) DO UPDATE SET
    stream_id = EXCLUDED.stream_id, stream_ms = EXCLUDED.stream_ms,
    stream_seq = EXCLUDED.stream_seq, updated_at = now()
WHERE (EXCLUDED.stream_ms, EXCLUDED.stream_seq) > (c.stream_ms, c.stream_seq)
"""

_PRUNED_BELOW = "SELECT stream_ms, stream_seq FROM prune_checkpoints WHERE partition = $1"

_ADVANCE_PRUNED = """
INSERT INTO prune_checkpoints AS c (partition, stream_ms, stream_seq) VALUES ($1, $2, $3)
ON CONFLICT (partition) DO UPDATE SET
    stream_ms = EXCLUDED.stream_ms, stream_seq = EXCLUDED.stream_seq, updated_at = now()
WHERE (EXCLUDED.stream_ms, EXCLUDED.stream_seq) > (c.stream_ms, c.stream_seq)
"""

_RECORD_REBUILT = """
INSERT INTO rebuild_checkpoints (partition, stream_id, stream_ms, stream_seq)
SELECT * FROM unnest($1::int[], $2::text[], $3::bigint[], $4::bigint[])
ON CONFLICT (partition) DO UPDATE SET stream_id = EXCLUDED.stream_id,
    stream_ms = EXCLUDED.stream_ms, stream_seq = EXCLUDED.stream_seq, updated_at = now()
"""


async def advance_group(
    conn: asyncpg.Connection, group: str, positions: list[tuple[int, str, Position]]
) -> None:
    """Move the group's checkpoint of each ``(partition, stream_id, position)`` forward to
    it (never back); pass them sorted by partition."""
    await conn.execute(
        _ADVANCE_GROUP,
        group,
        [p for p, _, _ in positions],
        [i for _, i, _ in positions],
        [pos[0] for _, _, pos in positions],
        [pos[1] for _, _, pos in positions],
    )


async def pruned_below(conn: asyncpg.Connection, partition: int) -> Position:
    """The position below which the partition's final reservations were pruned."""
    row = await conn.fetchrow(_PRUNED_BELOW, partition)
    return (0, 0) if row is None else (row["stream_ms"], row["stream_seq"])


async def advance_pruned(conn: asyncpg.Connection, partition: int, below: Position) -> None:
    """Record that the partition is pruned below ``below`` (never moves back)."""
    await conn.execute(_ADVANCE_PRUNED, partition, *below)


async def record_rebuilt(
    conn: asyncpg.Connection, positions: list[tuple[int, str, Position]]
) -> None:
    """Record, per ``(partition, stream_id, position)``, how far the rebuilt tables reach."""
    await conn.execute(
        _RECORD_REBUILT,
        [p for p, _, _ in positions],
        [i for _, i, _ in positions],
        [pos[0] for _, _, pos in positions],
        [pos[1] for _, _, pos in positions],
    )
