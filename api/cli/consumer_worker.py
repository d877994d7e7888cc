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

import sys

from api.cli.processes import open_services, run_consumers, stop_on_signals
from api.cli.worker_process import tell_parent, worker_main
from api.cli.workers import CONSUMING_LINE, ConsumerWorkerConfig


async def consume_worker(config: ConsumerWorkerConfig) -> None:
    """The consumers of ``config`` until SIGTERM or SIGINT."""
    stop = stop_on_signals()  # first: a stop asked for while starting is not lost
    async with open_services(config.settings) as services:
        tell_parent(CONSUMING_LINE)
        await run_consumers(services, stop, retention=config.upkeep, expiry=config.upkeep)


def main() -> int:
    """Entry point of a consumer process; exit 0 after a requested stop, 2 on an error."""
    return worker_main(ConsumerWorkerConfig, consume_worker, "consumer worker")


if __name__ == "__main__":
    sys.exit(main())
