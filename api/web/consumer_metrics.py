"""The consumer-health gauges of ``/metrics``, rendered at scrape time from the last health
read instead of kept as gauge values.

Gauge values of an API worker in multiprocess mode live in files that every scrape sums
over the workers; consumer health is one reading of Redis, not a per-worker share, so it
must never be stored there: rendered by the scraping process alone, it appears once,
whichever worker answers and however many there are. A group or partition that went away
is gone from the next scrape, since nothing of it is kept.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consumers.health import Health

_GROUP_LABELS = ["group", "partition"]


class ConsumerHealthCollector(Collector):
    """Consumer lag, pending entries, stream lengths and dead letters as last observed."""

    def __init__(self) -> None:
        self._health: Health | None = None
        self._dead_letters = 0  # the last count read, still shown while Redis is unreadable

    def observe(self, health: Health | None) -> None:
        """Show ``health`` from now on (None: Redis could not be read)."""
        self._health = health
        if health is not None:
            self._dead_letters = health.dead_letters

    def collect(self) -> Iterator[Metric]:
        """The gauges of the last observed health."""
        health = self._health
        lag = GaugeMetricFamily(
            "flashsale_consumer_lag",
            "Stream entries a consumer group has not acknowledged yet (undelivered + pending).",
            labels=_GROUP_LABELS,
        )
        pending = GaugeMetricFamily(
            "flashsale_consumer_pending",
            "Stream entries delivered to a consumer group and not acknowledged yet.",
            labels=_GROUP_LABELS,
        )
        oldest = GaugeMetricFamily(
            "flashsale_consumer_oldest_pending_seconds",
            "Age of the oldest entry delivered to a consumer group and not acknowledged.",
            labels=_GROUP_LABELS,
        )
        entries = GaugeMetricFamily(
            "flashsale_stream_entries",
            "Entries kept in a partition stream (older ones are trimmed once archived).",
            labels=["partition"],
        )
        if health is not None:
            for g in health.groups:
                labels = [g.group, str(g.partition)]
                lag.add_metric(labels, g.lag)
                pending.add_metric(labels, g.pending)
                oldest.add_metric(labels, g.oldest_pending_seconds or 0)
            for partition, length in health.stream_lengths.items():
                entries.add_metric([str(partition)], length)
        yield from (lag, pending, oldest, entries)
        yield GaugeMetricFamily(
            "flashsale_dead_letter_entries",
            "Entries parked on the dead-letter stream, waiting for `flashsale dlq retry`.",
            value=self._dead_letters,
        )
        yield GaugeMetricFamily(
            "flashsale_consumer_health_up",
            "1 when the last scrape could read consumer health from Redis, else 0.",
            value=0 if health is None else 1,
        )
