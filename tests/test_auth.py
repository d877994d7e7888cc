"""The verified-token cache: it never outlives a token, and it stays bounded."""

from __future__ import annotations

import time

from api.web.auth import LEEWAY_SECONDS, VerifiedTokens


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
