"""flashsale projections: PostgreSQL schema, the projector, the fold and the replay tool."""

from projections.fold import SaleState, fold
from projections.projector import LogEntry, project
from projections.replay import Difference, VerifyReport, verify
from projections.schema import migrate

__all__ = [
    "Difference",
    "LogEntry",
    "SaleState",
    "VerifyReport",
    "fold",
    "migrate",
    "project",
    "verify",
]
