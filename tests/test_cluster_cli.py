"""``flashsale up --redis-cluster`` and ``flashsale demo --redis-cluster`` as a user runs them:
real processes, an embedded Redis Cluster of their own, the test PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from pathlib import Path

import aiohttp
import asyncpg

from api.web.auth import issue_token
from core.settings import Settings
from tests.daemons import (
    FAST,
    FLASHSALE,
    children_of,
    cli,
    env_for,
    is_gone,
    kill_all,
    running,
    start,
    stop_all,
    terminate,
    wait_gone,
)

_SERVER_NAMES = ("redis-server", "valkey-server")
_CLUSTER_LINE = re.compile(
    r"^redis: redis://\S+  \(a Redis Cluster: primaries on ports (\d+), (\d+), (\d+), "
    r"a replica each on (\d+), (\d+), (\d+)\)$",
    re.M,
)


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    """No Redis URL (the command starts its cluster), the test PostgreSQL, no secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    return env | {
        "FLASHSALE_DATABASE_URL": settings.database_url or "",
        "FLASHSALE_PARTITIONS": "4",
        **extra,
    }


def _redis_nodes(parent: int) -> dict[int, Path]:
    """The Redis server processes ``parent`` started, each with its data directory (its
    working directory: redis-server rewrites its command line)."""
    nodes: dict[int, Path] = {}
    for pid in children_of(parent):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() in _SERVER_NAMES:
                nodes[pid] = Path(os.readlink(f"/proc/{pid}/cwd"))
    return nodes


def _assert_cleaned_up(nodes: dict[int, Path]) -> None:
    left = [pid for pid in nodes if not is_gone(pid)]
    assert not left, f"redis nodes {left} outlived the command"
    kept = [str(d) for d in nodes.values() if d.exists()]
    assert not kept, f"node data left behind: {kept}"


async def test_redis_cluster_with_a_redis_url_is_refused_in_one_line(settings: Settings):
    env = env_for(settings.redis_url or "", settings.database_url or "")
    for command in ("up", "demo"):
        rc, out = await cli(env, command, "--redis-cluster", within=30)
        assert rc == 2, out
        lines = out.strip().splitlines()
        assert len(lines) == 1, out
        assert lines[0].startswith("error: ConfigurationError: --redis-cluster"), out
        assert "FLASHSALE_REDIS_URL is set" in lines[0], out


async def test_demo_on_an_embedded_cluster_passes_and_stops_its_nodes(
    settings: Settings, pool: asyncpg.Pool
):
    child = await asyncio.create_subprocess_exec(
        str(FLASHSALE),
        "demo",
        "--redis-cluster",
        "--stock",
        "20",
        "--buyers",
        "300",
        "--hold-seconds",
        "3",
        "--json",
        env=_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    nodes: dict[int, Path] = {}

    async def watch() -> None:
        while child.returncode is None:
            nodes.update(_redis_nodes(child.pid))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        out, err = await asyncio.wait_for(child.communicate(), timeout=120)
    finally:
        watcher.cancel()
        if child.returncode is None:
            child.kill()
            await child.wait()
    try:
        assert child.returncode == 0, err.decode()[-3000:]
        shape = _CLUSTER_LINE.search(err.decode())
        assert shape, err.decode()
        assert len(nodes) == 6, f"saw {len(nodes)} redis nodes of the demo"
        report = json.loads(out)
        assert report["ok"] is True and report["redis"] == "a cluster of 3 primaries"
        assert report["first"]["sold"] == 20
        assert report["confirmed"] == 20 and report["redis_remaining"] == 0
        assert report["oversold"] == 0 and report["duplicate_buyers"] == 0
        assert report["catch_up_seconds"] is not None and report["verify_clean"] is True
        async with pool.acquire() as conn:
            buyers = await conn.fetch(
                "SELECT user_id FROM orders WHERE sale_id = $1 AND status = 'confirmed'",
                report["sale_id"],
            )
        assert len({r["user_id"] for r in buyers}) == len(buyers) == 20
        await wait_gone(nodes, 10, "redis nodes outlived the demo")
        _assert_cleaned_up(nodes)
    finally:
        kill_all(nodes)


async def test_up_on_an_embedded_cluster_serves_projects_and_stops_on_sigterm(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path
):
    env = _env(settings, FLASHSALE_PORT="0", **FAST)
    log_path = tmp_path / "up.log"
    proc = start(["up", "--redis-cluster", "--workers", "2"], env, log_path)
    nodes: dict[int, Path] = {}
    children: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while "flashsale is up: " not in (text := log_path.read_text()):
            running((proc, log_path))()
            assert time.monotonic() < deadline, text[-3000:]
            await asyncio.sleep(0.1)
        admin = re.search(r"admin token for this run: (\S+)", text)
        secret = re.search(r"buyer tokens for this run: FLASHSALE_JWT_SECRET=(\S+) ", text)
        base = re.search(r"flashsale is up: (http://\S+)", text)
        shape = _CLUSTER_LINE.search(text)
        assert admin and secret and base and shape, text[-3000:]
        nodes = _redis_nodes(proc.pid)
        children = children_of(proc.pid)
        # Six nodes on the printed ports, two API workers; nothing else.
        assert len(nodes) == 6 and len(children) == 8, (nodes, children)

        async with aiohttp.ClientSession(base.group(1)) as http:
            headers = {"Authorization": f"Bearer {admin.group(1)}"}
            body = {"sale_id": "cluster-up", "stock": 3}
            async with http.post("/v1/sales", json=body, headers=headers) as response:
                assert response.status == 201, await response.text()
            headers = {"Authorization": f"Bearer {issue_token(secret.group(1), 'alice')}"}
            url = "/v1/sales/cluster-up/reservations"
            async with http.post(url, json={"qty": 1}, headers=headers) as response:
                assert response.status == 202, await response.text()
                reservation_id = (await response.json())["reservation_id"]

        # The consumers of `up` project it into PostgreSQL.
        deadline = time.monotonic() + 30
        async with pool.acquire() as conn:
            while not await conn.fetchval(
                "SELECT count(*) FROM orders WHERE reservation_id = $1", reservation_id
            ):
                running((proc, log_path))()
                assert time.monotonic() < deadline, "the reservation did not reach PostgreSQL"
                await asyncio.sleep(0.1)

        assert await terminate(proc, within=30) == 0, log_path.read_text()[-3000:]
        await wait_gone(children, 10, "a node or worker outlived `up`")
        _assert_cleaned_up(nodes)
    finally:
        stop_all(proc)
        kill_all(children)


async def test_up_stopped_while_its_cluster_forms_leaves_nothing_behind(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path
):
    """SIGTERM before the service is up (the cluster takes a second or two to form) stops
    the nodes started so far and deletes their data, as Ctrl-C would."""
    log_path = tmp_path / "up.log"
    tmp = tmp_path / "tmp"  # where the nodes' data directories go
    tmp.mkdir()
    env = _env(settings, TMPDIR=str(tmp))
    proc = start(["up", "--redis-cluster", "--workers", "1"], env, log_path)
    nodes: dict[int, Path] = {}
    try:
        deadline = time.monotonic() + 30
        while not (nodes := _redis_nodes(proc.pid)):
            running((proc, log_path))()
            assert time.monotonic() < deadline, "no redis node started"
            await asyncio.sleep(0.01)
        rc = await terminate(proc, within=30)
        text = log_path.read_text()
        assert "flashsale is up" not in text, "too late: the test meant to stop it while forming"
        assert rc == 130 and text.rstrip().endswith("interrupted"), text[-3000:]
        await wait_gone(nodes, 10, "a redis node outlived `up`")
        _assert_cleaned_up(nodes)
        # Nodes started after the first one was seen left no data either.
        assert not list(tmp.glob("flashsale-redis-*")), list(tmp.iterdir())
    finally:
        stop_all(proc)
        kill_all(nodes)
