"""The addresses of the pages that ``flashsale up`` and ``flashsale demo`` print: the
operator console, and a buyer page carrying a buyer token minted for the run.

The token goes after the ``#`` of the address (``#token=...``): a browser never sends the
fragment to a server, and the page takes it off the address bar once it has read it.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import quote

from api.web.auth import issue_token

# The buyer whose token the printed buyer page carries, and how long that token lasts.
PAGE_BUYER = "web-buyer"
PAGE_TOKEN_TTL_SECONDS = 24 * 3600
# Stands for a sale's id in the buyer page address that ``up`` prints (it has no sale yet).
SALE_PLACEHOLDER = "SALE_ID"
# Where the console's admin token is: set by the user, or made for the run and printed.
ADMIN_TOKEN_FROM_ENV = "$FLASHSALE_ADMIN_TOKEN"
ADMIN_TOKEN_PRINTED = "the one printed above for this run"


def base_url(host: str, port: int) -> str:
    """``http://host:port`` as a browser on this machine reaches it: a wildcard bind address
    (0.0.0.0, ::) is reached at the loopback address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
    shown = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{shown}:{port}"


def buyer_page_url(base: str, sale_id: str, token: str) -> str:
    """The buyer page of ``sale_id`` with ``token`` in the fragment."""
    return f"{base}/buy/{quote(sale_id, safe='')}#token={token}"


def page_lines(base: str, jwt_secret: str, admin_hint: str, sale_id: str | None = None) -> str:
    """The lines printed for people: the console (and where its admin token is), and the
    buyer page of ``sale_id`` (else of a placeholder to replace) signed in as PAGE_BUYER."""
    token = issue_token(jwt_secret, PAGE_BUYER, PAGE_TOKEN_TTL_SECONDS)
    page = buyer_page_url(base, sale_id or SALE_PLACEHOLDER, token)
    whose = f'buyer "{PAGE_BUYER}", token valid 24 h'
    if sale_id is None:
        whose += f"; put a sale's id in place of {SALE_PLACEHOLDER}"
    return f"console:    {base}/console  (admin token: {admin_hint})\nbuyer page: {page}  ({whose})"


def admin_token_hint(generated: bool) -> str:
    """Where the admin token the console asks for comes from."""
    return ADMIN_TOKEN_PRINTED if generated else ADMIN_TOKEN_FROM_ENV
