"""The suite's own load generator (used when wrk is not installed): aiohttp clients in
child processes, each keeping its connections busy for a fixed time.

A child reads ``{"url", "method", "body", "tokens", "first", "connections", "seconds"}``
as JSON on stdin (``tokens``: a file of buyer JWTs or null; ``first``: the line this child
starts at, so children send distinct buyers) and writes ``{"seconds", "statuses",
"latencies_ms"}`` as JSON on stdout.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from api.cli.launcher import death_signal_setter
from api.cli.processes import run_async
from bench.results import LoadResult, percentile

__all__ = ["run_load"]


def run_load(
    url: str,
    method: str,
    body: str | None,
    tokens: Path | None,
    processes: int,
    connections: int,
    seconds: float,
) -> LoadResult:
    """Load ``url`` from ``processes`` children sharing ``connections`` connections for
    ``seconds``; their answers and latencies merged."""
    lines = len(tokens.read_text().splitlines()) if tokens else 0
    children = []
    for n in range(processes):
        plan = {
            "url": url,
            "method": method,
            "body": body,
            "tokens": str(tokens) if tokens else None,
            "first": lines * n // processes,
            "connections": max(1, connections // processes),
            "seconds": seconds,
        }
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.load"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=death_signal_setter(),
        )
        assert child.stdin is not None
        child.stdin.write(json.dumps(plan))
        child.stdin.close()
        children.append(child)
    answers = []
    for child in children:
        assert child.stdout is not None
        out = child.stdout.read()
        if child.wait() != 0:
            raise RuntimeError(f"load generator failed with exit code {child.returncode}")
        answers.append(json.loads(out))
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    for answer in answers:
        statuses.update({int(s): n for s, n in answer["statuses"].items()})
        latencies.extend(answer["latencies_ms"])
    latencies.sort()
    return LoadResult(
        seconds=max(a["seconds"] for a in answers),
        statuses=dict(statuses),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
    )


async def _drive(plan: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    """Keep ``connections`` requests in flight until the time is up, each request carrying
    the next of ``tokens`` ("" for none)."""
    turn = itertools.islice(itertools.cycle(tokens), plan["first"], None)
    body = plan["body"].encode() if plan["body"] else None
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=plan["connections"])
    timeout = aiohttp.ClientTimeout(total=10)

    async def client(session: aiohttp.ClientSession, deadline: float) -> None:
        while (started := time.perf_counter()) < deadline:
            token = next(turn)
            headers = {"Content-Type": "application/json"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            try:
                async with session.request(
                    plan["method"], plan["url"], data=body, headers=headers
                ) as response:
                    await response.read()
                    statuses[response.status] += 1
            except (aiohttp.ClientError, TimeoutError):
                statuses[0] += 1
            latencies.append((time.perf_counter() - started) * 1000)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + plan["seconds"]
        await asyncio.gather(*(client(session, deadline) for _ in range(plan["connections"])))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "statuses": statuses, "latencies_ms": latencies}


def main() -> None:
    """Entry point of a child: plan on stdin, answers on stdout."""
    plan = json.load(sys.stdin)
    tokens = Path(plan["tokens"]).read_text().splitlines() if plan["tokens"] else [""]
    json.dump(run_async(_drive(plan, tokens)), sys.stdout)


if __name__ == "__main__":
    main()
