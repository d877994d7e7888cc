"""Prometheus metrics of the HTTP API, in a registry of the app's own."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class ApiMetrics:
    """Counters and histograms the API updates; scraped at ``/metrics``."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

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
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.reservations = Counter(
            "flashsale_reservation_attempts",
            "Reservation attempts by outcome (placed, replayed, or the rejection code).",
            ["outcome"],
            registry=self.registry,
        )
        self.transitions = Counter(
            "flashsale_reservation_transitions",
            "Confirm and cancel calls by result (confirmed, cancelled, unchanged).",
            ["result"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "flashsale_reservations_in_flight",
            "Reservation requests being processed now.",
            registry=self.registry,
        )
