"""Helpers of the HTTP tests: authorization headers, client sessions, problem+json checks,
the log and the database as a client cannot see them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import jwt
from aiohttp.test_utils import TestServer

from api.web.app import create_app
from api.web.auth import issue_token
from core.events import AnyEvent, ReservationPlaced, parse_event
from core.gateway import RedisGateway
from core.gateway.clients import RedisClient
from core.settings import Settings
from tests.helpers import ADMIN_TOKEN, JWT_SECRET, every_key

PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
OTHER_SECRET = "another-jwt-secret-0123456789abcdef"
JSON = {"Content-Type": "application/json"}


# --------------------------------------------------------------------------- helpers


def buyer(user_id: str, secret: str = JWT_SECRET) -> dict[str, str]:
    """Authorization header of a buyer."""
    return {"Authorization": f"Bearer {issue_token(secret, user_id)}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def signed(**claims: Any) -> dict[str, str]:
    """Authorization header with a JWT of exactly ``claims`` (plus an expiry in an hour)."""
    return bearer(jwt.encode({"exp": int(time.time()) + 3600, **claims}, JWT_SECRET, "HS256"))


def session_for(
    server: TestServer, connections: int = 100, request_seconds: float | None = None
) -> aiohttp.ClientSession:
    """A client session whose relative URLs go to ``server`` (``request_seconds``: how long a
    request may take in all, else the client library's default)."""
    connector = aiohttp.TCPConnector(limit=connections)
    if request_seconds is None:
        return aiohttp.ClientSession(base_url=server.make_url("/"), connector=connector)
    return aiohttp.ClientSession(
        base_url=server.make_url("/"),
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=request_seconds),
    )


@asynccontextmanager
async def serve(
    settings: Settings,
    client: RedisClient | None,
    connections: int = 100,
    request_seconds: float | None = None,
) -> AsyncIterator[aiohttp.ClientSession]:
    """The app on a free TCP port and a client session pointed at it."""
    server = TestServer(create_app(settings, client))
    async with server, session_for(server, connections, request_seconds) as session:
        yield session


async def expect_problem(
    response: aiohttp.ClientResponse, status: int, code: str | None = None
) -> dict[str, Any]:
    """Assert ``response`` is a problem+json with ``status`` (and ``code``); return its body."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/problem+json", text
    body: dict[str, Any] = json.loads(text)
    assert body.keys() >= PROBLEM_FIELDS, body
    assert body["status"] == status
    assert body["type"].endswith(body["code"])
    assert body["title"] and body["detail"]
    if code is not None:
        assert body["code"] == code, body
    return body


async def expect_verify_refused(http: aiohttp.ClientSession) -> None:
    """POST /v1/admin/verify answers 409 verify_running at once (it does not wait its turn)."""
    async with asyncio.timeout(10), http.post("/v1/admin/verify", headers=ADMIN) as r:
        body = await expect_problem(r, 409, "verify_running")
        assert body["detail"] == "a verify is running already"


@asynccontextmanager
async def verify_held_up(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """A verify run meanwhile waits on its first read: the archive is locked (ACCESS
    EXCLUSIVE) by a transaction open until the block exits."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        yield


async def redis_dump(client: RedisClient) -> dict[Any, Any]:
    """Every key of the database with its serialized value: equal dumps, equal state."""
    return {key: await client.dump(key) for key in await every_key(client)}


async def log_events(gateway: RedisGateway) -> list[AnyEvent]:
    """Every event of every partition's stream."""
    events: list[AnyEvent] = []
    for stream in gateway.stream_names():
        for _, fields in await gateway.client.xrange(stream) or []:
            assert fields is not None
            events.append(parse_event(fields[b"event"]))
    return events


async def placed_ids(gateway: RedisGateway) -> list[str]:
    """Reservation ids of every ``ReservationPlaced`` in the log."""
    return [e.reservation_id for e in await log_events(gateway) if isinstance(e, ReservationPlaced)]


async def sale_of(session: aiohttp.ClientSession, sale_id: str = "sale-1") -> dict[str, Any]:
    async with session.get(f"/v1/sales/{sale_id}") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def reserve(
    session: aiohttp.ClientSession,
    user: str,
    body: Any = None,
    key: str | None = None,
    sale_id: str = "sale-1",
) -> aiohttp.ClientResponse:
    """POST a reservation and return the response with its body already read."""
    headers = buyer(user)
    if key is not None:
        headers["Idempotency-Key"] = key
    async with session.post(
        f"/v1/sales/{sale_id}/reservations", json=body, headers=headers
    ) as response:
        await response.read()
        return response


def sale_body(**overrides: Any) -> dict[str, Any]:
    return {"sale_id": "sale-1", "stock": 10, **overrides}


ODD_BODIES: list[bytes] = [
    b"\xff\xfe\xfd",
    b"\xc3\x28",
    b"   ",
    b"[]",
    b"null",
    b'"qty"',
    b"true",
    b"1e999",
    b'{"qty": NaN}',
    b'{"qty": Infinity}',
    b'{"qty": 1e400}',
    b'{"qty": 100000000000000000000000000000}',
    b'{"qty": ' + b"9" * 5000 + b"}",
    b'{"qty": 1, "qty": "x"}',
    b'{"\xff": 1}',
    b'{"qty": "\\ud800"}',
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b"\x00",
]


async def raw_http(server: TestServer, request: bytes) -> tuple[int, bytes, bytes]:
    """Send raw bytes (the client library would refuse them); return status, head, body."""
    assert server.port is not None
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body
