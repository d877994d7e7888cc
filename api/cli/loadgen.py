"""A load generator run in its own process, so buyers and the API do not share one core.

Reads ``{"url": ..., "attempts": [[token, idempotency_key], ...], "connections": n}`` as
JSON on stdin, fires every attempt at once, and writes ``{"seconds": wall time from the
first request sent to the last answer received, "results": [[status, code, seconds,
reservation_id], ...]}`` (results in the order given) as JSON on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp


async def attempt(
    session: aiohttp.ClientSession, url: str, token: str, key: str | None
) -> tuple[int, str, float, str]:
    """POST one reservation; return (status, outcome code, seconds, reservation id or "")."""
    headers = {"Authorization": f"Bearer {token}"}
    if key:
        headers["Idempotency-Key"] = key
    started = time.perf_counter()
    try:
        async with session.post(url, json={"qty": 1}, headers=headers) as response:
            body: dict[str, Any] = await response.json(content_type=None)
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return 0, f"client_error:{type(e).__name__}", time.perf_counter() - started, ""
    code = "placed" if status == 202 else str(body.get("code", status))
    return status, code, time.perf_counter() - started, str(body.get("reservation_id", ""))


async def fire(
    url: str, attempts: list[list[str]], connections: int
) -> tuple[list[tuple[int, str, float, str]], float]:
    """Fire every attempt concurrently over at most ``connections`` connections; the
    results and the seconds from the first request sent to the last answer received (the
    session's set-up and tear-down left out)."""
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(attempt(session, url, t, k) for t, k in attempts))
        return results, time.perf_counter() - started


def main() -> None:
    """Entry point: ``python -m api.cli.loadgen < plan.json > results.json``."""
    plan = json.load(sys.stdin)
    results, seconds = asyncio.run(
        fire(plan["url"], plan["attempts"], int(plan.get("connections", 256)))
    )
    json.dump({"seconds": seconds, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
