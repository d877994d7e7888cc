"""The OpenAPI 3.1 document served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from core.models import NewSale, ReservationView, SaleView

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


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
                "security": [{"admin": []}],
                "requestBody": {
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/NewSale"}}
                    }
                },
                "responses": {
                    "201": _json("Sale", "created"),
                    **_problems(400, 401, 403, 409, 413, 415, 422),
                },
            }
        },
        "/v1/sales/{sale_id}": {
            "get": {
                "parameters": [{"name": "sale_id", "in": "path", "required": True}],
                "responses": {"200": _json("Sale", "the sale"), **_problems(404)},
            }
        },
        "/v1/sales/{sale_id}/reservations": {
            "post": {
                "security": [{"buyer": []}],
                "parameters": [
                    {"name": "sale_id", "in": "path", "required": True},
                    {"name": "Idempotency-Key", "in": "header", "required": False},
                ],
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ReservationRequest"}
                        }
                    }
                },
                "responses": {
                    "202": _json("Placed", "reservation held"),
                    **_problems(400, 401, 404, 409, 413, 415, 422, 429, 503),
                },
            }
        },
        "/v1/reservations/{reservation_id}": {
            "get": {
                "security": [{"buyer": []}, {"admin": []}],
                "parameters": [{"name": "reservation_id", "in": "path", "required": True}],
                "responses": {
                    "200": _json("Reservation", "the reservation"),
                    **_problems(401, 404),
                },
            }
        },
        "/healthz": {"get": {"responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"responses": {"200": {"description": "ready"}, **_problems(503)}}},
        "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text"}}}},
    },
}
