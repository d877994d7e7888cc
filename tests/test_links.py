"""The page addresses ``flashsale up`` and ``demo`` print."""

from __future__ import annotations

import jwt
import pytest

from api.cli.links import (
    ADMIN_TOKEN_FROM_ENV,
    PAGE_BUYER,
    admin_token_hint,
    base_url,
    buyer_page_url,
    page_lines,
)
from tests.helpers import JWT_SECRET


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080"),
        ("0.0.0.0", "http://127.0.0.1:8080"),
        ("::", "http://[::1]:8080"),
        ("::1", "http://[::1]:8080"),
        ("shop.example", "http://shop.example:8080"),
    ],
)
def test_the_base_url_is_one_a_browser_here_reaches(host: str, url: str) -> None:
    assert base_url(host, 8080) == url


def test_the_buyer_page_carries_the_token_in_the_fragment_only() -> None:
    url = buyer_page_url("http://127.0.0.1:8080", "spring.drop-1", "a.b.c")
    assert url == "http://127.0.0.1:8080/buy/spring.drop-1#token=a.b.c"


def test_the_lines_name_the_console_hint_and_a_token_of_the_page_buyer() -> None:
    lines = page_lines("http://h:1", JWT_SECRET, admin_token_hint(False), "s-1").splitlines()
    assert lines[0] == f"console:    http://h:1/console  (admin token: {ADMIN_TOKEN_FROM_ENV})"
    prefix = "buyer page: http://h:1/buy/s-1#token="
    assert lines[1].startswith(prefix)
    token = lines[1].removeprefix(prefix).split()[0]
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == PAGE_BUYER and claims["exp"] - claims["iat"] == 24 * 3600
    without_sale = page_lines("http://h:1", JWT_SECRET, admin_token_hint(True))
    assert "/buy/SALE_ID#token=" in without_sale and "in place of SALE_ID" in without_sale
    assert "the one printed above for this run" in without_sale
