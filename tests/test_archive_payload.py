"""The archive's payloads: the projector keeps a reservation's event as the JSON the stream
entry held (it reads back as the very event), and every reader of the archive still gets
what it needs from it, whatever else that JSON holds: a field the model ignores, a time in
exponent form, a value PostgreSQL refuses in a field nobody reads."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

import core.events
from consumers.projector import Projector
from core.events import ReservationPlaced, SaleCreated, parse_event, parse_stored, to_ms
from core.gateway import RedisGateway
from core.keys import dead_letter_stream, partition_of
from projections.entries import LogEntry
from projections.log import LogReader, read_event, read_whole_log
from projections.tables import events
from tests.conftest import ProjectorFactory

T0 = 1_764_460_000_000


def _placement(event_id: str, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "ReservationPlaced",
        "v": 1,
        "event_id": event_id,
        "sale_id": "s",
        "occurred_at": T0,
        "reservation_id": f"r-{event_id}",
        "user_id": f"u-{event_id}",
        "qty": 1,
        "expires_at": T0 + 600_000,
    }
    event.update(fields)
    return event


# As a Lua script (or an older or newer one) may have written them.
WRITTEN = {
    # A field this version of the model does not know: kept in the archive, ignored on read.
    "extra": json.dumps(_placement("extra", note="gift wrap")),
    # cjson's 14 significant digits: a time of 10^14 ms and more in exponent form.
    "exponent time": json.dumps(_placement("exp", expires_at=2.5340221440012e14)),
    # Compact, keys in another order, no version (1 by default).
    "compact": '{"qty":2,"user_id":"u-c","type":"ReservationPlaced","event_id":"compact",'
    f'"sale_id":"s","reservation_id":"r-compact","occurred_at":{T0},'
    f'"expires_at":{T0 + 1}}}',
    # Fields the model ignores holding what PostgreSQL refuses (a json column NaN, its json
    # operators a NUL): still projected, the field left out.
    "NaN aside": json.dumps(_placement("nan", junk=float("nan"))),
    "NUL aside": json.dumps(_placement("nul", junk="a\u0000b")),
    # The stock view reads a sale's numbers from its payload as integers: 1e+14 is one.
    "sale in exponent form": '{"type":"SaleCreated","v":1,"event_id":"created","sale_id":"s",'
    f'"occurred_at":{T0},"stock":1e+14,"per_user_limit":1,"starts_at":{T0},'
    '"hold_seconds":60}',
}


async def _project_written(
    make_projector: ProjectorFactory,
    redis_client: aioredis.Redis,
    stream: str,
    written: Iterable[str],
) -> Projector:
    """Write each raw ``event`` field to the stream, then project them in one batch."""
    for raw in written:
        entry: dict[FieldT, EncodableT] = {"event": raw}
        await redis_client.xadd(stream, entry)
    projector = make_projector("p", block_ms=10)
    await projector.ensure_groups()
    await projector.handle(await projector.read_new(block_ms=10))
    return projector


async def test_every_reader_reads_the_archive_as_the_stream_held_it(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
):
    partition = partition_of("s", gateway.partitions)
    stream = gateway.keys_for_partition(partition).events
    projector = await _project_written(make_projector, redis_client, stream, WRITTEN.values())
    assert projector.projected == len(WRITTEN)
    assert projector.dead_lettered == 0
    assert not await redis_client.xrange(dead_letter_stream())
    expected = {e.event_id: e for e in map(parse_event, WRITTEN.values())}

    async with pool.acquire() as conn:
        rows = await events.read_range(conn, partition, (0, 0), (2**63 - 1, 0), 100)
        notes = dict(await conn.fetch("SELECT event_id, payload->>'note' FROM events"))
        reservations = await events.reservation_events(
            conn, partition, ["ReservationPlaced"], (0, 0), (2**63 - 1, 0), 100
        )
        stock = await conn.fetchval("SELECT stock FROM stock_view WHERE sale_id = 's'")
    # Read back as the very events: by the log reader's parse, and by the model's.
    assert {r["event_id"]: read_event(r["payload"]) for r in rows} == expected
    assert {r["event_id"]: parse_event(r["payload"]) for r in rows} == expected
    # What the stream held is what the archive holds (a field nobody reads included);
    # where PostgreSQL refused it, the event as the model writes it.
    assert notes["extra"] == "gift wrap"
    payloads = {r["event_id"]: json.loads(r["payload"]) for r in rows}
    assert "junk" not in payloads["nan"] and "junk" not in payloads["nul"]
    exponent = expected["exp"]
    assert isinstance(exponent, ReservationPlaced)
    assert to_ms(exponent.expires_at) == 253_402_214_400_120
    # The readers of single fields (retention, pruning) and the stock view's statement.
    placed = {e for e in expected.values() if isinstance(e, ReservationPlaced)}
    assert {(r["reservation_id"], r["user_id"]) for r in reservations} == {
        (e.reservation_id, e.user_id) for e in placed
    }
    created = expected["created"]
    assert isinstance(created, SaleCreated) and stock == created.stock == 10**14
    # The whole log, as verify and rebuild read it once the stream is trimmed.
    await redis_client.xtrim(stream, maxlen=0)
    log = await read_whole_log(LogReader(gateway, pool), gateway.partitions)
    assert {e.event.event_id: e.event for e in log.entries[partition]} == expected


async def test_a_nul_in_a_field_the_model_keeps_is_parked_and_the_archive_stays_readable(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
):
    # The archive's json column would take it, but ``->>`` (retention and pruning read the
    # archive with it) refuses the escape for every row it reads: one such event would stop
    # them for good. It is malformed to every reader, so the projector parks it.
    partition = partition_of("s", gateway.partitions)
    stream = gateway.keys_for_partition(partition).events
    nul = json.dumps(_placement("nul-kept", user_id="u\u0000"))
    literal = json.dumps(_placement("backslash", user_id="u\\u0000"))  # no NUL: kept
    written = (nul, literal, WRITTEN["compact"])
    projector = await _project_written(make_projector, redis_client, stream, written)
    assert (projector.projected, projector.dead_lettered) == (2, 1)
    parked = await redis_client.xrange(dead_letter_stream()) or []
    ids = [json.loads((fields or {})[b"field:event"])["event_id"] for _, fields in parked]
    assert ids == ["nul-kept"]
    async with pool.acquire() as conn:
        reservations = await events.reservation_events(
            conn, partition, ["ReservationPlaced"], (0, 0), (2**63 - 1, 0), 100
        )
    assert sorted(r["user_id"] for r in reservations) == ["u-c", "u\\u0000"]
    for parse in (parse_event, read_event, lambda raw: parse_stored(raw)[0]):
        try:
            parse(nul)
        except ValueError as e:
            assert "NUL" in str(e)
        else:
            raise AssertionError(f"{parse} read a NUL")


def test_an_upcast_event_is_archived_in_the_current_schema(monkeypatch: Any):
    # A version 2 whose upcaster renames a field: the JSON of version 1 is no version 2
    # event, so the archive must take the upcast event's JSON, not the one read.
    monkeypatch.setattr(core.events, "CURRENT_VERSION", 2)

    def to_v2(data: dict[str, Any]) -> dict[str, Any]:
        data["user_id"] = data.pop("buyer")
        return data

    monkeypatch.setitem(core.events.UPCASTERS, ("ReservationPlaced", 1), to_v2)
    old = _placement("old")
    old["buyer"] = old.pop("user_id")
    event, payload = parse_stored(json.dumps(old))
    assert payload is None and isinstance(event, ReservationPlaced)
    assert (event.v, event.user_id) == (2, "u-old")
    row = events.row_of(LogEntry(0, "1-0", event, payload))
    assert parse_event(row[-1]) == event
    current = json.dumps(_placement("new", v=2))
    assert parse_stored(current) == (parse_event(current), current)
