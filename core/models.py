"""Commands and read models shared by the API, the CLI and the gateway."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

SALE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_STOCK = 1_000_000_000
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, tzinfo=UTC)

SaleStatus = Literal["scheduled", "active", "sold_out", "ended"]
ReservationStatus = Literal["pending", "confirmed", "cancelled", "expired"]


class NewSale(BaseModel):
    """What an admin sends to open a sale."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sale_id: str = Field(pattern=SALE_ID_PATTERN)
    stock: int = Field(ge=0, le=MAX_STOCK, strict=True)
    per_user_limit: int = Field(default=1, ge=1, le=MAX_STOCK, strict=True)
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime | None = None
    hold_seconds: int = Field(default=600, ge=0, le=7 * 24 * 3600, strict=True)

    @field_validator("starts_at", "ends_at")
    @classmethod
    def _storable(cls, value: datetime | None) -> datetime | None:
        # Times are stored as epoch milliseconds and must read back as datetimes.
        if value is not None and not EARLIEST <= value <= LATEST:
            raise ValueError(f"must be between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} UTC")
        return value

    @model_validator(mode="after")
    def _window_is_ordered(self) -> NewSale:
        if self.ends_at is not None:
            start = self.starts_at or datetime.now(UTC)
            if self.ends_at <= start:
                raise ValueError("ends_at must be after starts_at")
        return self


class SaleView(BaseModel):
    """A sale's counters as Redis holds them now."""

    model_config = ConfigDict(frozen=True)

    sale_id: str
    status: SaleStatus
    stock: int
    remaining: int
    held: int
    confirmed: int
    released: int
    per_user_limit: int
    hold_seconds: int
    starts_at: datetime
    ends_at: datetime | None


class ReservationView(BaseModel):
    """A reservation as Redis holds it now."""

    model_config = ConfigDict(frozen=True)

    reservation_id: str
    sale_id: str
    user_id: str
    qty: int
    status: ReservationStatus
    expires_at: datetime
