"""The benchmark suite: flashsale against bare aiohttp baselines, side by side, one table.

Run:  python -m bench [--workers 1 2] [--rounds 3] [--seconds 10] [--markdown]
      python -m bench --quick          (one short round: checks that every part works)

Uses ``FLASHSALE_REDIS_URL`` / ``FLASHSALE_DATABASE_URL`` when set, else starts embedded
servers (``api.cli.launcher``). For each process count it starts ``flashsale serve``
(``--workers N``) and the baselines with N processes each (``bench.baselines``), then,
round after round, drives baseline and flashsale in turn on each endpoint with wrk
(``-t2 -c100``, each reservation carrying a distinct buyer's JWT) or, without wrk, with
the suite's own load generator (``bench.load``). Every answer is counted by status: a run
that got anything but the expected status is reported as an ERROR, not as a speed.
Figures are medians over the rounds. Exit 1 when a row reports an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from api.cli.launcher import embedded_servers
from api.web.auth import issue_token
from bench.load import run_load
from bench.projection import BASELINE as PROJECTION_BASELINE
from bench.projection import projection_figures
from bench.results import LoadResult, Measured, Table
from bench.servers import (
    Secrets,
    baselines,
    create_sale,
    post_json,
    serve_takes_workers,
    service,
    write_tokens,
)
from bench.wrk import WRK, run_wrk
from core.logs import configure_logging
from core.models import MAX_STOCK
from core.settings import Settings

RESERVE_BODY = '{"qty":1}'
# Buyer tokens per second of a run and per process: above what one process answers, so
# that every reservation of a run is a distinct buyer.
TOKENS_PER_SECOND = 25_000


@dataclass
class Case:
    """One table row: an endpoint of flashsale and the baseline it is held against."""

    endpoint: str
    baseline: str
    method: str
    expected: int
    path: Callable[[int], str]  # flashsale's path in a given round (the warm-up: rounds)
    base: Measured = field(init=False)
    ours: Measured = field(init=False)

    def __post_init__(self) -> None:
        self.base = Measured(200)
        self.ours = Measured(self.expected)


@dataclass(frozen=True)
class Load:
    """How every run is driven."""

    use_wrk: bool
    threads: int
    connections: int
    seconds: float

    @property
    def name(self) -> str:
        if self.use_wrk:
            return f"wrk -t{self.threads} -c{self.connections} -d{max(1, round(self.seconds))}s"
        return (
            f"own aiohttp load generator (bench.load): {self.threads} processes,"
            f" {self.connections} connections, {self.seconds:g} s"
        )

    def run(self, url: str, method: str, tokens: Path | None) -> LoadResult:
        body = RESERVE_BODY if method == "POST" else None
        runner = run_wrk if self.use_wrk else run_load
        return runner(url, method, body, tokens, self.threads, self.connections, self.seconds)


def cases_for(base: str, admin_token: str, rounds: int) -> list[Case]:
    """Open the sales the rows use; a fresh one per round for placements, so that no buyer
    of a round already holds stock there."""
    run = uuid.uuid4().hex[:8]
    sold_out = f"bench-{run}-soldout"
    create_sale(base, admin_token, sold_out, 0)
    # One more than rounds: the last one takes the warm-up.
    placing = [f"bench-{run}-stock-{n}" for n in range(rounds + 1)]
    for sale_id in placing:
        create_sale(base, admin_token, sale_id, MAX_STOCK)
    return [
        Case(
            "POST reservation, stock left",
            "aiohttp + json + one EVALSHA",
            "POST",
            202,
            lambda n: f"/v1/sales/{placing[n]}/reservations",
        ),
        Case(
            "POST reservation, sold out",
            "aiohttp hello",
            "POST",
            409,
            lambda n: f"/v1/sales/{sold_out}/reservations",
        ),
        Case("GET /v1/sales/{id}", "aiohttp hello", "GET", 200, lambda n: f"/v1/sales/{sold_out}"),
    ]


def check_setup(base: str, token: str, cases: list[Case]) -> None:
    """One request per POST row before measuring: flashsale answers what the row expects
    (and a refusal says sold out, not some other reason)."""
    for case in cases:
        if case.method != "POST":
            continue
        status, answer = post_json(
            base + case.path(0), RESERVE_BODY.encode(), {"Authorization": f"Bearer {token}"}
        )
        if status != case.expected or (status == 409 and json.loads(answer)["code"] != "sold_out"):
            raise RuntimeError(
                f"{case.endpoint}: expected {case.expected}, got {status} {answer!r}"
            )


@contextlib.contextmanager
def servers_for(
    urls: tuple[str, str], keys: Secrets, processes: int, log: IO[bytes]
) -> Iterator[tuple[str, str, str]]:
    """flashsale and both baselines with ``processes`` processes each; their base URLs."""
    redis_url, database_url = urls
    with service(redis_url, database_url, keys, processes, log) as ours:
        evalsha_sale = f"bench-{uuid.uuid4().hex[:8]}-baseline"
        create_sale(ours, keys.admin_token, evalsha_sale, MAX_STOCK)
        with (
            baselines("hello", redis_url, keys, processes, "", log) as hello,
            baselines("evalsha", redis_url, keys, processes, evalsha_sale, log) as evalsha,
        ):
            yield ours, hello, evalsha


def measure(
    args: argparse.Namespace, load: Load, urls: tuple[str, str], table: Table, log: IO[bytes]
) -> None:
    """Every row for every process count, rounds alternating baseline and flashsale."""
    keys = Secrets.random()
    with tempfile.TemporaryDirectory(prefix="flashsale-bench-") as tmp:
        tokens = Path(tmp) / "tokens.txt"
        buyers = int(TOKENS_PER_SECOND * max(args.workers) * max(1.0, args.seconds))
        write_tokens(tokens, keys.jwt_secret, buyers)
        for processes in args.workers:
            with servers_for(urls, keys, processes, log) as (ours, hello, evalsha):
                baseline_of = {"aiohttp hello": hello, "aiohttp + json + one EVALSHA": evalsha}
                cases = cases_for(ours, keys.admin_token, args.rounds)
                check_setup(ours, issue_token(keys.jwt_secret, "bench-probe"), cases)
                run_rounds(args, load, cases, ours, baseline_of, tokens)
            for case in cases:
                table.add(case.endpoint, processes, case.baseline, case.base, case.ours)
                repeated = max(r.requests for r in case.ours.runs) > buyers
                if case.method == "POST" and repeated:
                    table.notes.append(f"{case.endpoint}: more requests than buyer tokens")


def run_rounds(
    args: argparse.Namespace,
    load: Load,
    cases: list[Case],
    ours: str,
    baseline_of: dict[str, str],
    tokens: Path,
) -> None:
    """A warm-up (unless quick), then the rounds, baseline and flashsale in turn."""
    warm_up = Load(load.use_wrk, load.threads, load.connections, 1.0)
    if not args.quick:
        for case in cases:
            warm_up.run(baseline_of[case.baseline] + "/", case.method, tokens)
            warm_up.run(ours + case.path(args.rounds), case.method, tokens)
    for n in range(args.rounds):
        for case in cases:
            print(f"  {case.endpoint}: round {n + 1} of {args.rounds}", file=sys.stderr)
            case.base.runs.append(load.run(baseline_of[case.baseline] + "/", case.method, tokens))
            case.ours.runs.append(load.run(ours + case.path(n), case.method, tokens))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="process counts to measure, e.g. 1 2 (default: 1)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (median)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads / loader processes")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "own"),
        default="auto",
        help="auto: wrk when it is installed, else the own load generator",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one 1-second round, no warm-up, short projection runs"
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--no-projection", action="store_true",
                        help="skip the projection figures")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    if args.loadgen == "wrk" and not WRK:
        parser.error("wrk is not installed")
    if min(args.workers) < 1 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--workers, --rounds and --seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: measure, print the table; exit 1 when any row is an error."""
    args = parse_args(argv)
    configure_logging("warning")  # the table alone on stdout
    load = Load(
        args.loadgen != "own" and WRK is not None, args.threads, args.connections, args.seconds
    )
    if max(args.workers) > 1 and not serve_takes_workers():
        print("flashsale serve has no --workers here: measuring 1 process", file=sys.stderr)
        args.workers = [1]
    env = Settings()
    table = Table()
    load_at_start = os.getloadavg()[0]
    with (
        embedded_servers(env.redis_url, env.database_url) as urls,
        tempfile.TemporaryFile() as log,
    ):
        try:
            measure(args, load, (urls.redis_url, urls.database_url), table, log)
        except RuntimeError:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
            raise
        if args.no_projection:
            figures = None
        else:
            child_env = {
                **os.environ,
                "FLASHSALE_REDIS_URL": urls.redis_url,
                "FLASHSALE_DATABASE_URL": urls.database_url,
            }
            figures = projection_figures(child_env, args.quick)
    if figures is not None:
        table.add_figure(
            "projection into PostgreSQL",
            figures.events_per_second,
            (PROJECTION_BASELINE, figures.copy, figures.ratio),
        )
        table.add_figure("202 -> order row in PostgreSQL", figures.lag)
        table.notes.extend(f"projection figures: {command}" for command in figures.commands)
    table.notes[:0] = [
        f"load: {load.name}; figures are medians of {args.rounds} round(s)",
        f"machine: {os.cpu_count()} cores, load average (1 min) {load_at_start:.1f} at the"
        f" start, {os.getloadavg()[0]:.1f} at the end (about 1 per busy core: figures taken"
        " on a busier machine are lower, their ratios less so)",
    ]
    print(table.render(args.markdown))
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
