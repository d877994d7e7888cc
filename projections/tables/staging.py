"""Statements on the rebuild's transient tables, ``orders_rebuild`` and
``stock_view_rebuild``: created like the live ``orders`` and ``stock_view`` when a rebuild
starts, loaded, given the live tables' constraints and indexes, and swapped in for them.

They exist only while a rebuild runs, so no migration creates them: they must have the
live tables' shape at that moment, whatever migrations came before.
"""

from __future__ import annotations

import re
from typing import Any

import asyncpg

SUFFIX = "_rebuild"
TABLES = ("stock_view", "orders")  # the projector's lock order, after events
_KEYS = {"stock_view": "sale_id", "orders": "reservation_id"}
_INDEX_DEF = re.compile(r"^CREATE (UNIQUE )?INDEX \S+ ON (?:ONLY )?\S+ (USING .*)$", re.S)


class UncopyableIndexError(Exception):
    """A live table's index whose definition cannot be given to the new table."""


Named = tuple[str, str]
"""(live table, live name) of a constraint or index given to a new table."""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def new_name(name: str) -> str:
    """The name of the new table (or constraint, index) standing for a live one."""
    return name[: 63 - len(SUFFIX)] + SUFFIX


async def create(conn: asyncpg.Connection) -> None:
    """Create the new tables like the live ones, with their grants, without indexes
    (added after the load); any left from an earlier run are dropped first."""
    await drop(conn)
    for table in TABLES:
        new = new_name(table)
        await conn.execute(
            f"CREATE TABLE {_q(new)} (LIKE {_q(table)} INCLUDING ALL EXCLUDING INDEXES)"
        )
        await _copy_grants(conn, table, new)


async def drop(conn: asyncpg.Connection) -> None:
    """Drop the new tables, if there are any."""
    names = ", ".join(_q(new_name(t)) for t in TABLES)
    await conn.execute(f"DROP TABLE IF EXISTS {names}")


async def _copy_grants(conn: asyncpg.Connection, table: str, new: str) -> None:
    """Grant on the new table what is granted on the live one (LIKE does not copy it)."""
    grants = await conn.fetch(
        "SELECT a.privilege_type, a.is_grantable,"
        " CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee"
        " FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a"
        " LEFT JOIN pg_roles r ON r.oid = a.grantee"
        " WHERE c.oid = $1::text::regclass AND a.grantee <> c.relowner",
        table,
    )
    for g in grants:
        option = " WITH GRANT OPTION" if g["is_grantable"] else ""
        await conn.execute(f"GRANT {g['privilege_type']} ON {_q(new)} TO {g['grantee']}{option}")


async def copy_rows(
    conn: asyncpg.Connection, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    """COPY ``rows`` into the new table standing for ``table``."""
    if rows:
        await conn.copy_records_to_table(
            new_name(table), records=rows, columns=list(columns), timeout=None
        )


async def delete_rows(conn: asyncpg.Connection, table: str, keys: list[str]) -> None:
    """Delete the rows of these keys (sale ids, reservation ids) from the new table."""
    await conn.execute(
        f"DELETE FROM {new_name(table)} WHERE {_KEYS[table]} = ANY($1::text[])", keys
    )


async def add_indexes(conn: asyncpg.Connection, table: str) -> tuple[list[Named], list[Named]]:
    """Give the new table the live table's constraints and indexes, under new names;
    return them (constraints, indexes) for ``swap_in``."""
    new = new_name(table)
    added_constraints: list[Named] = []
    added_indexes: list[Named] = []
    constraints = await conn.fetch(
        "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint"
        " WHERE conrelid = $1::text::regclass AND contype IN ('p', 'u', 'x', 'f')"
        " ORDER BY contype, conname",
        table,
    )
    for c in constraints:
        await conn.execute(
            f"ALTER TABLE {_q(new)} ADD CONSTRAINT {_q(new_name(c['conname']))} {c['def']}",
            timeout=None,
        )
        added_constraints.append((table, c["conname"]))
    indexes = await conn.fetch(
        "SELECT i.relname, pg_get_indexdef(x.indexrelid) AS def"
        " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " WHERE x.indrelid = $1::text::regclass AND NOT EXISTS"
        " (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)"
        " ORDER BY i.relname",
        table,
    )
    for i in indexes:
        match = _INDEX_DEF.match(i["def"])
        if match is None:
            raise UncopyableIndexError(f"cannot copy index {i['relname']}: {i['def']}")
        unique, rest = match[1] or "", match[2]
        await conn.execute(
            f"CREATE {unique}INDEX {_q(new_name(i['relname']))} ON {_q(new)} {rest}",
            timeout=None,
        )
        added_indexes.append((table, i["relname"]))
    return added_constraints, added_indexes


async def lock_live(conn: asyncpg.Connection) -> None:
    """Lock the live tables against everything until the transaction ends."""
    await conn.execute(f"LOCK TABLE {', '.join(TABLES)} IN ACCESS EXCLUSIVE MODE")


async def swap_in(conn: asyncpg.Connection, constraints: list[Named], indexes: list[Named]) -> None:
    """Drop the live tables and give the new ones their names, indexes and constraints."""
    for table in TABLES:
        await conn.execute(f"DROP TABLE {_q(table)}")
        await conn.execute(f"ALTER TABLE {_q(new_name(table))} RENAME TO {_q(table)}")
    for table, name in constraints:
        await conn.execute(
            f"ALTER TABLE {_q(table)} RENAME CONSTRAINT {_q(new_name(name))} TO {_q(name)}"
        )
    for _, name in indexes:
        await conn.execute(f"ALTER INDEX {_q(new_name(name))} RENAME TO {_q(name)}")
