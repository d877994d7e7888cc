"""Who is calling: buyers by JWT (HS256, ``sub`` is the user id), admins by bearer token."""

from __future__ import annotations

import hmac
import re
import time
from collections import OrderedDict

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


LEEWAY_SECONDS = 5


class VerifiedTokens:
    """A bounded LRU of tokens already verified, so a retrying buyer skips the HMAC.

    An entry is the token's subject and expiry; it is used only until that expiry.
    """

    def __init__(self, size: int = 16_384) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def get(self, secret: str, token: str) -> str | None:
        """The subject of a verified, unexpired token, or None."""
        entry = self._entries.get((secret, token))
        if entry is None:
            return None
        if time.time() > entry[1] + LEEWAY_SECONDS:
            del self._entries[(secret, token)]
            return None
        self._entries.move_to_end((secret, token))
        return entry[0]

    def put(self, secret: str, token: str, sub: str, exp: float) -> None:
        """Remember a token that just passed verification."""
        self._entries[(secret, token)] = (sub, exp)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)


_verified = VerifiedTokens()


def buyer_id(request: web.Request, secret: str) -> str:
    """The user id (``sub``) of a valid buyer JWT, or raise 401."""
    token = bearer(request)
    cached = _verified.get(secret, token)
    if cached is not None:
        return cached
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"require": ["sub", "exp"]},
            leeway=LEEWAY_SECONDS,
        )
    except jwt.PyJWTError as e:
        raise AuthError(401, f"invalid token: {e}") from e
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USER_ID.fullmatch(sub):
        raise AuthError(401, "token subject must be 1-128 characters of [A-Za-z0-9_.@+-]")
    _verified.put(secret, token, sub, float(claims["exp"]))
    return sub


def issue_token(secret: str, user_id: str, ttl_seconds: int = 3600) -> str:
    """A buyer JWT (for the demo, tests and operators)."""
    now = int(time.time())
    return jwt.encode(
        {"sub": user_id, "iat": now, "exp": now + ttl_seconds}, secret, algorithm="HS256"
    )
