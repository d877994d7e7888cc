"""Ordered SQL migrations: ``projections/migrations/NNNN_name.sql``, each applied once.

A migration is known by its version number (``schema_migrations``), so two files of one
number would leave one of them unapplied without a word: the runner refuses such a
directory before it applies anything.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable

import asyncpg
import structlog

from core.errors import ConfigurationError

log = structlog.get_logger(__name__)

# Any constant works; it only has to be the same for every process migrating this database.
_MIGRATION_LOCK = 7_401_952


_FILE_NAME = re.compile(r"^([0-9]+)_(.+)\.sql$")


def default_directory() -> Traversable:
    """The migrations shipped with the package: ``projections/migrations``."""
    return resources.files("projections").joinpath("migrations")


def migration_files(directory: Traversable | None = None) -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every migration in ``directory`` (default: the shipped
    ones), in version order.

    Raises ``ConfigurationError`` naming the files when two share a version number (``0003_a``
    and ``3_b`` too) or a ``.sql`` file's name does not start with ``NNNN_``.
    """
    by_version: dict[int, list[str]] = {}
    found = []
    where = directory or default_directory()
    for entry in where.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.fullmatch(entry.name)
        if match is None:
            raise ConfigurationError(
                f"migration file {entry.name!r} is not named NNNN_name.sql (in {where})"
            )
        version = int(match[1])
        by_version.setdefault(version, []).append(entry.name)
        found.append((version, match[2], entry.read_text()))
    clashes = {v: sorted(names) for v, names in by_version.items() if len(names) > 1}
    if clashes:
        listed = "; ".join(f"{v}: {', '.join(names)}" for v, names in sorted(clashes.items()))
        raise ConfigurationError(
            f"migration files in {where} share a version number ({listed}): "
            "renumber one, or only the first would ever be applied"
        )
    return sorted(found)


async def migrate(pool: asyncpg.Pool, directory: Traversable | None = None) -> list[int]:
    """Apply the migrations of ``directory`` (default: the shipped ones) this database has
    not seen, in version order; return the versions applied. Raises ``ConfigurationError``,
    applying nothing, when the directory is inconsistent (see :func:`migration_files`)."""
    files = migration_files(directory)
    applied_now: list[int] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in files:
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                applied_now.append(version)
                log.info("migration_applied", version=version, name=name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied_now
