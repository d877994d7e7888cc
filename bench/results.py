"""What one load run measured, the median over rounds, and the table the suite prints."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["LoadResult", "Measured", "Table", "percentile"]


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted ``ordered``, nearest rank; 0 when empty."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class LoadResult:
    """One load run: answers by HTTP status (0 for a socket error or timeout), latencies."""

    seconds: float
    statuses: dict[int, int]
    p50_ms: float
    p99_ms: float

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def rate(self) -> float:
        """Answers per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    def problem(self, expected: int) -> str | None:
        """Why this run's speed means nothing (an answer other than ``expected``, or no
        answer at all), or None."""
        wrong = {s: n for s, n in sorted(self.statuses.items()) if s != expected}
        if not self.requests:
            return "no answers"
        if wrong:
            said = ", ".join(f"{n} x {s or 'socket error'}" for s, n in wrong.items())
            return f"expected {expected}, got {said}"
        return None


@dataclass
class Measured:
    """The rounds of one side (baseline or flashsale) of one table row."""

    expected: int
    runs: list[LoadResult] = field(default_factory=list)

    @property
    def problem(self) -> str | None:
        """The first round's problem, if any round had one."""
        return next((p for r in self.runs if (p := r.problem(self.expected))), None)

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs) if self.runs else 0.0

    def latency(self) -> str:
        if not self.runs:
            return "-"
        p50 = statistics.median(r.p50_ms for r in self.runs)
        p99 = statistics.median(r.p99_ms for r in self.runs)
        return f"{p50:.1f} / {p99:.1f}"

    def cell(self) -> str:
        """The req/s cell: the median rate, or ERROR with the reason."""
        if not self.runs:
            return "not run"
        problem = self.problem
        return f"ERROR: {problem}" if problem else f"{self.rate:,.0f}"


@dataclass
class Table:
    """The suite's table: one row per endpoint and process count, then the projection."""

    header = (
        "endpoint",
        "processes",
        "baseline",
        "baseline req/s",
        "flashsale req/s",
        "ratio",
        "baseline p50 / p99 ms",
        "flashsale p50 / p99 ms",
    )
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self, endpoint: str, processes: int, label: str, base: Measured, ours: Measured
    ) -> None:
        """A row comparing flashsale with its baseline; no ratio when either side failed."""
        failed = base.problem or ours.problem or not base.runs or not ours.runs or not base.rate
        ratio = "-" if failed else f"{ours.rate / base.rate:.2f}x"
        self.rows.append(
            (
                endpoint,
                str(processes),
                label,
                base.cell(),
                ours.cell(),
                ratio,
                base.latency(),
                ours.latency(),
            )
        )

    def add_figure(
        self, endpoint: str, value: str, baseline: tuple[str, str, str] = ("", "", "")
    ) -> None:
        """A row with one figure of flashsale's own, and its baseline when it has one
        (the baseline's name, its figure and the ratio)."""
        label, figure, ratio = baseline
        self.rows.append((endpoint, "", label, figure, value, ratio, "", ""))

    @property
    def failed(self) -> bool:
        """True when a row reports an error instead of a speed."""
        return any("ERROR" in cell for row in self.rows for cell in row)

    def render(self, markdown: bool = False) -> str:
        """The table as aligned text, or as a Markdown table; the notes below it."""
        if markdown:
            lines = [
                "| " + " | ".join(self.header) + " |",
                "|" + "|".join("---" for _ in self.header) + "|",
                *("| " + " | ".join(row) + " |" for row in self.rows),
            ]
        else:
            widths = [max(len(r[i]) for r in (self.header, *self.rows)) for i in range(8)]
            lines = [
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                for row in (self.header, *self.rows)
            ]
        return "\n".join([*lines, "", *self.notes])
