"""One consumer process of ``flashsale consume --workers N`` (see
:func:`api.cli.workers.consumer_workers`).

Run as ``python -m api.cli.consumer_worker`` by the parent: reads its
:class:`ConsumerWorkerConfig` on stdin, runs a projector (and, in the process given the
upkeep, the expiry worker, the stream trimmer and the pruner) with its own Redis client and
PostgreSQL pool, writes :data:`CONSUMING_LINE` on stdout once connected, and stops on
SIGTERM as ``flashsale consume`` does: it finishes or releases the batch in hand. Its logs
go to stderr, which it shares with the parent.
"""

from __future__ import annotations

import os
import sys

import asyncpg
from redis.exceptions import RedisError

from api.cli.processes import open_services, run_async, run_consumers, stop_on_signals
from api.cli.workers import CONSUMING_LINE, ConsumerWorkerConfig
from core.errors import FlashsaleError
from core.logs import configure_logging


def _say_consuming() -> None:
    """Tell the parent this worker runs, then point stdout at stderr: the parent reads
    nothing more, and a later write must not wait on a pipe nobody drains."""
    sys.stdout.buffer.write(CONSUMING_LINE)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


async def consume_worker(config: ConsumerWorkerConfig) -> None:
    """The consumers of ``config`` until SIGTERM or SIGINT."""
    stop = stop_on_signals()  # first: a stop asked for while starting is not lost
    async with open_services(config.settings) as services:
        _say_consuming()
        await run_consumers(services, stop, retention=config.upkeep, expiry=config.upkeep)


def main() -> int:
    """Entry point of a consumer process; exit 0 after a requested stop, 2 on an error."""
    config = ConsumerWorkerConfig.model_validate_json(sys.stdin.buffer.read())
    configure_logging(config.settings.log_level, config.settings.log_json)
    try:
        run_async(consume_worker(config))
    except (FlashsaleError, RedisError, OSError, asyncpg.PostgresError) as e:
        print(f"error: consumer worker {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
