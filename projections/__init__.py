"""flashsale projections: PostgreSQL schema, the projector, the fold and the replay tool."""

from projections.batch import LogEntry, project
from projections.fold import SaleState, fold
from projections.log import LogReader
from projections.rebuild import RebuildReport, rebuild
from projections.repair import RepairReport, repair_redis
from projections.schema import migrate
from projections.tables.orders import final_order, final_orders_of
from projections.verify import Difference, VerifyReport, verify

__all__ = [
    "Difference",
    "LogEntry",
    "LogReader",
    "RebuildReport",
    "RepairReport",
    "SaleState",
    "VerifyReport",
    "final_order",
    "final_orders_of",
    "fold",
    "migrate",
    "project",
    "rebuild",
    "repair_redis",
    "verify",
]
