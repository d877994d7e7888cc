"""The migration runner against real PostgreSQL, on migrations directories of the tests'
own, each run in a fresh schema: files apply in version order, once, and a directory where
two files share a version number is refused before anything is applied; and the shipped
migrations carry an archive written before them (jsonb payloads) over to the json ones."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from core.errors import ConfigurationError
from core.events import SaleCreated, dump_event, from_ms, parse_event
from core.settings import Settings
from projections.batch import project
from projections.entries import LogEntry
from projections.schema import migrate, migration_files
from projections.tables import events


@pytest.fixture
async def schema_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool whose connections see only a fresh, empty schema (dropped afterwards)."""
    schema = f"migrations_test_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute(f"CREATE SCHEMA {schema}")
    try:
        pool = await asyncpg.create_pool(
            settings.database_url, min_size=1, max_size=2, server_settings={"search_path": schema}
        )
        try:
            yield pool
        finally:
            await pool.close()
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


async def tables(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    )
    return {r["table_name"] for r in rows}


async def test_migrations_apply_in_version_order_and_once(
    schema_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # Each needs the one before; 10 sorts before 2 as text.
    directory = write(
        tmp_path / "m",
        {
            "0010_third.sql": "ALTER TABLE t ADD COLUMN c int NOT NULL DEFAULT 3;",
            "0002_second.sql": "ALTER TABLE t ADD COLUMN b int NOT NULL DEFAULT 2;",
            "0001_first.sql": "CREATE TABLE t (a int);",
            "README.txt": "not a migration",
        },
    )
    assert await migrate(schema_pool, directory) == [1, 2, 10]
    assert await migrate(schema_pool, directory) == []
    recorded = await schema_pool.fetch("SELECT version, name FROM schema_migrations ORDER BY 1")
    assert [(r["version"], r["name"]) for r in recorded] == [
        (1, "first"),
        (2, "second"),
        (10, "third"),
    ]
    columns = await schema_pool.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = 't' ORDER BY ordinal_position"
    )
    assert [r["column_name"] for r in columns] == ["a", "b", "c"]


async def test_a_second_file_of_an_applied_version_is_refused_not_skipped(
    schema_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    directory = write(
        tmp_path / "m",
        {"0001_first.sql": "CREATE TABLE t (a int);", "0002_second.sql": "CREATE TABLE u (a int);"},
    )
    assert await migrate(schema_pool, directory) == [1, 2]
    # A later branch numbered its migration 2 too: it would never run.
    write(directory, {"0002_other.sql": "CREATE TABLE v (a int);", "0003_next.sql": "SELECT 1;"})

    with pytest.raises(ConfigurationError) as refused:
        await migrate(schema_pool, directory)

    assert "0002_second.sql" in str(refused.value)
    assert "0002_other.sql" in str(refused.value)
    versions = await schema_pool.fetch("SELECT version FROM schema_migrations ORDER BY 1")
    assert [r["version"] for r in versions] == [1, 2]  # not even 3 was applied
    assert await tables(schema_pool) == {"schema_migrations", "t", "u"}


async def test_a_directory_with_two_files_of_one_version_applies_nothing(
    schema_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    directory = write(
        tmp_path / "m",
        {
            "0001_first.sql": "CREATE TABLE t (a int);",
            "0002_a.sql": "CREATE TABLE u (a int);",
            "2_b.sql": "CREATE TABLE v (a int);",
        },
    )
    with pytest.raises(ConfigurationError, match=r"0002_a\.sql, 2_b\.sql"):
        await migrate(schema_pool, directory)
    assert await tables(schema_pool) == set()


def test_a_sql_file_not_named_by_its_version_is_refused(tmp_path: Path) -> None:
    directory = write(tmp_path / "m", {"first.sql": "SELECT 1;"})
    with pytest.raises(ConfigurationError, match=r"first\.sql"):
        migration_files(directory)


def test_the_shipped_migrations_have_distinct_versions() -> None:
    versions = [version for version, _, _ in migration_files()]
    assert versions == sorted(set(versions)) and versions[0] == 1


async def test_rebuild_checkpoints_comes_from_the_migrations(schema_pool: asyncpg.Pool) -> None:
    await migrate(schema_pool)
    assert {"rebuild_checkpoints", "prune_checkpoints", "checkpoints"} <= await tables(schema_pool)


async def test_a_database_whose_rebuild_created_rebuild_checkpoints_migrates(
    schema_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # A database from before migration 0003: 0001 and 0002 applied, and a rebuild ran,
    # which created rebuild_checkpoints itself, with this definition.
    earlier = {f"{v:04d}_{name}.sql": sql for v, name, sql in migration_files() if v < 3}
    assert await migrate(schema_pool, write(tmp_path / "earlier", earlier)) == [1, 2]
    await schema_pool.execute(
        "CREATE TABLE IF NOT EXISTS rebuild_checkpoints ("
        " partition integer PRIMARY KEY, stream_id text NOT NULL,"
        " stream_ms bigint NOT NULL, stream_seq bigint NOT NULL,"
        " updated_at timestamptz NOT NULL DEFAULT now())"
    )
    await schema_pool.execute(
        "INSERT INTO rebuild_checkpoints (partition, stream_id, stream_ms, stream_seq)"
        " VALUES (0, '5-1', 5, 1)"
    )
    assert 3 in await migrate(schema_pool)
    row = await schema_pool.fetchrow("SELECT * FROM rebuild_checkpoints")
    assert (row["partition"], row["stream_id"], row["stream_ms"], row["stream_seq"]) == (
        0,
        "5-1",
        5,
        1,
    )


async def test_an_archive_of_jsonb_payloads_migrates_to_json_and_reads_back(
    schema_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # An archive from before migration 0006 (payload jsonb, events_by_sale there): its
    # events read back the same once the payload is json, and the projector archives on.
    event = SaleCreated(
        event_id="e-1",
        sale_id="s",
        occurred_at=from_ms(1_764_000_000_000),
        stock=5,
        per_user_limit=1,
        starts_at=from_ms(1_764_000_000_000),
        hold_seconds=60,
    )
    earlier = {f"{v:04d}_{name}.sql": sql for v, name, sql in migration_files() if v < 5}
    assert await migrate(schema_pool, write(tmp_path / "earlier", earlier)) == [1, 2, 3, 4]
    await schema_pool.execute(
        "INSERT INTO events (event_id, partition, stream_id, stream_ms, stream_seq, sale_id,"
        " type, occurred_at, payload) VALUES ($1, 0, '1-0', 1, 0, 's', $2, $3, $4::jsonb)",
        event.event_id,
        event.type,
        event.occurred_at,
        dump_event(event),
    )
    assert await migrate(schema_pool) == [5, 6]
    async with schema_pool.acquire() as conn:
        assert await project(conn, "g", [LogEntry(0, "2-0", replace(event, "e-2"))]) == 1
        rows = await events.read_range(conn, 0, (0, 0), (3, 0), 10)
        indexes = {
            r["indexname"]
            for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            )
        }
    assert [parse_event(r["payload"]) for r in rows] == [event, replace(event, "e-2")]
    assert "events_by_sale" not in indexes


def replace(event: SaleCreated, event_id: str) -> SaleCreated:
    return event.model_copy(update={"event_id": event_id})
