"""The loop every periodic worker runs: a round every interval until told to stop.

A round that fails on something passing (``retry``: Redis or PostgreSQL away for a while)
is logged as ``<name>_retry`` and the next round tries again. Whether any other error is
survived too (logged as ``<name>_error``) is the worker's choice: housekeeping that can
always wait for the next round must never take the daemon down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)


async def run_periodically(
    name: str,
    work: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    interval: float,
    *,
    retry: Callable[[Exception], bool],
    survive_errors: bool = True,
    first_at_once: bool = False,
) -> None:
    """Await ``work()`` every ``interval`` seconds until ``stop`` is set.

    ``first_at_once``: the first round runs at once rather than one interval in. An error
    for which ``retry`` is true is logged and retried next round; another one is logged
    and survived when ``survive_errors``, else raised.
    """
    if not first_at_once:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    while not stop.is_set():
        try:
            await work()
        except Exception as e:
            if retry(e):
                log.warning(f"{name}_retry", error=str(e), error_type=type(e).__name__)
            elif survive_errors:
                log.exception(f"{name}_error")
            else:
                raise
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
