"""Schemathesis against the live service: every check, in the examples, coverage, fuzzing
and stateful phases, as a buyer and as the admin; the document and the code must agree.

The app runs on a real TCP port, in a thread with its own event loop (schemathesis calls it
with blocking requests), against the test Redis and PostgreSQL. Two rules of the API cannot
be said in JSON Schema, so the generated requests are kept clear of them rather than the
checks loosened: a sale's window must end after it starts (POST /v1/sales answers 422
otherwise), and an Idempotency-Key reused with another body is refused (422
idempotency_key_reused, by design): each generated key is made unique.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import requests
import schemathesis
from aiohttp import web
from schemathesis.engine import Status, events
from schemathesis.engine.recorder import CheckNode, ScenarioRecorder

from api.cli.launcher import ServerUrls
from api.connections import redis_client_for
from api.web.app import create_app
from api.web.auth import issue_token
from api.web.metrics import ApiMetrics
from api.web.openapi import PATH_EXAMPLES
from core.models import MAX_QTY, MAX_STOCK
from core.settings import Settings
from tests.helpers import ADMIN_TOKEN, JWT_SECRET

PHASES = ("examples", "coverage", "fuzzing", "stateful")
# Enough to cover every operation in every phase and stay well under a minute and a half.
MAX_EXAMPLES = 50
STATEFUL_EXAMPLES = 60


@dataclass
class LiveApi:
    """The app served on a free port from a thread of its own; counts what it answered."""

    settings: Settings
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    url: str = ""
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _stop: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def __enter__(self) -> LiveApi:
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),))
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or not self.url:
            raise RuntimeError("the app did not start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)
        self._loop.close()

    async def _serve(self) -> None:
        try:
            self._stop = asyncio.Event()
            client = redis_client_for(self.settings)
            await client.flushdb()
            runner = web.AppRunner(create_app(self.settings, client, self.metrics))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
        except BaseException as e:
            self._error = e
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await client.aclose()

    def answered(self) -> dict[tuple[str, str], int]:
        """Requests the app has answered so far, by route and status."""
        return {
            (sample.labels["route"], sample.labels["status"]): int(sample.value)
            for metric in self.metrics.requests.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        }


async def _empty_database(url: str) -> None:
    """Drop every table: the app migrates on start, and verify (which the admin run calls
    often) then folds only this module's sales, not whatever earlier tests left."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def live_api(servers: ServerUrls) -> Iterator[LiveApi]:
    asyncio.run(_empty_database(servers.database_url or ""))
    settings = Settings(
        redis_url=servers.redis_url,
        database_url=servers.database_url,
        admin_token=ADMIN_TOKEN,
        jwt_secret=JWT_SECRET,
        partitions=4,
        metrics_health_interval_ms=0,
        sale_view_cache_ms=0,
    )
    with LiveApi(settings) as api:
        # The sale of the document's examples, open for the whole module: the examples
        # phase places reservations in it whichever operation it calls first.
        example = {
            "sale_id": PATH_EXAMPLES["sale_id"],
            "stock": MAX_STOCK,
            "per_user_limit": MAX_STOCK,
        }
        answer = requests.post(
            f"{api.url}/v1/sales",
            json=example,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
        )
        assert answer.status_code == 201, answer.text
        yield api


_keys = itertools.count()


def _unique_key(key: str) -> str:
    return f"{key[:100]}.{next(_keys)}"


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _keep_clear_of_unsayable_rules(context: Any, case: Any) -> Any:
    """Make each Idempotency-Key unique, and drop an ``ends_at`` that is not after the
    window's start (a body that breaks a schema rule as well stays as broken)."""
    key = case.headers.get("Idempotency-Key") if case.headers else None
    if isinstance(key, str) and key:
        case.headers["Idempotency-Key"] = _unique_key(key)
    if case.operation.label == "POST /v1/sales" and isinstance(case.body, dict):
        ends = _moment(case.body.get("ends_at"))
        starts = case.body.get("starts_at")
        start = _moment(starts) if starts is not None else datetime.now(UTC)
        if ends is not None and start is not None and ends <= start:
            case.body = {k: v for k, v in case.body.items() if k != "ends_at"}
    return case


def _tokens(role: str) -> dict[str, str]:
    # Each run is one buyer; the buyer run and the admin run are different buyers.
    return {"buyer": issue_token(JWT_SECRET, f"schemathesis-{role}", 3600), "admin": ADMIN_TOKEN}


def load_schema(
    api: LiveApi, role: str, document: dict[str, Any] | None = None
) -> schemathesis.BaseSchema:
    """The live document (or ``document`` instead, sent to the live service), with
    ``role``'s credentials on each call: the role's own scheme where the operation takes it,
    else the scheme it takes (so a buyer run still opens sales as the admin, and stateful
    testing reaches reservations)."""
    config = schemathesis.Config.from_dict(
        {
            "base-url": api.url,
            "checks": {"enabled": True},
            "phases": {
                **{name: {"enabled": True} for name in PHASES},
                "stateful": {"enabled": True, "generation": {"max-examples": STATEFUL_EXAMPLES}},
            },
            "generation": {"max-examples": MAX_EXAMPLES},
            "seed": 20261130,
            # Each run starts afresh: no failures replayed from (or written to) a directory.
            "cache": {"enabled": False},
        }
    )
    if document is None:
        schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json", config=config)
    else:
        schema = schemathesis.openapi.from_dict(document, config=config)
    tokens = _tokens(role)
    security = {
        f"{method.upper()} {path}": [name for need in operation["security"] for name in need]
        for path, operations in schema.raw_schema["paths"].items()
        for method, operation in operations.items()
    }

    @schema.auth(refresh_interval=None)
    class RoleAuth:
        def get(self, case: Any, context: schemathesis.AuthContext) -> str | None:
            schemes = security.get(case.operation.label, [])
            if not schemes:
                return None
            return tokens[role if role in schemes else schemes[0]]

        def set(self, case: Any, data: str, context: schemathesis.AuthContext) -> None:
            if case.headers is None:
                case.headers = {}
            case.headers["Authorization"] = f"Bearer {data}"

    schema.hook("map_case")(_keep_clear_of_unsayable_rules)
    return schema


@dataclass
class Run:
    """What one schemathesis run did."""

    requests: int
    # Routes that found what they were asked about at least once in the run: they answered
    # 2xx, or 409 (the resource exists; its state refused, e.g. a reservation cancelled).
    reached: set[str]
    seconds: float
    phases: dict[str, str]
    failures: list[str]
    errors: list[str]


def run_schemathesis(
    api: LiveApi, role: str, document: dict[str, Any] | None = None, only: str | None = None
) -> Run:
    """Every phase of schemathesis's engine (what ``schemathesis run`` drives) against
    ``api``, as ``role``; with the live document unless ``document`` is given, on every
    operation or ``only`` the one of this label."""
    started, before = time.monotonic(), api.answered()
    schema = load_schema(api, role, document)
    if only is not None:
        method, path = only.split(" ", 1)
        schema = schema.include(method=method, path=path)
    phases: dict[str, str] = {}
    failures: list[str] = []
    errors: list[str] = []
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.PhaseFinished):
            phases[event.phase.name.value] = event.status.value
        elif isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failures.append(_described(event.recorder, case_id, check))
        elif isinstance(event, events.NonFatalError | events.FatalError):
            cause = event.value if isinstance(event, events.NonFatalError) else event.exception
            errors.append(str(cause))
    after = api.answered()
    done = {key: count - before.get(key, 0) for key, count in after.items()}
    reached = {
        route
        for (route, status), count in done.items()
        if count and (status.startswith("2") or status == "409")
    }
    requests = sum(done.values())
    return Run(requests, reached, time.monotonic() - started, phases, failures, errors)


def _described(recorder: ScenarioRecorder, case_id: str, check: CheckNode) -> str:
    assert check.failure_info is not None
    interaction = recorder.interactions.get(case_id)
    said = f"{recorder.label}: {check.name}: {check.failure_info.failure.title}"
    if interaction is None:
        return said
    request, response = interaction.request, interaction.response
    answer = "no answer" if response is None else f"{response.status_code} {response.text[:300]}"
    return f"{said}\n  {request.method} {request.uri} {request.body!r:.300}\n  -> {answer}"


@pytest.mark.parametrize("role", ["buyer", "admin"])
def test_schemathesis_finds_no_failure(live_api: LiveApi, role: str) -> None:
    run = run_schemathesis(live_api, role)
    print(f"schemathesis as {role}: {run.requests} requests in {run.seconds:.1f} s, {run.phases}")
    assert not run.errors, run.errors
    assert not run.failures, "\n".join(dict.fromkeys(run.failures))
    assert all(run.phases.get(name) == "success" for name in PHASES), run.phases
    # The links lead stateful testing everywhere: every route found a real resource at least
    # once (a confirm or a cancel only can by following a placement to its reservation).
    router = create_app(live_api.settings).router
    routes = {resource.canonical for resource in router.resources()}
    assert run.reached == routes, routes - run.reached


def test_schemathesis_finds_a_document_that_drifted_from_the_code(live_api: LiveApi) -> None:
    """The harness itself: a document that says more than the code does is caught. Here it
    publishes a larger ``qty`` than ``ReservationRequest`` takes."""
    drifted = json.loads(requests.get(f"{live_api.url}/openapi.json", timeout=10).text)
    qty = drifted["components"]["schemas"]["ReservationRequest"]["properties"]["qty"]
    qty["maximum"] = 2 * MAX_QTY
    reserve = "POST /v1/sales/{sale_id}/reservations"
    run = run_schemathesis(live_api, "buyer", drifted, only=reserve)
    assert any(f"{reserve}: positive_data_acceptance" in failure for failure in run.failures), (
        run.failures
    )
