"""The Redis client the service builds: its plain TCP connections pack commands with
hiredis, byte for byte as redis-py does, and leave to redis-py what hiredis does not take."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError

from api.connections import PackingConnection, redis_client_for
from core.settings import Settings

COMMANDS: list[tuple[Any, ...]] = [
    ("EVALSHA", "a" * 40, 2, "fs:{p1.Ab}:sale:s", "fs:{p1.Ab}:events", 1, 600, ""),
    ("SET", "k", "é", "PX", 1.5),
    ("SET", b"k", memoryview(b"v")),
    ("INCRBY", "k", 2**70),
    ("CONFIG GET", "maxmemory"),  # a name of two words: redis-py splits it
    (b"CLIENT SETNAME", "x"),
    ("SET", "k", bytearray(b"xy")),  # a type hiredis does not take
]


def packed(connection: aioredis.Connection, args: tuple[Any, ...]) -> bytes:
    return b"".join(bytes(chunk) for chunk in connection.pack_command(*args))


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: str(args[0]))
def test_commands_are_packed_as_redis_py_packs_them(args: tuple[Any, ...]) -> None:
    assert packed(PackingConnection(), args) == packed(aioredis.Connection(), args)


@pytest.mark.parametrize("value", [True, None])
def test_what_redis_py_refuses_is_still_refused(value: Any) -> None:
    with pytest.raises(DataError, match="Invalid input of type"):
        PackingConnection().pack_command("SET", "k", value)


async def test_only_plain_tcp_clients_pack_with_hiredis() -> None:
    kinds = {
        "redis://127.0.0.1:6379/0": PackingConnection,
        "rediss://127.0.0.1:6380/0": aioredis.SSLConnection,
        "unix:///tmp/redis.sock": aioredis.UnixDomainSocketConnection,
    }
    for url, kind in kinds.items():
        client = redis_client_for(Settings(redis_url=url, redis_cluster="off"))
        assert isinstance(client, aioredis.Redis)
        assert client.connection_pool.connection_class is kind, url
        await client.aclose()
