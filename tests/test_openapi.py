"""The OpenAPI document covers the app: every route of its router, every problem code the
API can answer (with its status), the models' own schemas, and the links stateful testing
follows. The document is generated; these tests keep the generator honest."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic.json_schema import models_json_schema

from api.web import problems
from api.web.app import create_app
from api.web.openapi import ROUTER_CODES, document, documented
from api.web.reservations import ReservationRequest
from api.web.sales import StockRequest
from core import errors
from core.models import NewSale
from core.settings import Settings

WEB = Path(__file__).resolve().parent.parent / "api" / "web"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return document(create_app(Settings()).router)


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    }


def _codes_by_status(responses: dict[str, Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for status, response in responses.items():
        for media in response.get("content", {}).values():
            for part in media["schema"].get("allOf", []):
                enum = part.get("properties", {}).get("code", {}).get("enum", [])
                found.setdefault(status, set()).update(enum)
    return found


def test_every_route_of_the_router_is_documented_and_nothing_else(spec: dict[str, Any]):
    router = create_app(Settings()).router
    routes = {
        (route.method, resource.canonical)
        for resource in router.resources()
        for route in resource
        if route.method != "HEAD"
    }
    assert set(_operations(spec)) == routes


async def test_the_served_document_is_the_generated_one(
    http: aiohttp.ClientSession, spec: dict[str, Any]
):
    async with http.get("/openapi.json") as r:
        assert (r.status, r.content_type) == (200, "application/json")
        assert await r.json() == json.loads(json.dumps(spec))


def test_every_problem_code_is_documented_with_its_status(spec: dict[str, Any]):
    catalogue = problems.problem_codes()
    assert spec["x-problem-codes"] == {
        code: {"status": status} for code, status in catalogue.items()
    }
    documented_codes: dict[str, set[str]] = {}
    for operation in _operations(spec).values():
        for status, codes in _codes_by_status(operation["responses"]).items():
            for code in codes:
                documented_codes.setdefault(code, set()).add(status)
    for code in ROUTER_CODES:
        response = spec["components"]["responses"][code]
        for status, codes in _codes_by_status({str(catalogue[code]): response}).items():
            assert codes == {code}
            documented_codes.setdefault(code, set()).add(status)
    assert documented_codes == {code: {str(status)} for code, status in catalogue.items()}


def test_the_catalogue_holds_every_code_the_code_spells():
    """Every ``problem(...)`` and ``BadRequest(...)`` in api/web with a literal status and
    code, every domain error, and the auth answers are in the catalogue with that status."""
    catalogue = problems.problem_codes()
    spelled = set()
    for source in WEB.glob("*.py"):
        text = source.read_text()
        for status, code in re.findall(r'(?:problem|BadRequest)\(\s*(\d{3}),\s*"(\w+)"', text):
            spelled.add((code, int(status)))
    assert spelled, "the pattern found nothing: the views changed shape"
    assert {(code, catalogue.get(code)) for code, _ in spelled} == spelled
    # The errors of core.errors that the views let through (the others refuse to start, or
    # belong to the daemons and the replay tools, which answer no HTTP).
    reachable = {
        cls
        for cls in _subclasses(errors.FlashsaleError)
        if cls.__module__ == errors.__name__ and cls.code != "error"
    }
    configuration = {errors.ConfigurationError, errors.DurabilityError}
    for kind in reachable - configuration:
        assert kind in problems.ANSWERED_ERRORS or kind.code in catalogue, kind
        error = kind.__new__(kind)  # no arguments needed: only its class decides the status
        if isinstance(error, errors.SaleNotReplicated):  # its answer names the sale
            error = errors.SaleNotReplicated("sale-1", 0, 1, "create")
        elif isinstance(error, errors.NotReplicated):  # its answer names the reservation
            error = errors.NotReplicated("0-ab", 0, 1, "reserve")
        response = problems.from_error(error)
        assert catalogue[kind.code] == response.status, kind
    assert {catalogue["unauthorized"], catalogue["forbidden"]} == {401, 403}


def _subclasses(kind: type[errors.FlashsaleError]) -> set[type[errors.FlashsaleError]]:
    found = set(kind.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_the_bodies_are_the_models_own_schemas(spec: dict[str, Any]):
    schemas = spec["components"]["schemas"]
    for model in (NewSale, StockRequest, ReservationRequest):
        _, definitions = models_json_schema(
            [(model, "validation")], ref_template="#/components/schemas/{model}"
        )
        for name, schema in definitions["$defs"].items():
            assert schemas[name] == schema, name


def test_the_headers_are_documented(spec: dict[str, Any]):
    operations = _operations(spec)
    reserve = operations[("POST", "/v1/sales/{sale_id}/reservations")]
    (key,) = [p for p in reserve["parameters"] if p["in"] == "header"]
    assert key["name"] == "Idempotency-Key"
    assert reserve["security"] == [{"buyer": []}]
    assert reserve["responses"]["202"]["headers"]["Location"]["required"] is True
    unavailable = reserve["responses"]["503"]["headers"]
    assert unavailable["Retry-After"]["required"] is True
    assert unavailable["Location"]["required"] is False  # only with the reservation it tried
    assert reserve["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    assert reserve["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True
    created = operations[("POST", "/v1/sales")]["responses"]["201"]
    assert created["headers"]["Location"]["required"] is True
    assert "Retry-After" not in operations[("GET", "/readyz")]["responses"]["503"].get(
        "headers", {}
    )
    for (_, path), operation in operations.items():
        if operation["security"]:
            assert "401" in operation["responses"], path


def test_links_lead_from_a_sale_to_its_reservations_and_on(spec: dict[str, Any]):
    operations = _operations(spec)

    def targets(method: str, path: str, status: str) -> set[str]:
        links = operations[(method, path)]["responses"][status].get("links", {})
        return {link["operationId"] for link in links.values()}

    assert {"reserve", "get_sale", "my_reservations", "adjust_stock", "close_sale"} <= targets(
        "POST", "/v1/sales", "201"
    )
    assert {"get_reservation", "confirm_reservation", "cancel_reservation"} <= targets(
        "POST", "/v1/sales/{sale_id}/reservations", "202"
    )
    assert {"confirm_reservation", "cancel_reservation"} <= targets(
        "GET", "/v1/reservations/{reservation_id}", "200"
    )


def test_an_undocumented_route_or_code_fails_the_build():
    async def undocumented(request: web.Request) -> web.Response:
        return web.Response()

    app = create_app(Settings())
    app.router.add_get("/v1/extra", undocumented)
    with pytest.raises(LookupError, match="not @documented"):
        document(app.router)

    @documented("Answers a code nobody listed.", (), problems=("no_such_code",))
    async def unknown_code(request: web.Request) -> web.Response:
        return web.Response()

    app = create_app(Settings())
    app.router.add_get("/v1/extra", unknown_code)
    with pytest.raises(LookupError, match="no_such_code"):
        document(app.router)


def test_payment_and_cancellation_document_their_not_replicated_answer(spec: dict[str, Any]):
    """Under FLASHSALE_WAIT_REPLICAS confirm and cancel answer 503 not_replicated too, with
    Retry-After and the reservation's Location, and say that the same request again is safe."""
    operations = _operations(spec)
    for action in ("confirm", "cancel"):
        operation = operations[("POST", f"/v1/reservations/{{reservation_id}}/{action}")]
        codes = _codes_by_status(operation["responses"])["503"]
        assert codes == {"not_replicated", "unavailable"}, action
        headers = operation["responses"]["503"]["headers"]
        assert headers["Retry-After"]["required"] is True
        assert headers["Location"]["required"] is False  # not_replicated only
        assert "repeating the same request is safe" in operation["description"]
