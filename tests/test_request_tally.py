"""Requests counted per event-loop turn show in /metrics exactly as counting each one
would: same counts, same buckets (bounds included), same sums."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest

from api.web.metrics import LATENCY_BUCKETS, ApiMetrics

# Every bound itself, just above and below some, and beyond the last one.
LATENCIES = [*LATENCY_BUCKETS, 0.0, 0.0009, 0.00251, 0.7, 2.6, 30.0]


def _exposition(metrics: ApiMetrics) -> list[str]:
    lines = generate_latest(metrics.registry).decode().splitlines()
    # Not the _created samples: the moment each child was made.
    return sorted(s for s in lines if s.startswith("flashsale_http_") and "_created" not in s)


def _counted_one_by_one() -> list[str]:
    reference = ApiMetrics()
    for n, seconds in enumerate(LATENCIES):
        route = "/a" if n % 3 else "/b"
        reference.requests.labels(route, str(200 + n % 2)).inc()
        reference.latency.labels(route).observe(seconds)
    return _exposition(reference)


async def test_a_turns_tally_shows_as_counting_each_request_would():
    metrics = ApiMetrics()
    for n, seconds in enumerate(LATENCIES):
        metrics.record("/a" if n % 3 else "/b", 200 + n % 2, seconds)
    assert "flashsale_http_requests_total" not in "".join(_exposition(metrics))
    await asyncio.sleep(0)  # the turn ends: the tally is added
    assert _exposition(metrics) == _counted_one_by_one()
    before = sum(1 for n in range(len(LATENCIES)) if n % 3 and n % 2 == 0)
    metrics.record("/a", 200, 0.001)
    metrics.tally.flush()  # as a scrape does
    line = f'flashsale_http_requests_total{{route="/a",status="200"}} {before + 1}.0'
    assert line in _exposition(metrics)


def test_without_a_running_loop_each_request_is_added_at_once():
    metrics = ApiMetrics()
    for n, seconds in enumerate(LATENCIES):
        metrics.record("/a" if n % 3 else "/b", 200 + n % 2, seconds)
    assert _exposition(metrics) == _counted_one_by_one()
