"""Commands and read models shared by the API, the CLI and the gateway."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

SALE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_STOCK = 1_000_000_000
# Units one reservation may hold.
MAX_QTY = 10_000
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)
# A time as JSON carries it: RFC 3339 text whose date, as written, keeps it between EARLIEST
# and LATEST whatever its offset (an offset is under a day, so only the first and the last
# day need to be written in UTC). JSON Schema can say this; "between two instants" it can't.
MOMENT_PATTERN = (
    r"^(?:(?:197[1-9]|19[89][0-9]|[2-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])-"
    r"|1970-(?:01-(?:0[2-9]|[12][0-9]|3[01])|(?:0[2-9]|1[0-2])-[0-9]{2})"
    r"|9999-(?:(?:0[1-9]|1[01])-[0-9]{2}|12-(?:[0-2][0-9]|30))"
    r"|(?:1970-01-01|9999-12-31)[Tt ][^+-]*(?:[Zz]|[+-]00:00)$)"
)


@dataclass(frozen=True)
class Whole:
    """A JSON integer in ``[low, high]`` (never 0 when ``nonzero``): the field's validation
    and its published JSON schema, both from these three numbers.

    A JSON number with no fractional part is an integer to JSON Schema, so ``600.0`` is
    taken as 600; strings, booleans and fractions are refused. An integer literal takes the
    first branch of the union without any Python call (the purchase path's ``qty``).
    """

    low: int
    high: int
    nonzero: bool = False

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        number = core_schema.union_schema(
            [
                core_schema.int_schema(strict=True),
                core_schema.no_info_after_validator_function(
                    _whole, core_schema.float_schema(strict=True, allow_inf_nan=False)
                ),
            ],
            mode="left_to_right",
            custom_error_type="int_type",
        )
        bounded = core_schema.int_schema(ge=self.low, le=self.high)
        steps: list[core_schema.CoreSchema] = [number, bounded]
        if self.nonzero:
            steps.append(core_schema.no_info_after_validator_function(_nonzero, bounded))
        return core_schema.chain_schema(steps)

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema: JsonSchemaValue = {
            "type": "integer",
            "minimum": self.low,
            "maximum": self.high,
        }
        if self.nonzero:
            json_schema["not"] = {"const": 0}
        return json_schema


def _whole(value: float) -> int:
    if not value.is_integer():
        raise ValueError("not a whole number")
    return int(value)


def _aware_or_text(value: Any, text: core_schema.ValidatorFunctionWrapHandler) -> datetime:
    if not isinstance(value, datetime):
        parsed: datetime = text(value)
        return parsed
    if value.tzinfo is None:
        raise PydanticCustomError("timezone_aware", "Input should have timezone info")
    return value


def _nonzero(value: int) -> int:
    if value == 0:
        raise ValueError("must not be 0")
    return value


@dataclass(frozen=True)
class Moment:
    """An aware time: RFC 3339 text matching ``MOMENT_PATTERN`` (so never out of the range a
    time can be stored in), or in Python a ``datetime`` with a time zone. Numbers are
    refused: the published schema says a string."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        text = core_schema.chain_schema(
            [
                core_schema.str_schema(strict=True, pattern=MOMENT_PATTERN),
                core_schema.datetime_schema(tz_constraint="aware"),
            ]
        )
        return core_schema.json_or_python_schema(
            json_schema=text,
            # The same text as from JSON (a body read with json.loads), or a datetime.
            python_schema=core_schema.no_info_wrap_validator_function(_aware_or_text, text),
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "format": "date-time", "pattern": MOMENT_PATTERN}


SaleStatus = Literal["scheduled", "active", "sold_out", "ended"]
ReservationStatus = Literal["pending", "confirmed", "cancelled", "expired"]


class NewSale(BaseModel):
    """What an admin sends to open a sale."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sale_id: str = Field(pattern=SALE_ID_PATTERN, examples=["summer-drop"])
    stock: Annotated[int, Whole(0, MAX_STOCK)] = Field(examples=[1000])
    per_user_limit: Annotated[int, Whole(1, MAX_STOCK)] = Field(default=1, examples=[100])
    starts_at: Annotated[datetime, Moment()] | None = Field(
        default=None,
        description="default: now",
        examples=["2026-01-01T09:00:00Z"],
    )
    ends_at: Annotated[datetime, Moment()] | None = Field(
        default=None,
        description="after starts_at (or now when starts_at is left out); default: never",
        examples=["2099-01-01T09:00:00Z"],
    )
    hold_seconds: Annotated[int, Whole(0, 7 * 24 * 3600)] = Field(
        default=600, description="the payment window of each reservation", examples=[600]
    )

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
