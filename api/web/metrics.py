"""Prometheus metrics of the HTTP API, in a registry of the app's own, or summed over the
API workers of ``serve --workers N`` (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from api.web.consumer_metrics import ConsumerHealthCollector
from consumers.health import Health

C = TypeVar("C", covariant=True)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Labelled(Protocol[C]):
    """A metric with labels: ``labels(*values)`` is its child for those values."""

    def labels(self, *values: str) -> C: ...


class Bound(Generic[C]):
    """A labelled metric's children, each bound once and kept.

    ``labels(...)`` looks its child up under a lock on every call (about 1.3 us against
    0.33 us for a kept child); the request path calls these instead. Only for metrics
    whose children are never removed.
    """

    def __init__(self, metric: Labelled[C]) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], C] = {}

    def __call__(self, *values: str) -> C:
        """The child for ``values``, bound on first use."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


@dataclass
class ApiMetrics:
    """Counters and histograms the API updates; ``scraped`` is what ``/metrics`` shows."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    #: Set in an API worker of ``serve --workers N``: the directory (the process's
    #: ``PROMETHEUS_MULTIPROC_DIR``) where every worker keeps its values; scrapes sum them.
    multiprocess_dir: str | None = None

    def __post_init__(self) -> None:
        self.requests = Counter(
            "flashsale_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "flashsale_http_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.reservations = Counter(
            "flashsale_reservation_attempts",
            "Reservation attempts by outcome (placed, replayed, or the rejection code).",
            ["outcome"],
            registry=self.registry,
        )
        self.transitions = Counter(
            "flashsale_reservation_transitions",
            "Confirm and cancel calls by result (confirmed, cancelled, unchanged, not_replicated).",
            ["result"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "flashsale_reservations_in_flight",
            "Reservation requests being processed now.",
            registry=self.registry,
            multiprocess_mode="livesum",  # over the workers still running
        )
        # The children the request path updates, bound once (see ``Bound``).
        self.requests_of: Bound[Counter] = Bound(self.requests)
        self.latency_of: Bound[Histogram] = Bound(self.latency)
        self.outcome: Bound[Counter] = Bound(self.reservations)
        self.tally = RequestTally(self.requests_of, self.latency_of)
        self.consumers = ConsumerHealthCollector()
        self.scraped = self.registry
        if self.multiprocess_dir is not None:
            # Every worker writes its values to files there; a scrape sums them all.
            self.scraped = CollectorRegistry()
            MultiProcessCollector(  # type: ignore[no-untyped-call]
                self.scraped, path=self.multiprocess_dir
            )
        self.scraped.register(self.consumers)

    def counter_totals(self, counter: Counter, label: str) -> dict[str, int]:
        """Each value of ``label`` with the total of ``counter`` (one of this object's), as
        ``/metrics`` shows it: summed over the API workers when there are several."""
        name = f"{next(iter(counter.describe())).name}_total"
        return {
            sample.labels[label]: int(sample.value)
            for family in self.scraped.collect()
            for sample in family.samples
            if sample.name == name and label in sample.labels
        }

    def record(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request of ``route`` and its latency (see
        :class:`RequestTally`)."""
        self.tally.record(route, status, seconds)

    def observe_consumers(self, health: Health | None) -> None:
        """Show ``health`` in the consumer gauges (None: Redis could not be read)."""
        self.consumers.observe(health)


class RequestTally:
    """Requests counted and timed in plain numbers, added to the request counter and the
    latency histogram once per event-loop turn (and before every scrape).

    Updating those for each request took two locked increments and a walk of the buckets
    in Python (about 2 us); at tens of thousands of requests per second that is several
    percent of a process. A turn of a busy loop answers many requests: each adds to a
    tally, and the turn's tally goes to the metrics in one update per route, status and
    bucket. A scrape sees every request answered before the turn it runs in, in its own
    process; other workers' requests at most one of their turns late.
    """

    def __init__(self, requests: Bound[Counter], latency: Bound[Histogram]) -> None:
        self._requests = requests
        self._latency = latency
        self._counts: dict[tuple[str, int], int] = {}
        # Per route: observations per bucket (the last one: above every bound), and their sum.
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._due = False

    def record(self, route: str, status: int, seconds: float) -> None:
        """Count a request of ``route`` answered with ``status`` after ``seconds``."""
        key = (route, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        buckets = self._buckets.get(route)
        if buckets is None:
            buckets = self._buckets[route] = [0] * (len(LATENCY_BUCKETS) + 1)
            self._sums[route] = 0.0
        buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._sums[route] += seconds
        if not self._due:
            self._due = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop running (a test calling in): at once
                self.flush()

    def flush(self) -> None:
        """Add the tally to the metrics and start a new one."""
        self._due = False
        counts, self._counts = self._counts, {}
        buckets, self._buckets = self._buckets, {}
        sums, self._sums = self._sums, {}
        for (route, status), n in counts.items():
            self._requests(route, str(status)).inc(n)
        for route, observed in buckets.items():
            histogram = self._latency(route)
            # prometheus-client adds one observation at a time (``observe``); its bucket
            # and sum values take any amount, so a turn's observations go in at once (its
            # buckets hold each observation once; a scrape adds them up).
            for i, n in enumerate(observed):
                if n:
                    histogram._buckets[i].inc(n)
            histogram._sum.inc(sums[route])
