"""flashsale consumers: the consumer-group daemons that project the event streams, the
dead-letter stream, stream retention, reservation pruning and consumer health."""

from consumers.deadletter import (
    ParkedEntry,
    RetryOutcome,
    count_parked,
    drop_parked,
    list_parked,
    retry_parked,
)
from consumers.expiry import ExpiryWorker
from consumers.faults import is_transient
from consumers.health import GroupHealth, Health, read_health
from consumers.projector import Delivery, Projector
from consumers.pruning import PruneResult, PruningWorker, prune_reservations
from consumers.retention import RetentionWorker, TrimResult, trim_streams

__all__ = [
    "Delivery",
    "ExpiryWorker",
    "GroupHealth",
    "Health",
    "ParkedEntry",
    "Projector",
    "PruneResult",
    "PruningWorker",
    "RetentionWorker",
    "RetryOutcome",
    "TrimResult",
    "count_parked",
    "drop_parked",
    "is_transient",
    "list_parked",
    "prune_reservations",
    "read_health",
    "retry_parked",
    "trim_streams",
]
