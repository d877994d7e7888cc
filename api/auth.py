"""Who is calling: buyers by JWT (HS256, ``sub`` is the user id), admins by bearer token."""

from __future__ import annotations

import hmac
import re

import jwt
from aiohttp import web

USER_ID = re.compile(r"^[A-Za-z0-9_.@+-]{1,128}$")


class AuthError(Exception):
    """The caller is not authenticated (401) or not allowed (403)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _token(request: web.Request) -> str | None:
    """The bearer token of the request, or None when there is none.

    Tokens are ASCII (RFC 6750); a header with other bytes arrives here as surrogate
    escapes, which cannot be encoded, so it is treated as no token at all.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or not token.isascii():
        return None
    return token


def bearer(request: web.Request) -> str:
    """The bearer token of the request, or raise a 401 ``AuthError``."""
    token = _token(request)
    if token is None:
        raise AuthError(401, "missing or malformed bearer token in the Authorization header")
    return token


def is_admin(request: web.Request, admin_token: str) -> bool:
    """True when the request carries the admin token."""
    token = _token(request)
    return token is not None and hmac.compare_digest(token.encode(), admin_token.encode())


def require_admin(request: web.Request, admin_token: str) -> None:
    """Raise 401 without a token, 403 with a wrong one."""
    bearer(request)
    if not is_admin(request, admin_token):
        raise AuthError(403, "admin token required")


def buyer_id(request: web.Request, secret: str) -> str:
    """The user id (``sub``) of a valid buyer JWT, or raise 401."""
    token = bearer(request)
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["sub", "exp"]}, leeway=5
        )
    except jwt.PyJWTError as e:
        raise AuthError(401, f"invalid token: {e}") from e
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USER_ID.fullmatch(sub):
        raise AuthError(401, "token subject must be 1-128 characters of [A-Za-z0-9_.@+-]")
    return sub


def issue_token(secret: str, user_id: str, ttl_seconds: int = 3600) -> str:
    """A buyer JWT (for the demo, tests and operators)."""
    import time

    now = int(time.time())
    return jwt.encode(
        {"sub": user_id, "iat": now, "exp": now + ttl_seconds}, secret, algorithm="HS256"
    )
