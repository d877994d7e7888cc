"""RFC 9457 problem responses; the only place errors become HTTP."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from core import errors

PROBLEM_TYPE = "application/problem+json"

_STATUS_OF: dict[type[errors.FlashsaleError], int] = {
    errors.SaleNotFound: 404,
    errors.ReservationNotFound: 404,
    errors.SaleExists: 409,
    errors.SaleNotActive: 409,
    errors.SoldOut: 409,
    errors.LimitReached: 409,
    errors.ReservationExpired: 409,
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
    body = {
        "type": f"https://flashsale.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail or title,
        "code": code,
        **extra,
    }
    return web.json_response(body, status=status, content_type=PROBLEM_TYPE)


def from_error(error: errors.FlashsaleError) -> web.Response:
    """Map a domain error to its problem response."""
    status = next((s for cls, s in _STATUS_OF.items() if isinstance(error, cls)), 400)
    title = _TITLE_OF.get(error.code, error.code.replace("_", " ").capitalize())
    detail = str(error) or (error.__doc__ or title).strip()
    headers = {"Retry-After": "1"} if status == 503 else None
    response = problem(status, error.code, title, detail)
    if headers:
        response.headers.update(headers)
    return response
