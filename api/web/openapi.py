"""The OpenAPI 3.1 document served at ``/openapi.json``, generated once at start-up.

Nothing here repeats a schema. The paths and methods come from the app's route table; the
bodies from the JSON schema of the pydantic models the views validate with and answer
with; the path parameters and the Idempotency-Key header from the patterns the views
check them with; the problem codes and their statuses from ``api.web.problems``. What only
a view knows (who may call it, its answers, the codes it can answer, its links to other
operations) it declares next to itself with ``@documented``; a route whose handler
declared nothing, a code not in the catalogue or a link to no operation fails the build.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from api.web.problems import HEADERS_OF_CODE, PROBLEM_TYPE, Problem, problem_codes
from api.web.requests import ASSET_NAME, IDEMPOTENCY_KEY, RESERVATION_ID, SALE_ID
from core.models import NewSale

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)

# How a caller proves who they are: the names ``@documented(auth=...)`` takes.
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "buyer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "HS256 with FLASHSALE_JWT_SECRET; sub is the user id, exp required",
    },
    "admin": {
        "type": "http",
        "scheme": "bearer",
        "description": "FLASHSALE_ADMIN_TOKEN",
    },
}

# Each path parameter's pattern: the one the view checks it with (else it is not found);
# and an example, where one can exist before the API runs (the sale NewSale's example opens).
PATH_PATTERNS: dict[str, str] = {
    "sale_id": SALE_ID.pattern,
    "reservation_id": RESERVATION_ID.pattern,
    "name": ASSET_NAME.pattern,
}
PATH_EXAMPLES: dict[str, Any] = {
    "sale_id": (NewSale.model_fields["sale_id"].examples or [None])[0],
    "name": "pages.css",  # the pages' style sheet (api/web/static)
}

RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "Location": {
        "description": "the resource this answer is about",
        "schema": {"type": "string", "pattern": "^/v1/"},
    },
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "WWW-Authenticate": {
        "description": "the scheme to authenticate with",
        "schema": {"type": "string"},
    },
}

# Answers that any route, or none, can give: documented once, outside the operations.
ROUTER_CODES = ("not_found", "method_not_allowed", "internal_error")
BODY_CODES = ("malformed_json", "body_too_large", "unsupported_media_type", "invalid_body")


@dataclass(frozen=True)
class Link:
    """An operation this answer leads to: its operation id (a handler's name) and where
    each of its parameters comes from (an OpenAPI runtime expression)."""

    operation: str
    parameters: Mapping[str, str]
    description: str = ""


@dataclass(frozen=True)
class Answer:
    """A success answer: its body's model (None: not JSON), its media type (or the types it
    can have), headers always present, links."""

    status: int
    description: str
    model: type[BaseModel] | None = None
    media_type: str | tuple[str, ...] = "application/json"
    headers: tuple[str, ...] = ()
    links: Mapping[str, Link] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    """What a view declares about itself for the document."""

    summary: str
    answers: tuple[Answer, ...]
    auth: tuple[str, ...] = ()
    body: type[BaseModel] | None = None
    body_required: bool = True
    idempotency_key: str | None = None
    problems: tuple[str, ...] = ()
    description: str = ""

    def codes(self) -> tuple[str, ...]:
        """Every problem code of this operation: its own, and those its auth, body and
        Idempotency-Key imply."""
        implied: list[str] = []
        if self.auth:
            implied.append("unauthorized")
        if self.auth == ("admin",):
            implied.append("forbidden")
        if self.body is not None:
            implied.extend(BODY_CODES)
        if self.idempotency_key is not None:
            implied.append("bad_idempotency_key")
        return tuple(dict.fromkeys([*implied, *self.problems]))


_OPERATIONS: dict[Callable[..., Any], Operation] = {}


def documented(
    summary: str,
    answers: tuple[Answer, ...] | Answer,
    *,
    auth: tuple[str, ...] = (),
    body: type[BaseModel] | None = None,
    body_required: bool = True,
    idempotency_key: str | None = None,
    problems: tuple[str, ...] = (),
    description: str = "",
) -> Callable[[H], H]:
    """Declare a view's operation for the document (``auth``: the schemes of
    ``SECURITY_SCHEMES`` it takes, any one; ``problems``: codes of
    ``api.web.problems.problem_codes`` beyond those its auth and body imply). The view
    itself is returned unchanged, so a request pays nothing for it."""
    operation = Operation(
        summary,
        answers if isinstance(answers, tuple) else (answers,),
        auth,
        body,
        body_required,
        idempotency_key,
        problems,
        description,
    )

    def register(handler: H) -> H:
        _OPERATIONS[handler] = operation
        return handler

    return register


def operation_of(handler: Callable[..., Any]) -> Operation | None:
    """What ``handler`` declared with ``@documented``, if anything."""
    return _OPERATIONS.get(handler)


class _Components:
    """The named schemas of the document, built by pydantic in one pass."""

    def __init__(self, models: list[tuple[type[BaseModel], JsonSchemaMode]]) -> None:
        unique = list(dict.fromkeys(models))
        refs, definitions = models_json_schema(unique, ref_template="#/components/schemas/{model}")
        self.refs = refs
        self.schemas: dict[str, Any] = definitions.get("$defs", {})

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(self.refs[(model, mode)])


def document(router: web.UrlDispatcher, version: str = "1") -> dict[str, Any]:
    """The OpenAPI document of every route in ``router``."""
    routes = [
        (resource.canonical, route.method.lower(), route.handler)
        for resource in router.resources()
        for route in resource
        if route.method != "HEAD"  # aiohttp adds one beside each GET
    ]
    operations: list[tuple[str, str, str, Operation]] = []
    for path, method, handler in routes:
        operation = operation_of(handler)
        if operation is None:
            raise LookupError(f"{method.upper()} {path}: its view is not @documented")
        operations.append((path, method, getattr(handler, "__name__", path), operation))
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(Problem, "serialization")]
    components = _Components(
        models
        + [(op.body, "validation") for *_, op in operations if op.body is not None]
        + [
            (answer.model, "serialization")
            for *_, op in operations
            for answer in op.answers
            if answer.model is not None
        ]
    )
    catalogue = problem_codes()
    ids = {operation_id for _, _, operation_id, _ in operations}
    paths: dict[str, dict[str, Any]] = {}
    for path, method, operation_id, operation in operations:
        paths.setdefault(path, {})[method] = _operation(
            path, operation_id, operation, components, catalogue, ids
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flashsale",
            "version": version,
            "description": "Errors are application/problem+json; x-problem-codes lists"
            " every code with its status.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": SECURITY_SCHEMES,
            "schemas": components.schemas,
            "responses": {
                code: _problem_response(catalogue, [code], components) for code in ROUTER_CODES
            },
        },
        "x-problem-codes": {code: {"status": status} for code, status in catalogue.items()},
    }


def _operation(
    path: str,
    operation_id: str,
    operation: Operation,
    components: _Components,
    catalogue: dict[str, int],
    ids: set[str],
) -> dict[str, Any]:
    for scheme in operation.auth:
        if scheme not in SECURITY_SCHEMES:
            raise LookupError(f"{operation_id}: no security scheme {scheme!r}")
    parameters: list[dict[str, Any]] = []
    for name in re.findall(r"{(\w+)}", path):
        if name not in PATH_PATTERNS:
            raise LookupError(f"{path}: no pattern for the path parameter {name!r}")
        schema = {"type": "string", "pattern": PATH_PATTERNS[name]}
        parameter = {"name": name, "in": "path", "required": True, "schema": schema}
        if PATH_EXAMPLES.get(name) is not None:
            parameter["example"] = PATH_EXAMPLES[name]
        parameters.append(parameter)
    if operation.idempotency_key is not None:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": operation.idempotency_key,
                "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY.pattern},
            }
        )
    responses: dict[str, Any] = {}
    for answer in operation.answers:
        responses[str(answer.status)] = _answer(answer, components, ids)
    by_status: dict[int, list[str]] = {}
    for code in operation.codes():
        if code not in catalogue:
            raise LookupError(f"{operation_id}: problem code {code!r} is not in the catalogue")
        by_status.setdefault(catalogue[code], []).append(code)
    for status, codes in sorted(by_status.items()):
        responses[str(status)] = _problem_response(catalogue, codes, components)
    spec: dict[str, Any] = {
        "operationId": operation_id,
        "summary": operation.summary,
        "security": [{scheme: []} for scheme in operation.auth],
        "parameters": parameters,
        "responses": responses,
    }
    if operation.description:
        spec["description"] = operation.description
    if operation.body is not None:
        spec["requestBody"] = {
            "required": operation.body_required,
            "content": {
                "application/json": {"schema": components.ref(operation.body, "validation")}
            },
        }
    return spec


def _answer(answer: Answer, components: _Components, ids: set[str]) -> dict[str, Any]:
    schema = (
        components.ref(answer.model, "serialization")
        if answer.model is not None
        else {"type": "string"}
    )
    spec: dict[str, Any] = {
        "description": answer.description,
        "content": {
            media_type: {"schema": schema}
            for media_type in (
                (answer.media_type,) if isinstance(answer.media_type, str) else answer.media_type
            )
        },
    }
    if answer.headers:
        spec["headers"] = {name: _header(name, required=True) for name in answer.headers}
    if answer.links:
        for name, link in answer.links.items():
            if link.operation not in ids:
                raise LookupError(f"link {name!r} leads to no operation {link.operation!r}")
        spec["links"] = {
            name: {
                "operationId": link.operation,
                "parameters": dict(link.parameters),
                "description": link.description or name,
            }
            for name, link in answer.links.items()
        }
    return spec


def _header(name: str, required: bool) -> dict[str, Any]:
    return {**RESPONSE_HEADERS[name], "required": required}


def _problem_response(
    catalogue: dict[str, int], codes: list[str], components: _Components
) -> dict[str, Any]:
    """The answer of one status: a problem whose ``code`` is one of ``codes``, with the
    headers every one of them carries (required) or some carry (optional)."""
    schema = {
        "allOf": [
            components.ref(Problem, "serialization"),
            {"properties": {"code": {"enum": codes}}},
        ]
    }
    spec: dict[str, Any] = {
        "description": ", ".join(codes),
        "content": {PROBLEM_TYPE: {"schema": schema}},
    }
    carried = [set(HEADERS_OF_CODE.get(code, ())) for code in codes]
    always = set.intersection(*carried) if carried else set()
    some = set.union(*carried) if carried else set()
    if some:
        spec["headers"] = {name: _header(name, name in always) for name in sorted(some)}
    return spec
