"""``flashsale serve --workers N`` and ``flashsale up --workers N``: N API processes on one
port, metrics summed over them, and every way the run can end leaving no process behind."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from api.cli.processes import open_services, running_api
from api.cli.workers import available_cpus, worker_count
from api.web.admin import VERIFY_LOCK_MS
from core.keys import verify_lock
from core.settings import Settings
from tests.daemons import (
    children_of,
    cli,
    env_of,
    eventually,
    kill_all,
    logged,
    running,
    start,
    stop_all,
    table_count,
    terminate,
    wait_exit,
    wait_gone,
)
from tests.helpers import project_all
from tests.http_helpers import ADMIN, buyer, expect_verify_refused, verify_held_up

RESERVATIONS = 50
PLACED = re.compile(r'^flashsale_reservation_attempts_total\{outcome="placed"\} (\S+)$', re.M)


@dataclass
class Service:
    """A running ``flashsale serve`` or ``up`` and what its log says about it."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    base: str
    pids: list[int]  # the API workers; empty when the API runs in the command's process


@asynccontextmanager
async def started(
    env: dict[str, str], log_path: Path, *command: str, workers: bool = True
) -> AsyncIterator[Service]:
    """``flashsale <command>`` once its API listens (in ``workers`` processes of its own, or
    in its own process); killed, workers too, when the block exits."""
    proc = start(command, env, log_path)
    pids: list[int] = []
    try:

        def parent() -> dict[str, Any] | None:
            # With workers, the parent's record names them; each worker logs its own first.
            records = logged(log_path, "api_listening")
            return next((r for r in records if not workers or "pids" in r), None)

        async def listening() -> bool:
            return parent() is not None

        await eventually(listening, 60, f"{command} did not listen", running((proc, log_path)))
        record = parent()
        assert record is not None
        pids = list(record.get("pids", []))
        yield Service(proc, log_path, f"http://127.0.0.1:{record['port']}", pids)
    finally:
        stop_all(proc)
        kill_all(pids)


def fresh_connections(base: str) -> aiohttp.ClientSession:
    """A session that opens a new connection per request, so that the kernel picks a
    worker for each (SO_REUSEPORT balances connections, not requests)."""
    return aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(force_close=True))


async def answering_pids(base: str, requests: int = 40) -> set[int]:
    """The process ids that answered ``requests`` liveness probes on new connections."""
    async with fresh_connections(base) as http:

        async def probe() -> int:
            async with http.get("/healthz") as response:
                assert response.status == 200
                pid: int = (await response.json())["pid"]
                return pid

        return set(await asyncio.gather(*(probe() for _ in range(requests))))


async def open_sale_and_reserve(base: str, sale_id: str, buyers: int) -> None:
    """Create a sale with stock to spare and have ``buyers`` distinct buyers reserve one each,
    every request on a new connection."""
    async with fresh_connections(base) as http:
        sale = {"sale_id": sale_id, "stock": buyers * 2}
        async with http.post("/v1/sales", json=sale, headers=ADMIN) as response:
            assert response.status == 201, await response.text()

        async def reserve(user: str) -> int:
            url = f"/v1/sales/{sale_id}/reservations"
            async with http.post(url, json={"qty": 1}, headers=buyer(user)) as response:
                return response.status

        statuses = await asyncio.gather(*(reserve(f"buyer-{i}") for i in range(buyers)))
    assert statuses == [202] * buyers


def metrics_dir_of(pid: int) -> Path:
    """The multiprocess metrics directory a worker was started with."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    value = next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    return Path(value.partition(b"=")[2].decode())


@pytest.fixture
def env(settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool) -> dict[str, str]:
    """A ``flashsale`` environment on the test servers, reset, on a free port."""
    return env_of(settings, FLASHSALE_PORT="0")


async def test_two_workers_answer_on_one_port_and_metrics_sum_over_both(
    env: dict[str, str], tmp_path: Path
):
    async with started(env, tmp_path / "serve.log", "serve", "--workers", "2") as service:
        assert len(service.pids) == 2
        assert sorted(children_of(service.proc.pid)) == sorted(service.pids)
        await open_sale_and_reserve(service.base, "spread", RESERVATIONS)
        assert await answering_pids(service.base) == set(service.pids)

        # Whichever worker answers a scrape, it counts every worker's reservations, and
        # shows consumer health once, not once per worker.
        async with fresh_connections(service.base) as http:
            for _ in range(20):
                async with http.get("/metrics") as response:
                    body = await response.text()
                assert PLACED.findall(body) == ["50.0"], body
                assert re.findall(r"^flashsale_consumer_health_up .*$", body, re.M) == [
                    "flashsale_consumer_health_up 1.0"
                ]
                assert re.findall(r"^flashsale_reservations_in_flight .*$", body, re.M) == [
                    "flashsale_reservations_in_flight 0.0"
                ]
                assert len(re.findall(r"^flashsale_dead_letter_entries ", body, re.M)) == 1
                # The console's overview counts the same way, whichever worker answers.
                async with http.get("/v1/admin/overview", headers=ADMIN) as response:
                    assert (await response.json())["attempts"] == {"placed": RESERVATIONS}


async def test_sigterm_stops_every_worker_and_the_parent_exits_0(
    env: dict[str, str], tmp_path: Path
):
    async with started(env, tmp_path / "serve.log", "serve", "--workers", "2") as service:
        metrics_dir = metrics_dir_of(service.pids[0])
        assert metrics_dir.is_dir()
        assert await terminate(service.proc, within=10) == 0
        await wait_gone(service.pids, 5, "a worker outlived its parent's stop")
        assert not metrics_dir.exists()
        with pytest.raises(aiohttp.ClientConnectionError):
            await answering_pids(service.base, requests=1)


async def test_a_parent_killed_outright_takes_its_workers_with_it(
    env: dict[str, str], tmp_path: Path
):
    async with started(env, tmp_path / "serve.log", "serve", "--workers", "2") as service:
        service.proc.kill()
        service.proc.wait()
        await wait_gone(service.pids, 10, "a worker outlived its parent killed by SIGKILL")


async def test_a_worker_that_dies_stops_the_others_and_the_parent_fails(
    env: dict[str, str], tmp_path: Path
):
    async with started(env, tmp_path / "serve.log", "serve", "--workers", "2") as service:
        dead, other = service.pids
        os.kill(dead, signal.SIGKILL)
        assert await wait_exit(service.proc, within=15) == 2
        await wait_gone([other], 5, "the other worker was not stopped")
        text = service.log_path.read_text()
        assert f"error: WorkerFailed: API worker {dead} killed by SIGKILL on its own" in text
        assert "stopped the other 1" in text
        assert [r["pid"] for r in logged(service.log_path, "api_worker_died")] == [dead]


async def test_a_stop_while_workers_start_ends_the_run_cleanly(env: dict[str, str], tmp_path: Path):
    log_path = tmp_path / "serve.log"
    proc = start(["serve", "--workers", "2"], env, log_path)
    try:

        async def spawning() -> bool:
            return bool(logged(log_path, "durability_checked")) and bool(children_of(proc.pid))

        await eventually(spawning, 30, "serve spawned no worker", running((proc, log_path)))
        workers = children_of(proc.pid)
        assert await terminate(proc, within=15) == 0, log_path.read_text()[-3000:]
        await wait_gone(workers, 5, "a worker outlived a stop during start-up")
        # Stopped before the workers all listened (a worker takes a second or so to start).
        assert not [r for r in logged(log_path, "api_listening") if "pids" in r]
    finally:
        stop_all(proc)


async def test_a_port_in_use_is_refused_before_any_worker_starts(env: dict[str, str]):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        rc, out = await cli(env | {"FLASHSALE_PORT": port}, "serve", "--workers", "2", within=30)
    assert rc == 2, out
    assert "error: OSError: [Errno 98]" in out and "api_listening" not in out, out


async def test_one_worker_serves_in_the_command_process(env: dict[str, str], tmp_path: Path):
    single = env | {"FLASHSALE_WORKERS": "1"}
    async with started(single, tmp_path / "serve.log", "serve", workers=False) as service:
        assert service.pids == []
        assert children_of(service.proc.pid) == []
        assert await answering_pids(service.base, requests=5) == {service.proc.pid}
        await open_sale_and_reserve(service.base, "single", 5)
        async with aiohttp.ClientSession(service.base) as http, http.get("/metrics") as response:
            assert PLACED.findall(await response.text()) == ["5.0"]
        assert await terminate(service.proc) == 0


async def test_one_verify_at_a_time_over_api_processes_and_a_killed_holder_frees_it_by_ttl(
    env: dict[str, str],
    settings: Settings,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    tmp_path: Path,
):
    """Two ``flashsale serve`` processes on one Redis: a verify held up in one refuses a
    second in the other; the holder killed mid-run leaves the lock to its time to live."""
    single = env | {"FLASHSALE_WORKERS": "1"}
    async with (
        started(single, tmp_path / "holder.log", "serve", workers=False) as holder,
        started(single, tmp_path / "other.log", "serve", workers=False) as other,
        aiohttp.ClientSession(holder.base) as holder_http,
        aiohttp.ClientSession(other.base) as other_http,
    ):
        sale = {"sale_id": "checked", "stock": 5}
        async with holder_http.post("/v1/sales", json=sale, headers=ADMIN) as response:
            assert response.status == 201, await response.text()
        await project_all(redis_client, pool, settings.partitions)

        async def held() -> bool:
            return bool(await redis_client.exists(verify_lock()))

        async def free() -> bool:
            return not await held()

        async with verify_held_up(pool):
            run = asyncio.create_task(holder_http.post("/v1/admin/verify", headers=ADMIN))
            alive = running((holder.proc, holder.log_path))
            await eventually(held, 10, "the first verify took no lock", alive)
            await expect_verify_refused(other_http)
            holder.proc.kill()
            holder.proc.wait()
            with pytest.raises(aiohttp.ClientError):
                await run
        # The dead holder's lock outlives it, for its time to live at most, not for ever.
        await expect_verify_refused(other_http)
        assert 0 < await redis_client.pttl(verify_lock()) <= VERIFY_LOCK_MS
        # As if that time had passed (test_console_api waits out a short one for real).
        await redis_client.pexpire(verify_lock(), 1)
        await eventually(free, 5, "the lock did not expire")
        async with other_http.post("/v1/admin/verify", headers=ADMIN) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["clean"] is True
        assert not await held()


async def test_up_runs_the_consumers_once_beside_its_workers(
    env: dict[str, str], pool: asyncpg.Pool, tmp_path: Path
):
    async with started(env, tmp_path / "up.log", "up", "--workers", "2") as service:
        assert len(service.pids) == 2
        assert sorted(children_of(service.proc.pid)) == sorted(service.pids)
        await open_sale_and_reserve(service.base, "up-sale", 10)

        async def projected() -> bool:
            return await table_count(pool, "orders") == 10

        await eventually(
            projected, 30, "orders not projected", running((service.proc, service.log_path))
        )
        assert len(logged(service.log_path, "projector_started")) == 1
        assert await terminate(service.proc) == 0
        await wait_gone(service.pids, 5, "a worker outlived `up`")


async def test_workers_default_to_the_cpus_and_must_be_positive(env: dict[str, str]):
    assert worker_count(Settings(workers=None)) == available_cpus() == len(os.sched_getaffinity(0))
    assert worker_count(Settings(workers=3)) == 3
    rc, out = await cli(env, "serve", "--workers", "0", within=30)
    assert rc == 2 and "must be at least 1" in out, out


async def test_a_serving_process_freezes_what_it_holds_at_start_out_of_the_collector(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    # What serve, up, demo and every worker run: the app started, its heap frozen.
    gc.unfreeze()
    try:
        async with open_services(settings) as services, running_api(services, 0) as port:
            assert gc.get_freeze_count() > 0
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/healthz") as response,
            ):
                assert response.status == 200
    finally:
        gc.unfreeze()
