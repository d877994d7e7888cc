"""Reading a request: its JSON body, validated into a model, and its path parameters and
headers, each refused with the answer the API documents (400/413/415/422, or not found for
an id that cannot exist)."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from core.errors import ReservationNotFound, SaleNotFound
from core.models import SALE_ID_PATTERN

# The OpenAPI document publishes these patterns for the path parameters and the header.
IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
SALE_ID = re.compile(SALE_ID_PATTERN)
RESERVATION_ID = re.compile(r"^[0-9]{1,4}-[A-Za-z0-9]{1,128}$")
ASSET_NAME = re.compile(r"^[a-z0-9-]{1,64}\.(js|css)$")
M = TypeVar("M", bound=BaseModel)


class BadRequest(Exception):
    """The request body or a parameter is malformed (400/422)."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra


async def read_model(request: web.Request, model: type[M]) -> M:
    """The request's JSON body validated into ``model`` straight from the bytes.

    One pass of pydantic's own parser on the raw body; a body it does not accept goes the
    long way (``json.loads`` then ``validate``) so every 400/422 answer stays the same.
    The models validate JSON values alike both ways (``core.models.Whole``, ``Moment``).
    """
    raw = await _raw_json(request)
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        return validate(model, _loads(raw))


async def _raw_json(request: web.Request) -> bytes:
    if request.content_type != "application/json":
        raise BadRequest(415, "unsupported_media_type", "send the body as application/json")
    return await request.read()


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, "malformed_json", f"body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise BadRequest(400, "malformed_json", "body is nested too deeply") from e


def validate(model: type[M], data: Any) -> M:
    """Validate ``data`` into ``model`` or raise a 422 ``BadRequest`` listing the errors."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _invalid_body(e) from e


def _invalid_body(error: ValidationError) -> BadRequest:
    errors = [
        {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in error.errors(include_url=False, include_context=False, include_input=False)
    ]
    return BadRequest(422, "invalid_body", "the body failed validation", errors=errors)


def sale_id_of(request: web.Request) -> str:
    """The ``sale_id`` path parameter; an id that cannot exist is simply not found."""
    sale_id = request.match_info["sale_id"]
    if not SALE_ID.fullmatch(sale_id):
        raise SaleNotFound(f"no sale {sale_id[:80]!r}")
    return sale_id


def reservation_id_of(request: web.Request) -> str:
    """The ``reservation_id`` path parameter; an id that cannot exist is simply not found."""
    rid = request.match_info["reservation_id"]
    if not RESERVATION_ID.fullmatch(rid):
        raise ReservationNotFound(f"no reservation {rid[:80]!r} of yours")
    return rid


def idempotency_key_of(request: web.Request) -> str | None:
    """The optional ``Idempotency-Key`` header, or a 400 ``BadRequest`` if malformed."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequest(400, "bad_idempotency_key", "Idempotency-Key: 1-128 of [A-Za-z0-9_.:-]")
    return key
