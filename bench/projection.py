"""The projection figures (events/s into PostgreSQL, 202-to-PostgreSQL lag), taken from
``bench.bench_projection`` when this checkout has it; "not available" otherwise.

That module is run as its own command (it flushes the Redis database and empties the
projection tables it is given: run it after the HTTP measurements) and its printed
figures are read back.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["ProjectionFigures", "projection_figures"]

NOT_AVAILABLE = "not available"
_RATE = re.compile(r"([\d,]+) events/s")
_LAG = re.compile(r"p50 ([\d.]+) ms, p99 ([\d.]+) ms")


@dataclass(frozen=True)
class ProjectionFigures:
    """The two figures as table cells, and the commands that measured them."""

    events_per_second: str = NOT_AVAILABLE
    lag: str = NOT_AVAILABLE
    commands: tuple[str, ...] = ()


def _run(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_projection", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout


def projection_figures(env: dict[str, str], quick: bool) -> ProjectionFigures:
    """Run the projection benchmark's two modes (short ones when ``quick``)."""
    if importlib.util.find_spec("bench.bench_projection") is None:
        return ProjectionFigures()
    throughput = ["throughput", "--placements", "5000" if quick else "100000"]
    latency = ["latency", "--rate", *(("500", "--seconds", "1") if quick else ("5000",))]
    try:
        rate = _RATE.search(_run(throughput, env))
        lag = _LAG.search(_run(latency, env))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        return ProjectionFigures(f"ERROR: {last}", "ERROR", ())
    commands = tuple(
        f"python -m bench.bench_projection {' '.join(a)}" for a in (throughput, latency)
    )
    return ProjectionFigures(
        f"{rate.group(1)} events/s" if rate else f"{NOT_AVAILABLE} (output not understood)",
        f"p50 {lag.group(1)} ms, p99 {lag.group(2)} ms"
        if lag
        else f"{NOT_AVAILABLE} (output not understood)",
        commands,
    )
