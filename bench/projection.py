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
_RATE = re.compile(r"with (\d+) consumer process\(es\).*?([\d,]+) events/s")
_LAG = re.compile(r"p50 ([\d.]+) ms, p99 ([\d.]+) ms")
_COPY = re.compile(r"([\d,]+) rows/s")
BASELINE = "asyncpg COPY of archive rows, 1 process"


@dataclass(frozen=True)
class ProjectionFigures:
    """The figures as table cells, and the commands that measured them."""

    events_per_second: str = NOT_AVAILABLE
    lag: str = NOT_AVAILABLE
    commands: tuple[str, ...] = ()
    copy: str = NOT_AVAILABLE  # the bare baseline: rows/s of one COPY

    @property
    def ratio(self) -> str:
        """The default projection's events/s over the COPY's rows/s, or "-"."""
        ours, base = _leading_number(self.events_per_second), _leading_number(self.copy)
        return f"{ours / base:.2f}x" if ours and base else "-"


def _leading_number(cell: str) -> float | None:
    """``"25,191 events/s (2 processes)..."`` -> 25191.0; None for an error or no figure."""
    head = cell.split(" ", 1)[0].replace(",", "")
    try:
        return float(head)
    except ValueError:
        return None


def _cell(args: list[str], env: dict[str, str], timeout: float) -> str:
    """Run one mode of the projection benchmark; its figure as a table cell.

    A failure or overrun is an ERROR cell (with the mode's error output copied to ours).
    """
    command = [sys.executable, "-m", "bench.bench_projection", *args]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"ERROR: {args[0]} ran over {timeout:.0f} s"
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        return f"ERROR: {args[0]} exited with {done.returncode}"
    if args[0] == "throughput" and (rate := _RATE.search(done.stdout)):
        processes = int(rate.group(1))
        return f"{rate.group(2)} events/s ({processes} process{'es' if processes > 1 else ''})"
    if args[0] == "latency" and (lag := _LAG.search(done.stdout)):
        return f"p50 {lag.group(1)} ms, p99 {lag.group(2)} ms"
    if args[0] == "copy" and (copied := _COPY.search(done.stdout)):
        return copied.group(1)
    return f"{NOT_AVAILABLE} (output not understood)"


def projection_figures(env: dict[str, str], quick: bool) -> ProjectionFigures:
    """Run the projection benchmark's modes (short ones when ``quick``): throughput with
    as many projector processes as ``flashsale consume`` runs by default, and (unless
    ``quick``) with one;
    its bare baseline (one COPY of as many rows); the lag with the default."""
    if importlib.util.find_spec("bench.bench_projection") is None:
        return ProjectionFigures()
    throughput = ["throughput", "--placements", "5000" if quick else "100000"]
    single = [*throughput, "--consumers", "1"]
    copy = ["copy", *throughput[1:]]
    latency = ["latency", "--rate", *(("500", "--seconds", "1") if quick else ("5000",))]
    timeout = 120.0 if quick else 600.0
    rate = _cell(throughput, env, timeout)
    if "(1 process)" not in rate and not quick:
        rate += f"; one process: {_cell(single, env, timeout).removesuffix(' (1 process)')}"
    runs = (throughput, copy, latency) if quick else (throughput, single, copy, latency)
    return ProjectionFigures(
        rate,
        _cell(latency, env, timeout),
        tuple(f"python -m bench.bench_projection {' '.join(a)}" for a in runs),
        _cell(copy, env, timeout),
    )
