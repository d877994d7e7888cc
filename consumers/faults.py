"""Which failures a consumer waits out, and which are the fault of the entry in hand.

A transient failure (Redis or PostgreSQL unreachable, restarting, out of connections, a
deadlock, a timeout, the schema not migrated yet, replicas behind) says nothing about the
entry: the consumer keeps the batch, acknowledges nothing and retries with back-off, for as
long as it takes. Any other failure may be the entry's own; the consumer isolates the entry
that fails and gives it ``max_deliveries`` tries before it parks it on the dead-letter
stream.
"""

from __future__ import annotations

import asyncpg
from redis.exceptions import RedisError

# SQLSTATE classes that describe the server or the session, never one event's data:
# 08 connection, 25 invalid transaction state (a read-only standby), 28 authorization,
# 3D no such database, 40 rollback (serialization failure, deadlock), 42 schema or privilege
# (a migration not applied yet), 53 insufficient resources, 55 lock not available,
# 57 operator intervention (shutdown, cancel), 58 system I/O, F0 configuration, XX internal.
_TRANSIENT_SQLSTATE_CLASSES = frozenset(
    {"08", "25", "28", "3D", "40", "42", "53", "55", "57", "58", "F0", "XX"}
)

# PostgreSQL refusing an entry's data (SQLSTATE classes 22 and 23): the same entry fails the
# same way on every try, so it is parked at once instead of being tried again.
REFUSED_DATA = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)

_MAX_ERROR_CHARS = 500


class ReplicasBehind(Exception):
    """Fewer replicas than ``FLASHSALE_WAIT_REPLICAS`` acknowledged, in time, the writes
    of the partitions whose entries a projector holds (:mod:`consumers.replicas`)."""

    def __init__(self, acknowledged: int, wanted: int) -> None:
        super().__init__(
            f"{acknowledged} of {wanted} replicas hold the entries in hand: not written to"
            " PostgreSQL until they do (a failover could lose them from Redis)"
        )
        self.acknowledged = acknowledged
        self.wanted = wanted


def is_transient(error: BaseException) -> bool:
    """True when ``error`` is about the infrastructure, not about the entry being handled."""
    if isinstance(error, RedisError | OSError | asyncpg.InterfaceError | ReplicasBehind):
        return True  # OSError covers refused connections and timeouts
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = str(getattr(error, "sqlstate", "") or "")
        return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False


def describe(error: BaseException) -> str:
    """``"TypeName: message"``, short enough to store beside a parked entry."""
    return f"{type(error).__name__}: {error}"[:_MAX_ERROR_CHARS]
