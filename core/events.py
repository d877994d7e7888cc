"""The event log's vocabulary: frozen, versioned models with a ``type`` discriminator.

Events are written by the Lua scripts as JSON in the ``event`` field of a stream entry;
times travel as integer milliseconds since the epoch (Redis ``TIME``) and are read back as
aware datetimes. Stored events are never rewritten: an older ``v`` is upcast on read.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, TypeAdapter

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NUMBERS = (int, float)


_MS = timedelta(milliseconds=1)


def from_ms(ms: int) -> datetime:
    """The moment ``ms`` milliseconds after the epoch, exactly: no float of seconds on the
    way, which cannot hold every millisecond of far-future times."""
    # A millisecond times ``ms`` (integer arithmetic, exact): a third cheaper than
    # ``timedelta(0, 0, 0, ms)``, same value; this runs for every time field of every event
    # read.
    return EPOCH + _MS * ms


def _from_ms(value: Any) -> Any:
    if type(value) is int:  # nearly always: checked first, as every event has a time or two
        return EPOCH + _MS * value
    # Events written before times were kept whole may hold a rounded float (1.2345e+14).
    if isinstance(value, _NUMBERS) and not isinstance(value, bool):
        return from_ms(round(value))
    return value


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch, the unit the Lua scripts compare in."""
    return round(moment.timestamp() * 1000)


EpochMs = Annotated[datetime, BeforeValidator(_from_ms), PlainSerializer(to_ms, return_type=int)]


class Event(BaseModel):
    """Fields every event carries."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = 1
    event_id: str = Field(min_length=1)
    sale_id: str = Field(min_length=1)
    occurred_at: EpochMs


class SaleCreated(Event):
    """A sale was opened with its stock and rules."""

    type: Literal["SaleCreated"] = "SaleCreated"
    stock: int = Field(ge=0)
    per_user_limit: int = Field(ge=1)
    starts_at: EpochMs
    ends_at: EpochMs | None = None
    hold_seconds: int = Field(ge=0)


class StockAdjusted(Event):
    """An admin added stock (positive delta) or withdrew unsold stock (negative)."""

    type: Literal["StockAdjusted"] = "StockAdjusted"
    delta: int


class SaleClosed(Event):
    """The sale was closed early; no further reservations are accepted."""

    type: Literal["SaleClosed"] = "SaleClosed"


class ReservationEvent(Event):
    """Fields every reservation event carries."""

    reservation_id: str = Field(min_length=1)
    user_id: str = Field(min_length=1)
    qty: int = Field(ge=1)


class ReservationPlaced(ReservationEvent):
    """Stock was held for a buyer until ``expires_at``."""

    type: Literal["ReservationPlaced"] = "ReservationPlaced"
    expires_at: EpochMs


class ReservationConfirmed(ReservationEvent):
    """The buyer paid in time; the held stock is sold."""

    type: Literal["ReservationConfirmed"] = "ReservationConfirmed"


class ReservationCancelled(ReservationEvent):
    """The buyer cancelled; the stock and quota went back."""

    type: Literal["ReservationCancelled"] = "ReservationCancelled"


class ReservationExpired(ReservationEvent):
    """The payment window passed; the stock and quota went back."""

    type: Literal["ReservationExpired"] = "ReservationExpired"


AnyEvent = Annotated[
    SaleCreated
    | StockAdjusted
    | SaleClosed
    | ReservationPlaced
    | ReservationConfirmed
    | ReservationCancelled
    | ReservationExpired,
    Field(discriminator="type"),
]

TERMINAL_EVENTS = (ReservationConfirmed, ReservationCancelled, ReservationExpired)

_adapter: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)

CURRENT_VERSION = 1

# (type, version) -> function turning that version's dict into the next version's dict.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def upcast(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a stored event's dict up to the current schema version."""
    version = int(data.get("v", 1))
    while version < CURRENT_VERSION:
        data = UPCASTERS[(str(data.get("type")), version)](data)
        version += 1
        data["v"] = version
    return data


def parse_event(raw: str | bytes) -> AnyEvent:
    """Parse one stored event (JSON), upcasting old versions.

    Raises ``pydantic.ValidationError`` (a ``ValueError``) on anything malformed, and a
    ``ValueError`` on an event that cannot be archived (:func:`archivable`).
    """
    return _parse(raw)[0]


_NUL_ESCAPE = "\\u0000"
_NUL_ESCAPE_BYTES = _NUL_ESCAPE.encode()


def has_nul_escape(raw: str | bytes) -> bool:
    """Whether the JSON text may hold a NUL character (``\\u0000``; a cheap look at the
    text, which a literal backslash before ``u0000`` also matches: then
    :func:`archivable` decides on the parsed event)."""
    if isinstance(raw, str):
        return _NUL_ESCAPE in raw
    return _NUL_ESCAPE_BYTES in raw


def archivable(event: AnyEvent) -> AnyEvent:
    """``event``, unless a field of it holds a NUL character: PostgreSQL's text cannot
    hold one, and its json operators (``->>``, which retention and pruning read the
    archive with) refuse the escape, so such an event is malformed to every reader
    (``ValueError``). In a field the models ignore, a NUL goes with the field."""
    if any(type(value) is str and "\x00" in value for value in event.__dict__.values()):
        raise ValueError("unarchivable event: a field holds a NUL character (\\u0000)")
    return event


def parse_stored(raw: str) -> tuple[AnyEvent, str | None]:
    """:func:`parse_event`, and ``raw`` itself when the event was read from it as it is (of
    the current version, on the fast path), else None (it was upcast).

    ``raw`` then reads back as the same event, so it can be archived as it was written
    instead of serialising the model again (about a sixth of a projector's instructions
    per event).
    """
    event, as_is = _parse(raw)
    return event, raw if as_is else None


def _parse(raw: str | bytes) -> tuple[AnyEvent, bool]:
    """The event in ``raw``, and whether it was read from ``raw`` as it is (of the current
    version, on the fast path) rather than upcast."""
    if has_nul_escape(raw):
        return archivable(_upcast_json(raw)), False
    try:  # not contextlib.suppress, which costs a third of this function, run per event
        # The fast path, parsing and validating in one step: an event of the current
        # version that validates as it is. Anything else (an old version, any failure)
        # takes the path that upcasts, which also says what is wrong.
        event = _adapter.validate_json(raw)
        if event.v >= CURRENT_VERSION:
            return event, True
    except Exception:  # the slow path below says what is wrong
        pass
    return _upcast_json(raw), False


def _upcast_json(raw: str | bytes) -> AnyEvent:
    """The slow path of :func:`parse_event`: upcast, or say what is wrong."""
    import json

    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("event is not a JSON object")
        return _adapter.validate_python(upcast(data))
    except ValueError:
        raise
    except (KeyError, TypeError, OSError, OverflowError, RecursionError) as e:
        # An unknown version, a null where a number belongs, a time out of range...
        raise ValueError(f"unreadable event: {type(e).__name__}: {e}") from e


def dump_event(event: AnyEvent) -> str:
    """Serialise an event to the JSON stored in the log."""
    return event.model_dump_json()
