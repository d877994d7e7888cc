"""One API worker process of ``flashsale serve --workers N`` (see :mod:`api.cli.workers`).

Run as ``python -m api.cli.worker`` by the parent: reads its :class:`WorkerConfig` on stdin,
serves the API on the shared port (SO_REUSEPORT) with its own Redis client and PostgreSQL
pool and metrics summed over the workers, writes :data:`READY_LINE` on stdout once it
listens, and stops on SIGTERM. Its logs go to stderr, which it shares with the parent.
"""

from __future__ import annotations

import os
import sys

import asyncpg
from redis.exceptions import RedisError

from api.cli.processes import open_services, run_async, running_api, stop_on_signals
from api.cli.workers import READY_LINE, WorkerConfig
from api.web.metrics import ApiMetrics
from core.errors import FlashsaleError
from core.logs import configure_logging


def _say_listening() -> None:
    """Tell the parent this worker listens, then point stdout at stderr: the parent reads
    nothing more, and a later write must not wait on a pipe nobody drains."""
    sys.stdout.buffer.write(READY_LINE)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


async def serve_worker(config: WorkerConfig) -> None:
    """The API on ``config.settings.port`` until SIGTERM or SIGINT."""
    stop = stop_on_signals()  # first: a stop asked for while starting is not lost
    settings = config.settings
    metrics = ApiMetrics(multiprocess_dir=config.metrics_dir)
    async with (
        open_services(settings) as services,
        running_api(services, settings.port, metrics=metrics, reuse_port=True),
    ):
        _say_listening()
        await stop.wait()


def main() -> int:
    """Entry point of a worker process; exit 0 after a requested stop, 2 on an error."""
    config = WorkerConfig.model_validate_json(sys.stdin.buffer.read())
    configure_logging(config.settings.log_level, config.settings.log_json)
    try:
        run_async(serve_worker(config))
    except (FlashsaleError, RedisError, OSError, asyncpg.PostgresError) as e:
        print(f"error: API worker {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
