"""Turning Redis replies (bytes) into the text and values the gateway returns."""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

from core.events import from_ms
from core.models import ReservationView

T = TypeVar("T")


def text(value: Any) -> str:
    """A reply item as text (Redis answers bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def time_of(value: Any) -> datetime:
    """A reply item holding epoch milliseconds, as a UTC datetime."""
    return from_ms(int(value))


def keep(mapping: dict[str, T], key: str, value: T | None) -> None:
    """Set ``mapping[key]``, or remove the key when ``value`` is None."""
    if value is None:
        mapping.pop(key, None)
    else:
        mapping[key] = value


def score(value: str) -> int | None:
    """A zset score read as text ("" when the member is absent) as whole milliseconds."""
    return int(float(value)) if value else None


def reservation_view(reservation_id: str, raw: dict[Any, Any]) -> ReservationView:
    """A reservation's hash as a ``ReservationView``."""
    fields = {text(k): text(v) for k, v in raw.items()}
    return ReservationView(
        reservation_id=reservation_id,
        sale_id=fields["sale_id"],
        user_id=fields["user_id"],
        qty=int(fields["qty"]),
        status=fields["status"],
        expires_at=time_of(fields["expires_at"]),
    )


def entry_fields(raw: dict[Any, Any]) -> tuple[dict[str, str], bool]:
    """A stream entry's fields as text, and whether they all were UTF-8; bytes that are
    not come out as ``\\xff`` escapes (anyone can write anything into a stream)."""
    try:
        return {text(k): text(v) for k, v in raw.items()}, True
    except UnicodeDecodeError:
        return {_readable(k): _readable(v) for k, v in raw.items()}, False


def stream_entries(batch: Any) -> tuple[list[tuple[str, dict[str, str]]], set[str]]:
    """The entries of an XRANGE reply as Redis sends it (``[id, [field, value, ...]]`` per
    entry), their fields as text; and the ids of those whose bytes were not all UTF-8
    (shown as in ``entry_fields``), in one pass over the reply."""
    entries: list[tuple[str, dict[str, str]]] = []
    undecodable: set[str] = set()
    for entry_id, flat in batch or ():
        if entry_id is None or flat is None:
            continue
        stream_id = text(entry_id)
        pairs = iter(flat)
        try:
            fields = {k.decode(): v.decode() for k, v in zip(pairs, pairs, strict=False)}
        except (UnicodeDecodeError, AttributeError):
            # Bytes that are not UTF-8, or a client that decodes replies itself.
            pairs = iter(flat)
            fields, decoded = entry_fields(dict(zip(pairs, pairs, strict=False)))
            if not decoded:
                undecodable.add(stream_id)
        entries.append((stream_id, fields))
    return entries, undecodable


def _readable(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)
