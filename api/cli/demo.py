"""``flashsale demo``: a simulated flash sale over real HTTP, then an honest report.

A first wave of buyers attacks the sale all at once from another process. The winners
then pay, cancel or abandon their holds; abandoned holds expire after the payment window
and, with the cancelled ones, go back on sale to a second wave of later buyers, who pay.
The report is read back from Redis and PostgreSQL, and the replay tool verifies the lot.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field

import aiohttp
from redis.asyncio.cluster import RedisCluster

from api.cli.launcher import death_signal_setter
from api.cli.links import ADMIN_TOKEN_FROM_ENV, page_lines
from api.cli.processes import Services, open_services, run_consumers, running_api
from api.web.auth import issue_token
from core.gateway.clients import RedisClient
from core.settings import Settings
from projections.tables import orders, stock_view
from projections.verify import verify

Result = tuple[int, str, float, str]  # status, outcome code, seconds, reservation id


@dataclass
class Wave:
    """One burst of purchase attempts and what came of it."""

    attempts: int
    buyers: int
    sold: int = 0
    turned_away: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    attempts_per_second: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0

    def record(self, results: list[Result], seconds: float) -> None:
        """Take in the wave's answers and the seconds from its first request sent to its
        last answer received (the load generator's own measure)."""
        outcomes = Counter(code for _, code, _, _ in results)
        self.sold = outcomes.pop("placed", 0)
        self.turned_away = dict(outcomes)
        self.seconds = seconds
        self.attempts_per_second = len(results) / seconds if seconds else 0.0
        latencies = sorted(elapsed for _, _, elapsed, _ in results)
        self.latency_p50_ms = latencies[len(latencies) // 2] * 1000
        self.latency_p99_ms = latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)] * 1000

    def rows(self, name: str) -> list[tuple[str, object]]:
        return [
            (name, f"{self.attempts} attempts from {self.buyers} buyers, all at once"),
            ("  sold (202)", self.sold),
            *((f"  turned away: {code}", n) for code, n in sorted(self.turned_away.items())),
            ("  took", f"{self.seconds:.2f} s, first request sent to last answer received"),
            ("  attempts/s reached", f"{self.attempts_per_second:,.0f}"),
            ("  latency p50 / p99", f"{self.latency_p50_ms:.1f} / {self.latency_p99_ms:.1f} ms"),
        ]


@dataclass
class DemoReport:
    """Everything the demo measured."""

    sale_id: str
    stock: int
    hold_seconds: int
    first: Wave
    second: Wave
    paid: int = 0
    cancelled: int = 0
    too_late: int = 0
    abandoned: int = 0
    expired: int = 0
    returned_to_shelf: int = 0
    resold: int = 0
    confirmed: int = 0
    redis_remaining: int = 0
    redis_held: int = 0
    postgres_orders: int = 0
    postgres_status: dict[str, int] = field(default_factory=dict)
    oversold: int = 0
    duplicate_buyers: int = 0
    catch_up_seconds: float | None = None
    verify_clean: bool = False
    verify_differences: int = 0
    redis: str = "one server"

    @property
    def ok(self) -> bool:
        return (
            self.oversold == 0
            and self.duplicate_buyers == 0
            and self.verify_clean
            and self.catch_up_seconds is not None
            and self.expired == self.abandoned + self.too_late
            and self.resold == min(self.returned_to_shelf, self.second.attempts)
        )

    def render(self) -> str:
        rows: list[tuple[str, object]] = [
            ("sale", f"{self.sale_id}: {self.stock} units, {self.hold_seconds} s to pay"),
            ("redis", self.redis),
            *self.first.rows("first wave"),
            (
                "winners then",
                f"{self.paid} paid, {self.cancelled} cancelled, {self.abandoned} abandoned",
            ),
            *(
                [("too late", f"{self.too_late} buyers acted after their window")]
                if self.too_late
                else []
            ),
            ("expired", f"{self.expired} unpaid holds after the payment window"),
            ("back on the shelf", f"{self.returned_to_shelf} units (cancelled + expired)"),
            *self.second.rows("second wave"),
            ("resold", f"{self.resold} returned units bought (and paid) by later buyers"),
            (
                "final",
                f"confirmed {self.confirmed}, held {self.redis_held}, "
                f"remaining {self.redis_remaining} (Redis)",
            ),
            (
                "postgres orders",
                f"{self.postgres_orders} {dict(sorted(self.postgres_status.items()))}",
            ),
            ("oversold", f"{self.oversold}  (must be 0)"),
            ("duplicate buyers", f"{self.duplicate_buyers}  (must be 0)"),
            (
                "postgres caught up in",
                "did not catch up"
                if self.catch_up_seconds is None
                else f"{self.catch_up_seconds:.2f} s after the last request",
            ),
            (
                "replay verify",
                "clean" if self.verify_clean else f"DRIFT ({self.verify_differences} differences)",
            ),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
        verdict = "PASS" if self.ok else "FAIL"
        return "\n".join(["flashsale demo report", *lines, f"  result: {verdict}"])


async def fire_from_another_process(
    url: str, attempts: list[list[str]], connections: int = 256
) -> tuple[list[Result], float]:
    """Run :mod:`api.cli.loadgen` in a child process; return its results and its firing time."""
    plan = json.dumps({"url": url, "attempts": attempts, "connections": connections}).encode()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "api.cli.loadgen",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=death_signal_setter(),  # and must die with the demo if it is killed
    )
    try:
        out, _ = await child.communicate(plan)
    finally:
        # Interrupted (Ctrl-C, SIGTERM, an error here): the child must not fire on alone.
        if child.returncode is None:
            child.kill()
            await child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"load generator failed with exit code {child.returncode}")
    answer = json.loads(out)
    results = [(int(s), str(c), float(t), str(r)) for s, c, t, r in answer["results"]]
    return results, float(answer["seconds"])


class Simulation:
    """The sale, its buyers and the HTTP calls they make."""

    def __init__(self, services: Services, base: str, stock: int, hold_seconds: int) -> None:
        self.services = services
        self.base = base
        self.stock = stock
        self.hold_seconds = hold_seconds
        self.sale_id = f"demo-{uuid.uuid4().hex[:8]}"
        self.tokens: dict[str, str] = {}
        self.rng = random.Random()

    def token(self, user: str) -> str:
        if user not in self.tokens:
            self.tokens[user] = issue_token(self.services.settings.jwt_secret, user)
        return self.tokens[user]

    async def open_sale(self, session: aiohttp.ClientSession) -> None:
        admin = {"Authorization": f"Bearer {self.services.settings.admin_token}"}
        body = {
            "sale_id": self.sale_id,
            "stock": self.stock,
            "per_user_limit": 1,
            "hold_seconds": self.hold_seconds,
        }
        async with session.post(f"{self.base}/v1/sales", json=body, headers=admin) as response:
            if response.status != 201:
                raise RuntimeError(f"could not create the sale: {await response.text()}")

    async def wave(self, prefix: str, attempts: int) -> tuple[Wave, list[tuple[str, str]]]:
        """Every buyer tries once, eager ones twice; returns the wave and (user, id) won."""
        buyers = max(1, attempts * 4 // 5)
        users = [f"{prefix}-{i}" for i in range(buyers)]
        attempt_users = users + self.rng.choices(users, k=attempts - buyers)
        self.rng.shuffle(attempt_users)
        plan = [[self.token(u), uuid.uuid4().hex] for u in attempt_users]
        url = f"{self.base}/v1/sales/{self.sale_id}/reservations"
        results, seconds = await fire_from_another_process(url, plan)
        wave = Wave(attempts=attempts, buyers=buyers)
        wave.record(results, seconds)
        won = [(u, r[3]) for u, r in zip(attempt_users, results, strict=True) if r[0] == 202]
        return wave, won

    async def act(
        self, session: aiohttp.ClientSession, action: str, user: str, reservation_id: str
    ) -> int:
        """Confirm or cancel one reservation as its buyer; return the HTTP status."""
        url = f"{self.base}/v1/reservations/{reservation_id}/{action}"
        headers = {"Authorization": f"Bearer {self.token(user)}"}
        async with session.post(url, headers=headers) as response:
            await response.read()
            return response.status


async def simulate(
    services: Services,
    base: str,
    stock: int,
    attempts: int,
    hold_seconds: int,
    admin_hint: str = ADMIN_TOKEN_FROM_ENV,
) -> DemoReport:
    """Run both waves and the buyers' decisions, wait for PostgreSQL, verify. Once the sale
    is open, the pages' addresses are printed to watch it (``admin_hint``: where the
    console's admin token is)."""
    sim = Simulation(services, base, stock, hold_seconds)
    gateway = services.gateway
    async with aiohttp.ClientSession() as session:
        await sim.open_sale(session)
        lines = page_lines(base, services.settings.jwt_secret, admin_hint, sim.sale_id)
        print(f"watch it while it runs:\n{lines}", file=sys.stderr)
        first, won = await sim.wave("buyer", attempts)
        sim.rng.shuffle(won)
        paying = won[: len(won) * 60 // 100]
        cancelling = won[len(paying) : len(paying) + len(won) * 15 // 100]
        abandoning = won[len(paying) + len(cancelling) :]
        statuses = await asyncio.gather(
            *(sim.act(session, "confirm", u, r) for u, r in paying),
            *(sim.act(session, "cancel", u, r) for u, r in cancelling),
        )
        # 409 here means the hold expired before the buyer acted (a wave slower than the
        # payment window): such a buyer is too late, and the hold expires like an abandoned one.
        if any(status not in (200, 409) for status in statuses):
            raise RuntimeError(f"a buyer's confirm or cancel failed: {Counter(statuses)}")
        late = statuses.count(409)

        # Wait for the payment window to pass and the expiry worker to return the stock.
        deadline = time.monotonic() + hold_seconds + 15
        while time.monotonic() < deadline:
            sale = await gateway.get_sale(sim.sale_id)
            if sale is not None and sale.held == 0:
                break
            await asyncio.sleep(0.1)
        returned = (await gateway.get_sale(sim.sale_id) or sale).released  # type: ignore[union-attr]

        second, resold = await sim.wave("later-buyer", max(1, attempts // 5))
        later = await asyncio.gather(*(sim.act(session, "confirm", u, r) for u, r in resold))
        if any(status != 200 for status in later):
            raise RuntimeError(f"a later buyer's confirm failed: {Counter(later)}")
    finished = time.perf_counter()

    report = DemoReport(
        sale_id=sim.sale_id,
        stock=stock,
        hold_seconds=hold_seconds,
        first=first,
        second=second,
        paid=statuses[: len(paying)].count(200),
        cancelled=statuses[len(paying) :].count(200),
        too_late=late,
        abandoned=len(abandoning),
        returned_to_shelf=returned,
        resold=len(resold),
    )
    await read_back(services, report, finished, first.sold + second.sold)
    return report


async def read_back(services: Services, report: DemoReport, finished: float, placed: int) -> None:
    """Fill the report from Redis and PostgreSQL once PostgreSQL has caught up."""
    sale = await services.gateway.get_sale(report.sale_id)
    assert sale is not None
    report.confirmed, report.redis_held, report.redis_remaining = (
        sale.confirmed,
        sale.held,
        sale.remaining,
    )
    deadline = time.monotonic() + 60
    async with services.pool.acquire() as conn:
        while time.monotonic() < deadline:
            row = await stock_view.read_row(conn, report.sale_id)
            if row is not None and (
                await orders.count_of_sale(conn, report.sale_id),
                row["remaining"],
                row["held"],
                row["confirmed"],
            ) == (placed, sale.remaining, sale.held, sale.confirmed):
                report.catch_up_seconds = time.perf_counter() - finished
                break
            await asyncio.sleep(0.05)
        totals = await orders.status_totals(conn, report.sale_id)
        report.postgres_status = {status: n for status, (n, _) in totals.items()}
        report.postgres_orders = sum(report.postgres_status.values())
        report.expired = report.postgres_status.get("expired", 0)
        active_units = sum(
            units for status, (_, units) in totals.items() if status in ("pending", "confirmed")
        )
        report.duplicate_buyers = await orders.buyers_over_one_unit(conn, report.sale_id)
    report.oversold = max(
        0,
        active_units - report.stock,
        sale.confirmed + sale.held - report.stock,
        -sale.remaining,
    )
    result = await verify(services.gateway, services.pool, report.sale_id)
    report.verify_clean = result.clean
    report.verify_differences = len(result.differences)


def redis_shape(client: RedisClient) -> str:
    """What the sale ran on, for the report: one server or a cluster of N primaries."""
    if isinstance(client, RedisCluster):
        return f"a cluster of {len(client.get_primaries())} primaries"
    return "one server"


async def run_demo(
    settings: Settings,
    stock: int,
    attempts: int,
    hold_seconds: int,
    as_json: bool,
    admin_hint: str = ADMIN_TOKEN_FROM_ENV,
) -> int:
    """Run API and consumers, simulate the sale, print the report; exit 0 when it passed."""
    settings = settings.model_copy(update={"host": "127.0.0.1", "expiry_interval_ms": 100})
    async with open_services(settings) as services, running_api(services, 0) as port:
        stop = asyncio.Event()
        consumers = asyncio.create_task(run_consumers(services, stop, block_ms=50))
        try:
            report = await simulate(
                services, f"http://127.0.0.1:{port}", stock, attempts, hold_seconds, admin_hint
            )
        finally:
            stop.set()
            await consumers
        report.redis = redis_shape(services.redis)
    print(json.dumps(asdict(report) | {"ok": report.ok}, indent=2) if as_json else report.render())
    return 0 if report.ok else 1
