"""Real ``flashsale`` processes for the fault tests: start, watch, stop, and ask the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import asyncpg
from redis.exceptions import ResponseError

from core.gateway.clients import RedisClient
from core.keys import CONSUMER_GROUP, PartitionKeys, partition_of
from core.settings import Settings
from tests.helpers import ADMIN_TOKEN, JWT_SECRET, text

PROJECT_ROOT = Path(__file__).resolve().parents[1]

FLASHSALE = Path(sys.executable).parent / "flashsale"

# Short timeouts, so that reclaims and retries happen within a test's patience.
FAST = {
    "FLASHSALE_CONSUMER_BATCH": "50",
    "FLASHSALE_CONSUMER_BLOCK_MS": "100",
    "FLASHSALE_CLAIM_IDLE_MS": "500",
    "FLASHSALE_CONSUMER_LEASE_MS": "2000",
    "FLASHSALE_RETENTION_INTERVAL_MS": "0",
    "FLASHSALE_LOG_JSON": "true",
    # One process per `consume`, whose consumer name is host-pid of that process
    # (tests/test_consumer_workers.py runs several).
    "FLASHSALE_CONSUMER_WORKERS": "1",
}


# `serve` and `consume` refuse to start on the public default secrets.
SECRETS = {
    "FLASHSALE_ADMIN_TOKEN": ADMIN_TOKEN,
    "FLASHSALE_JWT_SECRET": JWT_SECRET,
}


def env_for(redis_url: str, database_url: str, partitions: int = 4, **extra: str) -> dict[str, str]:
    """The environment of a ``flashsale`` process: this one's, minus any FLASHSALE_*, plus
    the tests' secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(
        FLASHSALE_REDIS_URL=redis_url,
        FLASHSALE_DATABASE_URL=database_url,
        FLASHSALE_PARTITIONS=str(partitions),
        **SECRETS,
        **FAST,
    )
    env.update(extra)
    return env


def env_of(settings: Settings, **extra: str) -> dict[str, str]:
    """``env_for`` the servers and partitions of ``settings``."""
    return env_for(
        settings.redis_url or "", settings.database_url or "", settings.partitions, **extra
    )


def start(command: Iterable[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``flashsale <command>`` with its output appended to ``log_path``."""
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [str(FLASHSALE), *command], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def consumer_name(proc: subprocess.Popen[bytes]) -> str:
    """The consumer name a ``flashsale consume`` process uses in its group."""
    return f"{socket.gethostname()}-{proc.pid}"


async def cancelled_for_good(task: asyncio.Task[Any], within: float = 30.0) -> None:
    """Cancel ``task`` again and again until it has ended, as a process killed outright
    would; fail after ``within`` seconds.

    One cancellation can be lost inside the Redis client: seen here on Python 3.11 with
    redis-py 8.1, a projector cancelled mid-read stayed "cancelling" and went on waiting for
    a reply that never came. Each new cancellation lands wherever the task waits next."""
    deadline = time.monotonic() + within
    while not task.done():
        assert time.monotonic() < deadline, f"{task!r} survived its cancellation"
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


async def eventually(
    check: Callable[[], Awaitable[bool]],
    within: float,
    what: str,
    alive: Callable[[], None] | None = None,
) -> None:
    """Poll ``check`` until true; fail with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if alive is not None:
            alive()
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def running(*daemons: tuple[subprocess.Popen[bytes], Path]) -> Callable[[], None]:
    """A check that fails with the daemon's log tail once any of them has exited."""

    def check() -> None:
        for proc, log_path in daemons:
            assert proc.poll() is None, log_path.read_text()[-3000:]

    return check


async def wait_exit(proc: subprocess.Popen[bytes], within: float) -> int:
    """The exit code, waiting at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while (rc := proc.poll()) is None:
        assert time.monotonic() < deadline, f"pid {proc.pid} did not exit"
        await asyncio.sleep(0.05)
    return rc


async def kill_frozen_when(
    proc: subprocess.Popen[bytes],
    log_path: Path,
    moment: Callable[[], Awaitable[bool]],
    what: str,
    within: float = 30,
) -> None:
    """Freeze ``proc`` (SIGSTOP) again and again until ``moment()`` holds while it is frozen,
    then kill it there outright; fail with ``what`` after ``within`` seconds."""
    alive = running((proc, log_path))
    deadline = time.monotonic() + within
    while True:
        await asyncio.sleep(0.01)
        assert time.monotonic() < deadline, what
        alive()
        proc.send_signal(signal.SIGSTOP)
        if await moment():
            proc.kill()
            return
        proc.send_signal(signal.SIGCONT)


def logged(log_path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log records of ``event`` a daemon wrote so far."""
    records: list[dict[str, Any]] = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            records.append(record)
    return records


async def wait_started(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Until the consume daemon's projector and expiry worker both run."""

    async def started() -> bool:
        return all(logged(log_path, e) for e in ("projector_started", "expiry_worker_started"))

    await eventually(started, 30, "consume daemon did not start", running((proc, log_path)))


async def start_consumers(env: dict[str, str], *logs: Path) -> list[subprocess.Popen[bytes]]:
    """One ``flashsale consume`` per log path, each started; all killed if one does not start."""
    procs = [start(["consume"], env, log_path) for log_path in logs]
    try:
        for proc, log_path in zip(procs, logs, strict=True):
            await wait_started(proc, log_path)
    except BaseException:
        stop_all(*procs)
        raise
    return procs


def stop_all(*procs: subprocess.Popen[bytes] | None) -> None:
    """Kill whatever is still running (test clean-up)."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def is_gone(pid: int) -> bool:
    """A process is gone once it no longer exists or is a zombie waiting for its reaper."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def gone_within(pid: int, timeout: float = 10.0) -> bool:
    """Whether process ``pid`` is gone (see :func:`is_gone`) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not is_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_servers_die_with_their_parent(setup: str, count: int) -> None:
    """Run ``setup`` in a child Python process (it leaves ``count`` started embedded servers
    in a list named ``servers``), kill the child outright and check that every server dies
    with it. Whatever outlives a failed check is killed and its data removed."""
    script = setup + textwrap.dedent(
        """
        import time
        print("SERVERS", *(f"{s.pid}:{s.data_dir}" for s in servers), flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    pids: list[int] = []
    dirs: list[Path] = []
    try:
        for line in child.stdout:
            if line.startswith("SERVERS "):
                for field in line.split()[1:]:
                    number, _, data_dir = field.partition(":")
                    pids.append(int(number))
                    dirs.append(Path(data_dir))
                break
        assert len(pids) == count, f"the child reported {len(pids)} servers, not {count}"

        child.send_signal(signal.SIGKILL)
        child.wait()
        for pid in pids:
            assert gone_within(pid), f"server {pid} outlived its parent"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        for pid in pids:
            if not is_gone(pid):
                os.kill(pid, signal.SIGKILL)
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)


async def wait_gone(pids: Iterable[int], within: float, what: str) -> None:
    """Until every process of ``pids`` is gone; fail with ``what`` after ``within`` seconds."""

    async def gone() -> bool:
        return all(is_gone(pid) for pid in pids)

    await eventually(gone, within, what)


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            children.extend(int(c) for c in task.read_text().split())
    return [c for c in children if not is_gone(c)]


def kill_all(pids: Iterable[int]) -> None:
    """SIGKILL whichever of ``pids`` still runs (test clean-up)."""
    for pid in pids:
        if not is_gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def terminate(proc: subprocess.Popen[bytes], within: float = 15) -> int:
    """SIGTERM and the exit code."""
    proc.send_signal(signal.SIGTERM)
    return await wait_exit(proc, within)


async def cli(env: dict[str, str], *args: str, within: float = 60) -> tuple[int, str]:
    """Run ``flashsale <args>``; return its exit code and stdout (stderr appended)."""
    proc = await asyncio.create_subprocess_exec(
        str(FLASHSALE),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def cli_json(env: dict[str, str], *args: str) -> Any:
    """Run ``flashsale <args> --json`` and parse its stdout."""
    proc = await asyncio.create_subprocess_exec(
        str(FLASHSALE),
        *args,
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode in (0, 1), err.decode()
    return json.loads(out)


async def group_pending(client: RedisClient, partitions: int, consumer: str | None = None) -> int:
    """Entries pending in the projector group (of one consumer, if named), every stream."""
    total = 0
    for p in range(partitions):
        stream = PartitionKeys(p, partitions).events
        try:
            if consumer is None:
                total += (await client.xpending(stream, CONSUMER_GROUP))["pending"]
            else:
                rows = await client.xpending_range(
                    stream, CONSUMER_GROUP, "-", "+", 100_000, consumername=consumer
                )
                total += len(rows)
        except ResponseError:  # no stream or group yet
            continue
    return total


async def stream_length(client: RedisClient, partitions: int) -> int:
    """Entries in every partition stream."""
    return sum(
        [int(await client.xlen(PartitionKeys(p, partitions).events)) for p in range(partitions)]
    )


async def table_count(pool: asyncpg.Pool, table: str) -> int:
    """Rows in ``table``."""
    async with pool.acquire() as conn:
        value: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
    return value


async def order_ids(pool: asyncpg.Pool) -> set[str]:
    """Every reservation id in ``orders``."""
    async with pool.acquire() as conn:
        return {r["reservation_id"] for r in await conn.fetch("SELECT reservation_id FROM orders")}


async def caught_up(client: RedisClient, pool: asyncpg.Pool, partitions: int) -> bool:
    """Every logged event archived and nothing pending in the projector group."""
    return await table_count(pool, "events") == await stream_length(
        client, partitions
    ) and not await group_pending(client, partitions)


def sale_in_partition(partition: int, partitions: int = 4, prefix: str = "sale") -> str:
    """A sale id that lives in ``partition``."""
    k = 0
    while partition_of(f"{prefix}-{k}", partitions) != partition:
        k += 1
    return f"{prefix}-{k}"


async def entry_ids(client: RedisClient, stream: str) -> list[str]:
    """The ids of every entry in ``stream``, oldest first."""
    entries = await client.xrange(stream) or []
    return [text(entry_id) for entry_id, _ in entries if entry_id is not None]


async def newest_id(client: RedisClient, stream: str) -> str:
    """The id of the newest entry in ``stream``."""
    entries = await client.xrevrange(stream, count=1) or []
    assert entries and entries[0][0] is not None, f"{stream} is empty"
    return text(entries[0][0])
