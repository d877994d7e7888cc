"""One API worker process of ``flashsale serve --workers N`` (see :mod:`api.cli.workers`).

Run as ``python -m api.cli.worker`` by the parent: reads its :class:`WorkerConfig` on stdin,
serves the API on the shared port (SO_REUSEPORT) with its own Redis client and PostgreSQL
pool and metrics summed over the workers, writes :data:`READY_LINE` on stdout once it
listens, and stops on SIGTERM. Its logs go to stderr, which it shares with the parent.
"""

from __future__ import annotations

import sys

from api.cli.processes import open_services, running_api, stop_on_signals
from api.cli.worker_process import tell_parent, worker_main
from api.cli.workers import READY_LINE, WorkerConfig
from api.web.metrics import ApiMetrics


async def serve_worker(config: WorkerConfig) -> None:
    """The API on ``config.settings.port`` until SIGTERM or SIGINT."""
    stop = stop_on_signals()  # first: a stop asked for while starting is not lost
    settings = config.settings
    metrics = ApiMetrics(multiprocess_dir=config.metrics_dir)
    async with (
        open_services(settings) as services,
        running_api(services, settings.port, metrics=metrics, reuse_port=True),
    ):
        tell_parent(READY_LINE)
        await stop.wait()


def main() -> int:
    """Entry point of a worker process; exit 0 after a requested stop, 2 on an error."""
    return worker_main(WorkerConfig, serve_worker, "API worker")


if __name__ == "__main__":
    sys.exit(main())
