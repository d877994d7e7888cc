"""Who is calling: buyers by JWT (HS256, ``sub`` is the user id), admins by bearer token."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import re
import time
from collections import OrderedDict

import jwt
from aiohttp import web
from jwt.algorithms import HMACAlgorithm

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

_SEGMENT = re.compile(r"^[A-Za-z0-9_-]*$")
# Payload claims whose checks pyjwt would make beyond exp/iat/sub; a token carrying one goes
# through pyjwt so its answer stays exactly pyjwt's.
_CHECKED_CLAIMS = frozenset({"nbf", "aud", "iss", "jti"})


@functools.lru_cache(maxsize=8)
def _hmac_key(secret: str) -> bytes | None:
    """The HMAC key pyjwt would use for ``secret``, or None when pyjwt would refuse it."""
    try:
        key: bytes = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.PyJWTError:
        return None
    return key


def _b64decode(segment: str) -> bytes | None:
    """A strict base64url segment decoded, or None when it is not plainly one."""
    if not _SEGMENT.fullmatch(segment):
        return None
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None


@functools.lru_cache(maxsize=16)
def _plain_header(segment: str) -> bool:
    """True when a JWT header segment plainly says HS256 (with at most a ``typ``).

    Every token a service issues carries the same header, so each is decoded once.
    """
    raw = _b64decode(segment)
    if raw is None:
        return False
    try:
        header = json.loads(raw)
    except ValueError:
        return False
    if not isinstance(header, dict):
        return False
    return header.get("alg") == "HS256" and set(header) <= {"alg", "typ"}


def _fast_claims(token: str, secret: str) -> tuple[str, int] | None:
    """(sub, exp) of a token that plainly passes every check pyjwt makes, else None.

    This is the HS256 verification done directly (a split, two base64url decodes, one HMAC
    compared in constant time). It accepts only tokens pyjwt would accept with the same
    claims; anything unusual returns None so ``jwt.decode`` gives today's exact 401 detail.
    """
    key = _hmac_key(secret)
    if key is None or token.count(".") != 2:
        return None
    header_seg, payload_seg, signature_seg = token.split(".")
    if not _plain_header(header_seg):
        return None
    payload_raw = _b64decode(payload_seg)
    signature = _b64decode(signature_seg)
    if payload_raw is None or signature is None:
        return None
    expected = hmac.new(key, f"{header_seg}.{payload_seg}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        return None
    try:
        claims = json.loads(payload_raw)
    except ValueError:
        return None
    if not isinstance(claims, dict):
        return None
    if not _CHECKED_CLAIMS.isdisjoint(claims):
        return None
    sub, exp, iat = claims.get("sub"), claims.get("exp"), claims.get("iat", 0)
    if not isinstance(sub, str) or not USER_ID.fullmatch(sub):
        return None
    # bool is an int to Python; pyjwt's int() would take it, so leave it to pyjwt.
    if type(exp) is not int or type(iat) is not int:
        return None
    now = time.time()
    if exp <= now - LEEWAY_SECONDS or iat > now + LEEWAY_SECONDS:
        return None
    return sub, exp


def buyer_id(request: web.Request, secret: str) -> str:
    """The user id (``sub``) of a valid buyer JWT, or raise 401."""
    token = bearer(request)
    cached = _verified.get(secret, token)
    if cached is not None:
        return cached
    fast = _fast_claims(token, secret)
    if fast is not None:
        _verified.put(secret, token, fast[0], float(fast[1]))
        return fast[0]
    # Anything the direct check does not plainly accept: pyjwt decides, for its exact detail.
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
