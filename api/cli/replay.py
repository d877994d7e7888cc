"""Replay commands of the ``flashsale`` command line: ``replay verify|repair|rebuild``, and
the progress line a long rebuild draws on stderr.

``verify`` and ``repair`` exit 0 when clean and 1 on drift; any of them exits 2 when it
could not run.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from api.cli.processes import open_services, resolved, run_async
from core.settings import Settings
from projections.rebuild import rebuild
from projections.repair import repair_redis
from projections.verify import verify


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``replay verify|rebuild|repair`` to the ``flashsale`` subcommands."""
    replay = sub.add_parser("replay", help="fold the log and compare with Redis and PostgreSQL")
    replay_sub = replay.add_subparsers(dest="replay_command", required=True)
    v = replay_sub.add_parser("verify", help="exit 0 when clean, 1 on drift, 2 if it cannot run")
    v.add_argument("--sale", default=None, help="only this sale")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    rb = replay_sub.add_parser(
        "rebuild", help="rebuild the PostgreSQL projections from the log and swap them in"
    )
    rb.add_argument("--json", action="store_true", help="machine-readable output")
    rp = replay_sub.add_parser(
        "repair", help="rewrite drifted sales in Redis from the log (exit 0 once it agrees)"
    )
    rp.add_argument("--redis", action="store_true", required=True, help="repair Redis")
    rp.add_argument("--sale", default=None, help="only this sale")
    rp.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
    rp.add_argument("--json", action="store_true", help="machine-readable output")


class ProgressLine:
    """Progress of a long replay command on stderr: phase, count done (of the total when
    known), rate and time left. On a terminal the line is redrawn in place every half
    second; elsewhere (a log file, CI) a plain line is written every 5 s. Each phase ends
    with a line of its final count, and ``close`` ends the last one: call it before
    printing anything else, so that nothing, an error least of all, hides behind it."""

    def __init__(self, stream: TextIO, interval: float = 0.5) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = interval if self.tty else 5.0
        self.phase = ""
        self.started = self.last = 0.0
        self.done: int = 0
        self.total: int | None = None
        self.written: tuple[str, int, int | None] = ("", 0, None)

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if phase != self.phase:
            self.close()
            self.phase, self.started, self.last = phase, now, now
        self.done, self.total = done, total
        if now - self.last >= self.interval:
            self.last = now
            self._draw(now, final=False)

    def _draw(self, now: float, final: bool) -> None:
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0.05 and self.done >= 1000 else 0.0
        text = f"{self.phase}: {self.done:,}" + (f"/{self.total:,}" if self.total else "")
        if rate:
            text += f"  {rate:,.0f}/s"
        if rate and not final and self.total and self.total > self.done:
            text += f"  {(self.total - self.done) / rate:,.0f} s left"
        if self.tty:
            self.stream.write(f"\r\x1b[K{text}" + ("\n" if final else ""))
        elif (self.phase, self.done, self.total) != self.written:
            self.stream.write(text + "\n")
        self.written = (self.phase, self.done, self.total)
        self.stream.flush()

    def close(self) -> None:
        """Write the current phase's final line (idempotent)."""
        if self.phase:
            self._draw(time.monotonic(), final=True)
            self.phase = ""


async def _verify(settings: Settings, sale_id: str | None, as_json: bool) -> int:
    async with open_services(settings) as services:
        report = await verify(services.gateway, services.pool, sale_id)
    print(report.to_json() if as_json else report.to_table())
    return 0 if report.clean else 1


async def _rebuild(settings: Settings, as_json: bool) -> int:
    async with open_services(settings) as services:
        progress = ProgressLine(sys.stderr)
        try:
            report = await rebuild(services.gateway, services.pool, progress=progress)
        finally:
            progress.close()  # so that an error is printed on a line of its own
    print(report.to_json() if as_json else report.summary())
    return 0


async def _repair(settings: Settings, sale_id: str | None, dry_run: bool, as_json: bool) -> int:
    async with open_services(settings) as services:
        report = await repair_redis(services.gateway, services.pool, sale_id, dry_run=dry_run)
    print(report.to_json() if as_json else report.to_table())
    return 0 if report.clean else 1


def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    """Run a replay subcommand: exit 0 clean, 1 drift, 2 could not run.

    Any failure, expected or not, exits 2 with one line on stderr: a crash must never
    look like drift (1) to a script.
    """
    try:
        with resolved(settings, embedded=False) as s:
            if args.replay_command == "rebuild":
                return run_async(_rebuild(s, args.json))
            if args.replay_command == "repair":
                return run_async(_repair(s, args.sale, args.dry_run, args.json))
            return run_async(_verify(s, args.sale, args.json))
    except Exception as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        message = f"error: {type(e).__name__}: {detail}"
        red = sys.stderr.isatty()
        print(f"\x1b[1;31m{message}\x1b[0m" if red else message, file=sys.stderr)
        return 2
