"""Drive a server with wrk (the Debian package), through ``bench/requests.lua``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from bench.results import LoadResult

__all__ = ["WRK", "run_wrk"]

WRK = shutil.which("wrk")
SCRIPT = Path(__file__).with_name("requests.lua")
_MARK = "BENCH_JSON "
# wrk's default of 2 s counts slow answers of a busy 2-core box as timeouts; an answer
# slower than this is counted as an error (as by the own load generator).
_TIMEOUT_S = 10


def run_wrk(
    url: str,
    method: str,
    body: str | None,
    tokens: Path | None,
    threads: int,
    connections: int,
    seconds: float,
) -> LoadResult:
    """``wrk -t threads -c connections -d seconds --latency --timeout 10s`` at ``url``;
    every answer counted by status (the script's ``response()``), socket errors and
    timeouts as status 0."""
    assert WRK, "wrk is not installed"
    command = [
        WRK,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        f"--timeout={_TIMEOUT_S}s",
        "-s",
        str(SCRIPT),
        url,
        "--",
        method,
        body or "-",
        str(tokens) if tokens else "-",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((s for s in done.stdout.splitlines() if s.startswith(_MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    summary = json.loads(line.removeprefix(_MARK))
    statuses: dict[int, int] = {}
    for per_thread in summary["statuses"]:
        for status, n in per_thread.items():
            statuses[int(status)] = statuses.get(int(status), 0) + n
    if summary["socket_errors"]:
        statuses[0] = summary["socket_errors"]
    return LoadResult(
        seconds=summary["duration_us"] / 1e6,
        statuses=statuses,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
    )
