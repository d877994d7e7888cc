"""Admin views of the service as a whole, for the operator console: reservation attempts by
outcome, the consumers' health, and verify (run it, read the last result)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import asyncpg
import structlog
from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

from api.web.auth import require_admin
from api.web.openapi import Answer, documented
from api.web.problems import problem
from api.web.state import CONSOLE_HEALTH, GATEWAY, METRICS, ORDERS_POOL, SETTINGS
from consumers.health import Health
from core.errors import InfrastructureError
from projections.verify import VerifyReport, verify

log = structlog.get_logger(__name__)

# How long one verify may run before its caller hears 503; it folds the whole log.
VERIFY_TIMEOUT_SECONDS = 60.0
# How long the verify lock lives unless given back: a little longer than a run may take
# (its timeout, then keeping the result), so that it never ends under a live run, and a
# worker killed mid-run holds verify up at most this long.
VERIFY_LOCK_MS = int(VERIFY_TIMEOUT_SECONDS * 1000) + 5000
# Rows of differences a verify result keeps (the count says how many there were).
MAX_VERIFY_ROWS = 50


class GroupLag(BaseModel):
    """One consumer group on one partition stream."""

    group: str
    partition: int
    consumers: int
    undelivered: int = Field(description="entries not delivered to the group yet")
    pending: int = Field(description="entries delivered and not acknowledged")
    lag: int = Field(description="undelivered + pending")
    oldest_pending_seconds: float | None = Field(
        description="age of the oldest pending entry; null when none is pending"
    )


class ConsumerHealth(BaseModel):
    """The consumers' health as last read from Redis (at most a second old)."""

    readable: bool = Field(description="false when Redis could not be read: the rest is empty")
    groups: list[GroupLag]
    lag: int = Field(description="entries not acknowledged yet, over every group and partition")
    oldest_pending_seconds: float | None = Field(
        description="age of the oldest pending entry of any group; null when none is pending"
    )
    dead_letters: int | None = Field(description="entries parked on the dead-letter stream")


class Overview(BaseModel):
    """Body of GET /v1/admin/overview."""

    at: datetime = Field(description="when this answer was made")
    attempts: dict[str, int] = Field(
        description="reservation attempts by outcome since the API workers started, summed"
        " over them (placed, replayed, or the rejection code); rates come from two readings"
    )
    transitions: dict[str, int] = Field(
        description="confirm and cancel calls by result, like attempts"
    )
    consumers: ConsumerHealth


class VerifyRow(BaseModel):
    """One field of a sale on which a store differs from the log."""

    sale_id: str
    stores: str = Field(description="the stores that differ: redis, postgres, log or a +")
    field: str
    log: str
    redis: str = Field(description='"=" where Redis agrees with the log, "-" where not held')
    postgres: str = Field(description='"=" where PostgreSQL agrees, "-" where not held')


class VerifyResult(BaseModel):
    """What one verify run found: the log folded and compared with Redis and PostgreSQL."""

    clean: bool
    sales: int
    events: int
    lagging: int = Field(description="logged events not projected yet (not drift)")
    malformed: int = Field(description="log entries that are no event, skipped")
    differences: int
    rows: list[VerifyRow] = Field(description=f"the first {MAX_VERIFY_ROWS} differing fields")
    started_at: datetime
    finished_at: datetime
    seconds: float


class LastVerify(BaseModel):
    """Body of GET /v1/admin/verify."""

    last: VerifyResult | None = Field(description="null until a verify has run")


def consumer_health(health: Health | None) -> ConsumerHealth:
    """The console's form of a health reading (None: Redis could not be read)."""
    if health is None:
        return ConsumerHealth(
            readable=False, groups=[], lag=0, oldest_pending_seconds=None, dead_letters=None
        )
    ages = [g.oldest_pending_seconds for g in health.groups if g.oldest_pending_seconds is not None]
    return ConsumerHealth(
        readable=True,
        groups=[
            GroupLag(
                group=g.group,
                partition=g.partition,
                consumers=g.consumers,
                undelivered=g.undelivered,
                pending=g.pending,
                lag=g.lag,
                oldest_pending_seconds=g.oldest_pending_seconds,
            )
            for g in health.groups
        ],
        lag=sum(g.lag for g in health.groups),
        oldest_pending_seconds=max(ages) if ages else None,
        dead_letters=health.dead_letters,
    )


@documented(
    "Reservation attempts by outcome and the consumers' health (admin).",
    Answer(200, "the overview", Overview),
    auth=("admin",),
)
async def overview(request: web.Request) -> web.Response:
    """GET /v1/admin/overview (admin): attempt and transition totals as ``/metrics`` counts
    them, and consumer lag per group and partition, the oldest pending age and the
    dead-letter count, read from Redis at most once a second per API process."""
    require_admin(request, request.app[SETTINGS].admin_token)
    metrics = request.app[METRICS]
    body = Overview(
        at=datetime.now(UTC),
        attempts=metrics.counter_totals(metrics.reservations, "outcome"),
        transitions=metrics.counter_totals(metrics.transitions, "result"),
        consumers=consumer_health(await request.app[CONSOLE_HEALTH].get()),
    )
    return web.Response(text=body.model_dump_json(), content_type="application/json")


def verify_result(report: VerifyReport, started_at: datetime, seconds: float) -> VerifyResult:
    """A verify report as the API answers and keeps it."""
    rows = report.rows()[:MAX_VERIFY_ROWS]
    return VerifyResult(
        clean=report.clean,
        sales=report.sales,
        events=report.events,
        lagging=report.lagging,
        malformed=report.malformed,
        differences=len(report.differences),
        rows=[VerifyRow.model_validate(row, from_attributes=True) for row in rows],
        started_at=started_at,
        finished_at=datetime.now(UTC),
        seconds=round(seconds, 3),
    )


@documented(
    "Run verify now: fold the log and compare it with Redis and PostgreSQL (admin).",
    Answer(200, "what verify found, now the last result", VerifyResult),
    auth=("admin",),
    problems=("verify_running", "unavailable"),
    description="One run at a time over every API process and host (409 verify_running"
    f" meanwhile; a lock in Redis, freed at the latest {VERIFY_LOCK_MS / 1000:.0f} s after a"
    f" worker died running verify), at most {VERIFY_TIMEOUT_SECONDS:.0f} s (then 503). The"
    " result is kept in Redis, so every API worker answers it to GET /v1/admin/verify."
    " 503 unavailable without a database.",
)
async def run_verify(request: web.Request) -> web.Response:
    """POST /v1/admin/verify (admin): run verify over every sale and keep its result.

    It reads in bounded steps (``projections.verify``) and never writes, so a run does not
    hold up purchases; a second run asked for meanwhile, of any API process, is refused
    rather than queued: the verify lock in Redis (``OperatorRecords.take_verify_lock``)
    names the run that holds it, and only that run gives it back.
    """
    require_admin(request, request.app[SETTINGS].admin_token)
    pool = request.app.get(ORDERS_POOL)
    if pool is None:
        raise InfrastructureError("no database configured: verify compares it with the log")
    gateway = request.app[GATEWAY]
    token = await gateway.take_verify_lock(VERIFY_LOCK_MS)
    if token is None:
        return problem(409, "verify_running", "Verify running", "a verify is running already")
    try:
        started_at, started = datetime.now(UTC), time.monotonic()
        try:
            async with asyncio.timeout(VERIFY_TIMEOUT_SECONDS):
                report = await verify(gateway, pool)
        except TimeoutError as e:
            raise InfrastructureError(
                f"verify did not finish within {VERIFY_TIMEOUT_SECONDS:.0f} s"
            ) from e
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise InfrastructureError(f"verify could not read PostgreSQL: {e}") from e
        result = verify_result(report, started_at, time.monotonic() - started)
        text = result.model_dump_json()
        await gateway.save_verify_result(text)
    finally:
        try:
            await gateway.release_verify_lock(token)
        except InfrastructureError as e:  # it expires on its own
            log.warning("verify_lock_not_released", error=str(e), ttl_ms=VERIFY_LOCK_MS)
    return web.Response(text=text, content_type="application/json")


@documented(
    "The last verify result, whichever API worker ran it (admin).",
    Answer(200, "the last result, or null", LastVerify),
    auth=("admin",),
    problems=("unavailable",),
)
async def last_verify(request: web.Request) -> web.Response:
    """GET /v1/admin/verify (admin): the last verify result kept, null before the first."""
    require_admin(request, request.app[SETTINGS].admin_token)
    kept = await request.app[GATEWAY].last_verify_result()
    last = None
    if kept is not None:
        try:
            last = VerifyResult.model_validate_json(kept)
        except ValidationError as e:  # kept by another version: as if none was run
            log.warning("last_verify_unreadable", error=str(e))
    return web.Response(
        text=LastVerify(last=last).model_dump_json(), content_type="application/json"
    )
