"""What every worker process of the ``flashsale`` commands does alike, on the child's side:
read its config on stdin, log as configured, tell the parent once it is ready, run until a
stop, and exit 0 after a requested stop or 2 on an error (the parent's side is
:mod:`api.cli.workers`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import asyncpg
from redis.exceptions import RedisError

from api.cli.processes import run_async
from api.cli.workers import ChildConfig
from core.errors import FlashsaleError
from core.logs import configure_logging

C = TypeVar("C", bound=ChildConfig)


def tell_parent(line: bytes) -> None:
    """Tell the parent this worker is ready, then point stdout at stderr: the parent reads
    nothing more, and a later write must not wait on a pipe nobody drains."""
    sys.stdout.buffer.write(line)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def worker_main(
    config_type: type[C], run: Callable[[C], Coroutine[Any, Any, None]], role: str
) -> int:
    """Run ``run`` with the ``config_type`` read on stdin; 0 after a requested stop, 2 (with
    one line naming ``role`` and the pid) on an error."""
    config = config_type.model_validate_json(sys.stdin.buffer.read())
    configure_logging(config.settings.log_level, config.settings.log_json)
    try:
        run_async(run(config))
    except (FlashsaleError, RedisError, OSError, asyncpg.PostgresError) as e:
        print(f"error: {role} {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0
