"""Stream entries as Redis hands them over: bytes, which need not be UTF-8.

Anyone can write anything into a stream, so a consumer must never let one entry's bytes
stop it. An entry whose field names or values are not UTF-8 is no event; it is decoded
losslessly (``surrogateescape``), so that :func:`to_bytes` gives back the very bytes to
park on the dead-letter stream, and the decoding error says what was wrong.
"""

from __future__ import annotations

from collections.abc import Mapping

_LOSSLESS = "surrogateescape"


def text(value: bytes | str) -> str:
    """An id, a name or a count from Redis as text (these are always ASCII)."""
    return value.decode() if isinstance(value, bytes) else value


def readable(value: bytes | str) -> str:
    """Text for people: bytes that are not UTF-8 shown as ``\\xff`` escapes."""
    if isinstance(value, str):
        value = to_bytes(value)
    return value.decode("utf-8", "backslashreplace")


def to_bytes(value: str) -> bytes:
    """The bytes a field was read from (inverse of the lossless decoding)."""
    return value.encode("utf-8", _LOSSLESS)


def decode_fields(raw: Mapping[bytes | str, bytes | str]) -> tuple[dict[str, str], str | None]:
    """An entry's fields as text, and None; or, when some bytes are not UTF-8, the fields
    decoded losslessly (see :func:`to_bytes`) and the error, naming the field."""
    try:  # the common case, in one pass (inline: this runs for every entry read)
        return {
            (k.decode() if type(k) is bytes else str(k)): (
                v.decode() if type(v) is bytes else str(v)
            )
            for k, v in raw.items()
        }, None
    except UnicodeDecodeError:
        pass
    fields: dict[str, str] = {}
    error: str | None = None
    for key, value in raw.items():
        name = _strict(key)
        if isinstance(name, UnicodeDecodeError):
            error = error or f"UnicodeDecodeError: a field name is not UTF-8: {name}"
            name = _lossless(key)
        decoded = _strict(value)
        if isinstance(decoded, UnicodeDecodeError):
            error = error or f"UnicodeDecodeError: field {readable(name)!r} is not UTF-8: {decoded}"
            decoded = _lossless(value)
        fields[name] = decoded
    return fields, error


def _strict(value: bytes | str) -> str | UnicodeDecodeError:
    if isinstance(value, str):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError as e:
        return e


def _lossless(value: bytes | str) -> str:
    return value.decode("utf-8", _LOSSLESS) if isinstance(value, bytes) else value
