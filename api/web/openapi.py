"""The OpenAPI 3.1 document served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from core.models import MAX_STOCK, SALE_ID_PATTERN, NewSale, ReservationView, SaleView

# The same patterns as the path and header checks in ``api.web.requests`` (a test keeps them equal).
RESERVATION_ID_PATTERN = r"^[0-9]{1,4}-[A-Za-z0-9]{1,128}$"
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_BUYER: list[dict[str, list[str]]] = [{"buyer": []}]
_ADMIN: list[dict[str, list[str]]] = [{"admin": []}]
_BUYER_OR_ADMIN = _BUYER + _ADMIN


def _problems(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": "problem",
            "content": {"application/problem+json": {"schema": _PROBLEM}},
        }
        for code in codes
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _body(ref: str, required: bool = True) -> dict[str, Any]:
    return {
        "required": required,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _path(name: str, pattern: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": pattern},
    }


SALE_ID = _path("sale_id", SALE_ID_PATTERN)
RESERVATION_ID = _path("reservation_id", RESERVATION_ID_PATTERN)


def _idempotency_key(description: str) -> dict[str, Any]:
    return {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
    }


def _with_changed(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "allOf": [
            {"$ref": f"#/components/schemas/{ref}"},
            {
                "type": "object",
                "required": ["changed"],
                "properties": {
                    "changed": {
                        "type": "boolean",
                        "description": "false when the call found the work already done",
                    }
                },
            },
        ],
    }


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "flashsale", "version": "1"},
    "components": {
        "securitySchemes": {
            "buyer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "admin": {"type": "http", "scheme": "bearer"},
        },
        "schemas": {
            "NewSale": NewSale.model_json_schema(),
            "Sale": SaleView.model_json_schema(),
            "Reservation": ReservationView.model_json_schema(),
            "ReservationRequest": {
                "type": "object",
                "properties": {"qty": {"type": "integer", "minimum": 1, "default": 1}},
                "additionalProperties": False,
            },
            "Placed": {
                "type": "object",
                "properties": {
                    "reservation_id": {"type": "string"},
                    "status": {"type": "string"},
                    "expires_at": {"type": "string", "format": "date-time"},
                },
            },
            "MyReservations": {
                "type": "object",
                "required": ["sale_id", "reservations"],
                "properties": {
                    "sale_id": {"type": "string"},
                    "reservations": {
                        "type": "array",
                        "description": "oldest first (placement time, then id), whatever"
                        " their status, pruned ones included",
                        "items": {"$ref": "#/components/schemas/Reservation"},
                    },
                },
            },
            "ReservationChange": _with_changed(
                "Reservation", "The reservation after a confirm or cancel call."
            ),
            "StockRequest": {
                "type": "object",
                "description": "Restock (delta > 0) or withdraw unsold stock (delta < 0).",
                "required": ["delta"],
                "properties": {
                    "delta": {
                        "type": "integer",
                        "minimum": -MAX_STOCK,
                        "maximum": MAX_STOCK,
                        "not": {"const": 0},
                    }
                },
                "additionalProperties": False,
            },
            "SaleChange": _with_changed("Sale", "The sale after a stock change or closing."),
            "Problem": {
                "type": "object",
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "code": {"type": "string"},
                },
            },
        },
    },
    "paths": {
        "/v1/sales": {
            "post": {
                "security": _ADMIN,
                "requestBody": _body("NewSale"),
                "responses": {
                    "201": _json("Sale", "created"),
                    **_problems(400, 401, 403, 409, 413, 415, 422),
                },
            }
        },
        "/v1/sales/{sale_id}": {
            "get": {
                "parameters": [SALE_ID],
                "responses": {"200": _json("Sale", "the sale"), **_problems(404)},
            }
        },
        "/v1/sales/{sale_id}/reservations": {
            "post": {
                "security": _BUYER,
                "parameters": [
                    SALE_ID,
                    _idempotency_key("a repeat with the same key returns the same reservation"),
                ],
                "requestBody": _body("ReservationRequest", required=False),
                "responses": {
                    "202": _json("Placed", "reservation held"),
                    # 503 unavailable after Redis stayed silent: the problem carries the
                    # reservation_id that was tried (and a Location); look it up first.
                    **_problems(400, 401, 404, 409, 413, 415, 422, 429, 503),
                },
            }
        },
        "/v1/sales/{sale_id}/reservations/mine": {
            "get": {
                "summary": "The caller's reservations in a sale, whatever their status (buyer).",
                "description": (
                    "Redis's reservations merged with the final ones already pruned from it,"
                    " read from PostgreSQL's orders (Redis's view wins for an id in both),"
                    " oldest first. 503 unavailable while PostgreSQL is out of reach: only it"
                    " can say which were pruned, and a partial list would look complete."
                ),
                "security": _BUYER,
                "parameters": [SALE_ID],
                "responses": {
                    "200": _json("MyReservations", "the buyer's reservations"),
                    **_problems(401, 404, 503),
                },
            }
        },
        "/v1/sales/{sale_id}/stock": {
            "post": {
                "summary": "Restock, or withdraw unsold stock (admin).",
                "security": _ADMIN,
                "parameters": [
                    SALE_ID,
                    _idempotency_key("a repeat with the same key changes nothing (changed: false)"),
                ],
                "requestBody": _body("StockRequest"),
                "responses": {
                    "200": _json("SaleChange", "the sale after the change"),
                    # 409 not_enough_unsold_stock: withdrawing more than remains unsold.
                    **_problems(400, 401, 403, 404, 409, 413, 415, 422, 503),
                },
            }
        },
        "/v1/sales/{sale_id}/close": {
            "post": {
                "summary": "Stop taking reservations now; pending ones keep their window (admin).",
                "security": _ADMIN,
                "parameters": [SALE_ID],
                "responses": {
                    "200": _json("SaleChange", "the sale, now ended"),
                    **_problems(401, 403, 404, 503),
                },
            }
        },
        "/v1/reservations/{reservation_id}": {
            "get": {
                "security": _BUYER_OR_ADMIN,
                "parameters": [RESERVATION_ID],
                "responses": {
                    "200": _json("Reservation", "the reservation"),
                    **_problems(401, 404),
                },
            }
        },
        "/v1/reservations/{reservation_id}/confirm": {
            "post": {
                "summary": "Pay for a pending reservation (its buyer or an admin).",
                "security": _BUYER_OR_ADMIN,
                "parameters": [RESERVATION_ID],
                "responses": {
                    "200": _json("ReservationChange", "confirmed (changed: false if it was)"),
                    # 409 reservation_expired / reservation_closed (it was cancelled).
                    **_problems(401, 404, 409, 503),
                },
            }
        },
        "/v1/reservations/{reservation_id}/cancel": {
            "post": {
                "summary": "Give a pending reservation's stock back (its buyer).",
                "security": _BUYER,
                "parameters": [RESERVATION_ID],
                "responses": {
                    "200": _json("ReservationChange", "cancelled (changed: false if it was)"),
                    # 409 reservation_expired / reservation_closed (it was confirmed).
                    **_problems(401, 404, 409, 503),
                },
            }
        },
        "/healthz": {"get": {"responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"responses": {"200": {"description": "ready"}, **_problems(503)}}},
        "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text"}}}},
        "/openapi.json": {"get": {"responses": {"200": {"description": "this document"}}}},
    },
}
