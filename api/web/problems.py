"""RFC 9457 problem responses; the only place errors become HTTP."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from api.web.auth import AuthError
from api.web.requests import BadRequest
from api.web.state import METRICS
from core import errors

log = structlog.get_logger(__name__)

PROBLEM_TYPE = "application/problem+json"

_STATUS_OF: dict[type[errors.FlashsaleError], int] = {
    errors.SaleNotFound: 404,
    errors.ReservationNotFound: 404,
    errors.SaleExists: 409,
    errors.SaleNotActive: 409,
    errors.SoldOut: 409,
    errors.LimitReached: 409,
    errors.ReservationPastDeadline: 409,
    errors.ReservationClosed: 409,
    errors.NotEnoughUnsoldStock: 409,
    errors.IdempotencyKeyReused: 422,
    errors.InfrastructureError: 503,
}

_TITLE_OF: dict[str, str] = {
    "sale_not_found": "Sale not found",
    "reservation_not_found": "Reservation not found",
    "sale_exists": "Sale already exists",
    "sale_not_active": "Sale is not active",
    "sold_out": "Sold out",
    "limit_reached": "Per-user limit reached",
    "unavailable": "Service temporarily unavailable",
    "reservation_expired": "Reservation expired",
    "reservation_closed": "Reservation already closed",
    "not_enough_unsold_stock": "Not enough unsold stock",
}


def problem(status: int, code: str, title: str, detail: str = "", **extra: Any) -> web.Response:
    """A problem+json response."""
    if extra:
        text = _problem_json(status, code, title, detail or title, **extra)
    else:
        text = _plain_problem_json(status, code, title, detail or title)
    return web.Response(text=text, status=status, content_type=PROBLEM_TYPE)


def _problem_json(status: int, code: str, title: str, detail: str, **extra: Any) -> str:
    body = {
        "type": f"https://flashsale.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return json.dumps(body)


@functools.lru_cache(maxsize=256)
def _plain_problem_json(status: int, code: str, title: str, detail: str) -> str:
    """The common refusals (sold_out above all) repeat the same few bodies: each is
    serialized once."""
    return _problem_json(status, code, title, detail)


# Every domain error that reaches ``from_error`` from a view: its code is answered over HTTP.
ANSWERED_ERRORS: tuple[type[errors.FlashsaleError], ...] = (
    *errors.REJECTIONS.values(),
    errors.InfrastructureError,
    errors.Unreplicated,
)

# The codes spelled here and in the views rather than by an error class, with their status.
SPELLED_CODES: dict[str, int] = {
    "malformed_json": 400,
    "bad_idempotency_key": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "verify_running": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_body": 422,
    "turned_away": 429,
    "internal_error": 500,
    "not_ready": 503,
}

# Headers every answer with the code carries (``from_error`` adds Retry-After to each 503).
HEADERS_OF_CODE: dict[str, tuple[str, ...]] = {
    "unauthorized": ("WWW-Authenticate",),
    "turned_away": ("Retry-After",),
    "unavailable": ("Retry-After",),
    "not_replicated": ("Retry-After", "Location"),
}


def problem_codes() -> dict[str, int]:
    """Every problem code the API can answer, with its HTTP status."""
    codes = {kind.code: _status_and_title(kind)[0] for kind in ANSWERED_ERRORS}
    return codes | SPELLED_CODES


class FieldError(BaseModel):
    """One reason a body failed validation."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem: every error answer, as ``application/problem+json``."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="https://flashsale.dev/problems/{code}")
    title: str
    status: int
    detail: str
    code: str = Field(description="what went wrong, one of the codes listed per status")
    errors: list[FieldError] = Field(
        default_factory=list, description="invalid_body only: each reason, pydantic's"
    )
    reservation_id: str = Field(
        default="",
        description="not_replicated: the reservation placed, confirmed or cancelled; and"
        " unavailable from a placement: the id it tried; look it up before trying again",
    )
    sale_id: str = Field(
        default="",
        description="not_replicated from an admin's write: the sale opened, restocked or closed",
    )


# Status and title of each error class met so far (the lookup walks the class's bases).
_ANSWER_OF: dict[type[errors.FlashsaleError], tuple[int, str]] = {}


def _status_and_title(kind: type[errors.FlashsaleError]) -> tuple[int, str]:
    known = _ANSWER_OF.get(kind)
    if known is None:
        status = next((s for cls, s in _STATUS_OF.items() if issubclass(kind, cls)), 400)
        title = _TITLE_OF.get(kind.code, kind.code.replace("_", " ").capitalize())
        known = _ANSWER_OF[kind] = (status, title)
    return known


def from_error(error: errors.FlashsaleError) -> web.Response:
    """Map a domain error to its problem response."""
    status, title = _status_and_title(type(error))
    detail = str(error) or (error.__doc__ or title).strip()
    # A write not replicated stands on the primary: the answer names it, and where it is.
    if isinstance(error, errors.NotReplicated):
        rid = error.reservation_id
        response = problem(status, error.code, title, detail, reservation_id=rid)
        response.headers["Location"] = f"/v1/reservations/{rid}"
    elif isinstance(error, errors.SaleNotReplicated):
        response = problem(status, error.code, title, detail, sale_id=error.sale_id)
        response.headers["Location"] = f"/v1/sales/{error.sale_id}"
    else:
        response = problem(status, error.code, title, detail)
    if status == 503:
        response.headers["Retry-After"] = "1"
    return response


@web.middleware
async def problems_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn every error into problem+json and record request metrics."""
    metrics = request.app[METRICS]
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except errors.RejectedError as e:
        response = from_error(e)
    except errors.FlashsaleError as e:
        log.warning("request_failed", path=request.path, error=str(e))
        response = from_error(e)
    except BadRequest as e:
        title = e.code.replace("_", " ").capitalize()
        response = problem(e.status, e.code, title, e.detail, **e.extra)
    except AuthError as e:
        code = "unauthorized" if e.status == 401 else "forbidden"
        response = problem(e.status, code, code.capitalize(), e.detail)
        if e.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="flashsale"'
    except web.HTTPRequestEntityTooLarge as e:
        response = problem(413, "body_too_large", "Request body too large", e.text or "")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = (e.reason or "error").lower().replace(" ", "_")
        response = problem(e.status, code, e.reason or "Error", e.text or e.reason or "")
        for name in ("Allow",):
            if name in e.headers:
                response.headers[name] = e.headers[name]
    except Exception:
        log.exception("unhandled_error", path=request.path, method=request.method)
        response = problem(500, "internal_error", "Internal error", "unexpected server error")
    metrics.record(route_name, response.status, time.perf_counter() - started)
    return response
