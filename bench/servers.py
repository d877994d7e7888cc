"""The processes under test: ``flashsale serve`` as an operator runs it, and the bare
baselines (``bench.baselines``) with as many processes; plus the sales and buyer tokens
the runs use, made through the service's own admin API and signing secret."""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from api.cli.launcher import death_signal_setter
from api.web.auth import issue_token
from core.models import MAX_STOCK

__all__ = [
    "Secrets",
    "baselines",
    "flashsale_command",
    "free_port",
    "post_json",
    "service",
    "write_tokens",
]

_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Secrets:
    """The admin token and JWT secret of one benchmark run (random, never the defaults)."""

    admin_token: str
    jwt_secret: str

    @classmethod
    def random(cls) -> Secrets:
        return cls(secrets.token_urlsafe(24), secrets.token_urlsafe(32))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing was listening on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def flashsale_command() -> list[str]:
    """The ``flashsale`` console script of this environment."""
    beside = Path(sys.executable).parent / "flashsale"
    found = str(beside) if beside.exists() else shutil.which("flashsale")
    if found is None:
        raise RuntimeError("no `flashsale` command: pip install -e . first")
    return [found]


@functools.cache
def serve_takes_workers() -> bool:
    """Whether this version of ``flashsale serve`` has ``--workers``."""
    done = subprocess.run(
        [*flashsale_command(), "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    return "--workers" in done.stdout


def post_json(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST ``body`` as JSON; the status and the answer's bytes (4xx/5xx included)."""
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **headers}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def create_sale(base: str, admin_token: str, sale_id: str, stock: int) -> None:
    """Open a sale through the admin API, with no per-buyer limit in the way."""
    body = f'{{"sale_id": "{sale_id}", "stock": {stock}, "per_user_limit": {MAX_STOCK}}}'
    status, answer = post_json(
        f"{base}/v1/sales", body.encode(), {"Authorization": f"Bearer {admin_token}"}
    )
    if status != 201:
        raise RuntimeError(f"could not create sale {sale_id}: {status} {answer[:300]!r}")


def write_tokens(path: Path, jwt_secret: str, buyers: int) -> None:
    """``buyers`` JWTs of distinct buyers, one a line, valid for two hours."""
    path.write_text("".join(f"{issue_token(jwt_secret, f'b{n}', 7200)}\n" for n in range(buyers)))


def _wait_until_answering(url: str, answers: int, processes: list[subprocess.Popen[bytes]]) -> None:
    """Wait until ``url`` has answered 200 with ``answers`` different bodies (a baseline
    process names its pid: every one of them is listening)."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    seen: set[bytes] = set()
    while True:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError(f"a server process ended at start (serving {url})")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    seen.add(response.read())
        except (OSError, urllib.error.URLError):
            pass
        if len(seen) >= answers:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answered {url} within {_START_TIMEOUT_S:.0f} s")
        time.sleep(0.02)


@contextlib.contextmanager
def _processes(
    commands: list[list[str]], env: dict[str, str], ready: tuple[str, int], log: IO[bytes]
) -> Iterator[None]:
    """Start ``commands``, wait until the ready URL gave as many different 200 answers as
    asked, SIGTERM them on exit."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for command in commands:
            started.append(
                subprocess.Popen(
                    command,
                    env=env,
                    stdout=log,
                    stderr=log,
                    preexec_fn=death_signal_setter(),
                )
            )
        _wait_until_answering(*ready, started)
        yield
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _env(redis_url: str, database_url: str, keys: Secrets, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "FLASHSALE_REDIS_URL": redis_url,
        "FLASHSALE_DATABASE_URL": database_url,
        "FLASHSALE_ADMIN_TOKEN": keys.admin_token,
        "FLASHSALE_JWT_SECRET": keys.jwt_secret,
        "FLASHSALE_PORT": str(port),
        "FLASHSALE_LOG_LEVEL": os.environ.get("FLASHSALE_LOG_LEVEL", "warning"),
    }


@contextlib.contextmanager
def service(
    redis_url: str, database_url: str, keys: Secrets, workers: int, log: IO[bytes]
) -> Iterator[str]:
    """``flashsale serve`` in ``workers`` processes until the block exits; yields its base
    URL. ``--workers`` is passed whenever serve has it, 1 included (its default is one per
    CPU); a serve without it runs one process."""
    port = free_port()
    command = [*flashsale_command(), "serve"]
    if serve_takes_workers():
        command += ["--workers", str(workers)]
    elif workers > 1:
        raise RuntimeError("this flashsale serve has no --workers")
    base = f"http://127.0.0.1:{port}"
    env = _env(redis_url, database_url, keys, port)
    with _processes([command], env, (f"{base}/readyz", 1), log):
        yield base


@contextlib.contextmanager
def baselines(
    app: str, redis_url: str, keys: Secrets, processes: int, sale_id: str, log: IO[bytes]
) -> Iterator[str]:
    """``processes`` processes of baseline ``app`` on one port until the block exits;
    yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "bench.baselines", app, "--port", str(port), "--sale", sale_id]
    base = f"http://127.0.0.1:{port}"
    env = _env(redis_url, "", keys, port)  # evalsha reads the Redis URL; no database
    with _processes([command] * processes, env, (f"{base}/ready", processes), log):
        yield base
