"""Log entries: an event with the stream position it was read from, as every reader of the
log (the projector, the log reader, verify, rebuild, retention) passes it on."""

from __future__ import annotations

from dataclasses import dataclass

from core.events import AnyEvent


def parse_stream_id(stream_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(slots=True)
class LogEntry:
    """An event with the stream position it was read from; and, when known, the JSON it
    was read from, if that reads back as the very event (see
    :func:`core.events.parse_stored`).

    Never changed once made, but not frozen: a frozen dataclass sets each field through
    ``object.__setattr__``, which made building one cost three times as much, and the
    projector builds one for every event."""

    partition: int
    stream_id: str
    event: AnyEvent
    payload: str | None = None

    @property
    def position(self) -> tuple[int, int]:
        return parse_stream_id(self.stream_id)
