"""``flashsale demo``: a simulated flash sale over real HTTP, then an honest report."""

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

from api.auth import issue_token
from api.cli import Services, open_services, projector_for, running_api
from core.settings import Settings
from projections.replay import verify


@dataclass
class DemoReport:
    """Everything the demo measured."""

    sale_id: str
    stock: int
    attempts: int
    buyers: int
    sold: int = 0
    turned_away: dict[str, int] = field(default_factory=dict)
    attack_seconds: float = 0.0
    requests_per_second: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    redis_remaining: int = 0
    postgres_orders: int = 0
    oversold: int = 0
    duplicate_buyers: int = 0
    catch_up_seconds: float | None = None
    verify_clean: bool = False
    verify_differences: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.oversold == 0
            and self.duplicate_buyers == 0
            and self.verify_clean
            and self.catch_up_seconds is not None
        )

    def render(self) -> str:
        rows = [
            ("sale", self.sale_id),
            ("stock", self.stock),
            ("purchase attempts", f"{self.attempts} from {self.buyers} buyers, all at once"),
            ("sold (202)", self.sold),
            *((f"turned away: {code}", n) for code, n in sorted(self.turned_away.items())),
            ("attack took", f"{self.attack_seconds:.2f} s ({self.requests_per_second:,.0f} req/s)"),
            ("latency p50 / p99", f"{self.latency_p50_ms:.1f} ms / {self.latency_p99_ms:.1f} ms"),
            ("redis remaining", self.redis_remaining),
            ("postgres orders", self.postgres_orders),
            ("oversold", f"{self.oversold}  (must be 0)"),
            ("duplicate buyers", f"{self.duplicate_buyers}  (must be 0)"),
            (
                "postgres caught up in",
                "did not catch up"
                if self.catch_up_seconds is None
                else f"{self.catch_up_seconds:.2f} s after the last response",
            ),
            (
                "replay verify",
                "clean" if self.verify_clean else f"DRIFT ({self.verify_differences} differences)",
            ),
        ]
        width = max(len(str(k)) for k, _ in rows)
        lines = [f"  {str(k).ljust(width)}  {v}" for k, v in rows]
        verdict = "PASS" if self.ok else "FAIL"
        return "\n".join(["flashsale demo report", *lines, f"  result: {verdict}"])


async def fire_from_another_process(
    url: str, attempts: list[list[str]], connections: int = 256
) -> tuple[list[tuple[int, str, float]], float]:
    """Run :mod:`api.loadgen` in a child process; return its results and the wall time."""
    plan = json.dumps({"url": url, "attempts": attempts, "connections": connections}).encode()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "api.loadgen",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    started = time.perf_counter()
    out, _ = await child.communicate(plan)
    elapsed = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"load generator failed with exit code {child.returncode}")
    results = [(int(s), str(c), float(t)) for s, c, t in json.loads(out)]
    return results, elapsed


async def simulate(services: Services, base: str, stock: int, attempts: int) -> DemoReport:
    """Open a sale, fire every attempt at once, wait for PostgreSQL, verify."""
    settings = services.settings
    sale_id = f"demo-{uuid.uuid4().hex[:8]}"
    buyers = max(1, attempts * 4 // 5)
    users = [f"buyer-{i}" for i in range(buyers)]
    # Every buyer tries once; the rest of the attempts are eager buyers trying again.
    attempt_users = users + random.choices(users, k=attempts - buyers)
    random.shuffle(attempt_users)
    tokens = {u: issue_token(settings.jwt_secret, u) for u in users}
    report = DemoReport(sale_id=sale_id, stock=stock, attempts=attempts, buyers=buyers)

    async with aiohttp.ClientSession() as session:
        admin = {"Authorization": f"Bearer {settings.admin_token}"}
        async with session.post(
            f"{base}/v1/sales",
            json={"sale_id": sale_id, "stock": stock, "per_user_limit": 1},
            headers=admin,
        ) as response:
            if response.status != 201:
                raise RuntimeError(f"could not create the sale: {await response.text()}")
    url = f"{base}/v1/sales/{sale_id}/reservations"
    plan = [[tokens[u], uuid.uuid4().hex] for u in attempt_users]
    results, report.attack_seconds = await fire_from_another_process(url, plan)
    finished = time.perf_counter()

    report.requests_per_second = attempts / report.attack_seconds
    outcomes = Counter(code for _, code, _ in results)
    report.sold = outcomes.pop("placed", 0)
    report.turned_away = dict(outcomes)
    latencies = sorted(elapsed for _, _, elapsed in results)
    report.latency_p50_ms = latencies[len(latencies) // 2] * 1000
    report.latency_p99_ms = latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)] * 1000

    sale = await services.gateway.get_sale(sale_id)
    report.redis_remaining = sale.remaining if sale else -1
    deadline = time.monotonic() + 60
    async with services.pool.acquire() as conn:
        while time.monotonic() < deadline:
            count = await conn.fetchval("SELECT count(*) FROM orders WHERE sale_id = $1", sale_id)
            if count == report.sold:
                report.catch_up_seconds = time.perf_counter() - finished
                break
            await asyncio.sleep(0.05)
        report.postgres_orders = await conn.fetchval(
            "SELECT count(*) FROM orders WHERE sale_id = $1", sale_id
        )
        sold_units = await conn.fetchval(
            "SELECT coalesce(sum(qty), 0) FROM orders WHERE sale_id = $1", sale_id
        )
        report.duplicate_buyers = await conn.fetchval(
            "SELECT count(*) FROM (SELECT user_id FROM orders WHERE sale_id = $1"
            " GROUP BY user_id HAVING sum(qty) > 1) d",
            sale_id,
        )
    report.oversold = max(0, sold_units - stock, report.sold - stock, -report.redis_remaining)
    result = await verify(services.gateway, services.pool, sale_id)
    report.verify_clean = result.clean
    report.verify_differences = len(result.differences)
    return report


async def run_demo(settings: Settings, stock: int, attempts: int, as_json: bool) -> int:
    """Run API and projector, simulate the sale, print the report; exit 0 when it passed."""
    settings = settings.model_copy(update={"host": "127.0.0.1"})
    async with open_services(settings) as services, running_api(services, 0) as port:
        stop = asyncio.Event()
        projector = asyncio.create_task(projector_for(services, block_ms=50).run(stop))
        try:
            report = await simulate(services, f"http://127.0.0.1:{port}", stock, attempts)
        finally:
            stop.set()
            await projector
    print(json.dumps(asdict(report) | {"ok": report.ok}, indent=2) if as_json else report.render())
    return 0 if report.ok else 1
