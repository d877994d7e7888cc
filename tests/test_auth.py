"""The verified-token cache: it never outlives a token, and it stays bounded."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from aiohttp.test_utils import make_mocked_request

from api.web.auth import (
    LEEWAY_SECONDS,
    USER_ID,
    AuthError,
    VerifiedTokens,
    _fast_claims,
    _verified,
    buyer_id,
    issue_token,
)


def test_a_cached_token_is_dropped_once_expired():
    cache = VerifiedTokens()
    cache.put("secret", "fresh", "ann", time.time() + 60)
    cache.put("secret", "stale", "bob", time.time() - LEEWAY_SECONDS - 1)
    assert cache.get("secret", "fresh") == "ann"
    assert cache.get("secret", "stale") is None
    assert cache.get("other-secret", "fresh") is None  # verified under another secret only


def test_the_cache_evicts_the_least_recently_used():
    cache = VerifiedTokens(size=2)
    exp = time.time() + 60
    cache.put("s", "a", "ann", exp)
    cache.put("s", "b", "bob", exp)
    assert cache.get("s", "a") == "ann"  # a is now the most recent
    cache.put("s", "c", "cat", exp)
    assert cache.get("s", "b") is None
    assert (cache.get("s", "a"), cache.get("s", "c")) == ("ann", "cat")


SECRET = "s" * 64  # long enough for HS512 without a key-length warning


def _seg(value: object) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _forge(header: object, payload: object, key: str = SECRET, digest=hashlib.sha256) -> str:
    """A token with any header and payload, signed with ``key`` over its two segments."""
    signing_input = f"{_seg(header)}.{_seg(payload)}"
    signature = hmac.new(key.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{_seg(signature)}"


def _claims(**extra: object) -> dict[str, object]:
    return {"sub": "alice", "exp": int(time.time()) + 600} | extra


HS256 = {"alg": "HS256", "typ": "JWT"}


def odd_tokens() -> dict[str, str]:
    """Tokens that need care, minted when called: "within-leeway" is valid for 3 s only."""
    return {
        "alg-none": jwt.encode({"sub": "alice", "exp": 2**40}, None, algorithm="none"),
        "hs512-signed": jwt.encode(_claims(), SECRET, algorithm="HS512"),
        "hs512-header-sha256-mac": _forge({"alg": "HS512"}, _claims()),
        "no-alg": _forge({"typ": "JWT"}, _claims()),
        "wrong-secret": issue_token("t" * 40, "alice"),
        "expired": issue_token(SECRET, "alice", ttl_seconds=-60),
        "within-leeway": issue_token(SECRET, "alice", ttl_seconds=-2),
        "two-segments": issue_token(SECRET, "alice").rsplit(".", 1)[0],
        "four-segments": issue_token(SECRET, "alice") + ".x",
        "bad-padding": "a." + issue_token(SECRET, "alice").split(".", 1)[1],
        "header-bad-char": "*" + issue_token(SECRET, "alice"),
        "signature-bad-char": issue_token(SECRET, "alice") + "*",
        "header-not-json": _forge(b"{not json", _claims()),
        "payload-not-json": _forge(HS256, b"{not json"),
        "header-a-list": _forge(["HS256"], _claims()),
        "payload-a-list": _forge(HS256, ["alice"]),
        "payload-a-string": _forge(HS256, "alice"),
        "no-exp": _forge(HS256, {"sub": "alice"}),
        "no-sub": _forge(HS256, {"exp": 2**40}),
        "exp-string-digits": _forge(HS256, _claims(exp=str(int(time.time()) + 600))),
        "exp-string-word": _forge(HS256, _claims(exp="soon")),
        "exp-true": _forge(HS256, _claims(exp=True)),
        "exp-float": _forge(HS256, _claims(exp=time.time() + 600.5)),
        "exp-null": _forge(HS256, _claims(exp=None)),
        "iat-future": _forge(HS256, _claims(iat=int(time.time()) + 600)),
        "iat-string": _forge(HS256, _claims(iat="now")),
        "iat-float": _forge(HS256, _claims(iat=time.time())),
        "nbf-future": _forge(HS256, _claims(nbf=int(time.time()) + 600)),
        "aud": _forge(HS256, _claims(aud="shop")),
        "iss-number": _forge(HS256, _claims(iss=5)),
        "jti-number": _forge(HS256, _claims(jti=5)),
        "kid-number": _forge({"alg": "HS256", "kid": 5}, _claims()),
        "crit": _forge({"alg": "HS256", "crit": ["b64"], "b64": False}, _claims()),
        "sub-empty": _forge(HS256, _claims(sub="")),
        "sub-number": _forge(HS256, _claims(sub=42)),
        "sub-with-space": _forge(HS256, _claims(sub="a b")),
        "sub-too-long": _forge(HS256, _claims(sub="a" * 129)),
    }


def _verify_with_pyjwt(token: str, secret: str) -> str:
    """The buyer check as it was made through ``jwt.decode`` alone: subject, or 401 detail."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"require": ["sub", "exp"]},
            leeway=LEEWAY_SECONDS,
        )
    except jwt.PyJWTError as e:
        return f"401 invalid token: {e}"
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USER_ID.fullmatch(sub):
        return "401 token subject must be 1-128 characters of [A-Za-z0-9_.@+-]"
    return sub


def _verify(token: str, secret: str) -> str:
    _verified._entries.clear()
    request = make_mocked_request("GET", "/", headers={"Authorization": f"Bearer {token}"})
    try:
        return buyer_id(request, secret)
    except AuthError as e:
        return f"{e.status} {e.detail}"


@pytest.mark.parametrize("name", sorted(odd_tokens()))
def test_odd_tokens_get_the_answer_jwt_decode_gives(name: str):
    token = odd_tokens()[name]
    assert _verify(token, SECRET) == _verify_with_pyjwt(token, SECRET)


def test_the_direct_check_accepts_minted_tokens_and_declines_every_odd_one():
    token = issue_token(SECRET, "alice@shop.example")
    sub, exp = _fast_claims(token, SECRET) or ("", 0)
    assert sub == "alice@shop.example" and exp > time.time()
    assert _fast_claims(token, "t" * 40) is None
    accepted = {"within-leeway"}  # valid, plain tokens: the direct check needs no pyjwt
    for name, odd in odd_tokens().items():
        assert (_fast_claims(odd, SECRET) is not None) == (name in accepted), name


def test_a_key_pyjwt_refuses_is_refused_the_same_way():
    pem = "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----"
    token = _forge(HS256, _claims(), key=pem)
    assert _fast_claims(token, pem) is None
    assert _verify(token, pem) == _verify_with_pyjwt(token, pem)
    assert _verify(token, pem).startswith("401 invalid token")
