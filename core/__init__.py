"""flashsale core: settings, events, Redis keys and Lua scripts, the gateway, errors."""

from core.errors import (
    FlashsaleError,
    InfrastructureError,
    LimitReached,
    RejectedError,
    ReservationNotFound,
    SaleExists,
    SaleNotActive,
    SaleNotFound,
    SoldOut,
)
from core.events import AnyEvent, dump_event, parse_event
from core.gateway import Placed, RedisGateway, SaleSnapshot
from core.keys import PartitionKeys, partition_of
from core.models import NewSale, ReservationView, SaleView
from core.settings import Settings

__all__ = [
    "AnyEvent",
    "FlashsaleError",
    "InfrastructureError",
    "LimitReached",
    "NewSale",
    "PartitionKeys",
    "Placed",
    "RedisGateway",
    "RejectedError",
    "ReservationNotFound",
    "ReservationView",
    "SaleExists",
    "SaleNotActive",
    "SaleNotFound",
    "SaleSnapshot",
    "SaleView",
    "Settings",
    "SoldOut",
    "dump_event",
    "parse_event",
    "partition_of",
]
