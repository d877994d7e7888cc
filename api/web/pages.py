"""The pages people open in a browser: the operator console (``/console``) and the buyer
page (``/buy/{sale_id}``). Each is a static HTML file with its script and style beside it
in ``api/web/static``, shipped in the package and served as they are: no build step on the
user's machine, and nothing fetched from elsewhere at run time (the Content-Security-Policy
says so to the browser too). The pages talk to the JSON API like any other client."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from api.web.openapi import Answer, documented
from api.web.requests import ASSET_NAME, sale_id_of

STATIC = Path(__file__).with_name("static")

# What each shipped file is served as; a name not here is not found.
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
ASSETS: dict[str, str] = {
    path.name: MEDIA_TYPES[path.suffix]
    for path in sorted(STATIC.iterdir())
    if path.suffix in MEDIA_TYPES and path.suffix != ".html"
}

# Scripts, styles and requests only from this origin; no inline script; no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with the package: the browser asks again each time.
    "Cache-Control": "no-cache",
}

_HTML_ANSWER = Answer(200, "the page", media_type="text/html")


def _file(name: str, media_type: str) -> web.FileResponse:
    return web.FileResponse(
        STATIC / name, headers={"Content-Type": f"{media_type}; charset=utf-8", **SECURITY_HEADERS}
    )


@documented("The operator console (HTML; it asks for the admin token).", _HTML_ANSWER)
async def console_page(request: web.Request) -> web.FileResponse:
    """The operator console: every sale live, the consumers' health, verify, and the admin
    writes. The page asks for the admin token and keeps it for the browser session."""
    return _file("console.html", "text/html")


@documented(
    "The buyer page of a sale (HTML; it asks for the buyer's token).",
    _HTML_ANSWER,
    problems=("sale_not_found",),
)
async def buy_page(request: web.Request) -> web.FileResponse:
    """The buyer page of one sale. The page reads the sale id from its own address, so any
    well-formed id gets the page, and the page says when the sale does not exist."""
    sale_id_of(request)
    return _file("buy.html", "text/html")


@documented(
    "A script or style sheet of the pages.",
    Answer(200, "the script or style sheet", media_type=("text/javascript", "text/css")),
    problems=("not_found",),
)
async def asset(request: web.Request) -> web.FileResponse:
    """One of the files the pages load; a name not shipped is not found."""
    name = request.match_info["name"]
    if not ASSET_NAME.fullmatch(name) or name not in ASSETS:
        raise web.HTTPNotFound()
    return _file(name, ASSETS[name])


def add_routes(router: web.UrlDispatcher) -> None:
    """The pages' routes: after the API's, which are the hot ones."""
    router.add_get("/console", console_page)
    router.add_get("/buy/{sale_id}", buy_page)
    router.add_get("/assets/{name}", asset)
