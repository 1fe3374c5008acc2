"""Prometheus metrics that are right whichever worker a scrape reaches.

- Counters and histograms of the request path (calls by vendor and decision, vendor and database
  latency) are counted by every worker. With `keybrake serve --workers N` each worker writes them
  to files in PROMETHEUS_MULTIPROC_DIR (which `serve` sets for N > 1, before the workers start)
  and a scrape sums every worker's (prometheus_client's multiprocess mode), so `rate()` sees the
  whole process, not one N-th of it.
- Spend, keys and reservations are read from the database at scrape time, so they are the same on
  every worker and replica. They are bounded: by vendor, never one series per run (per-run
  warnings are the webhook alerts' job).
- `keybrake_database_up` is 0 when that read failed.

Every metric the rules in templates/observability/ use is listed in `NAMES`, and a test holds the
rules and the dashboard to it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from keybrake.proxy.decisions import is_cap_hit
from keybrake.proxy.store.records import MetricsSnapshot

__all__ = ["NAMES", "Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Every series /metrics exposes (histograms as their _bucket, _sum and _count).
NAMES = (
    "keybrake_calls_total",
    "keybrake_policy_reports_total",
    "keybrake_upstream_seconds",
    "keybrake_database_seconds",
    "keybrake_spend_usd",
    "keybrake_reservations_open",
    "keybrake_reservations_stale",
    "keybrake_keys_active",
    "keybrake_keys_near_cap",
    "keybrake_database_up",
    "keybrake_alerts_pending",
    "keybrake_alerts_failing",
)


def _multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self) -> None:
        # In multiprocess mode these write to the shared folder; the registry is only used to
        # expose them in a single process.
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "keybrake_calls",
            "Vendor calls that reached the proxy, by vendor and decision.",
            ["vendor", "decision"],
            registry=self.registry,
        )
        self.reports = Counter(
            "keybrake_policy_reports",
            "Calls recorded with a would-be refusal of a report-only constraint or call rate "
            "(noted in the audit row; a call refused for another reason counts too), by vendor "
            "and the refusal.",
            ["vendor", "decision"],
            registry=self.registry,
        )
        self.upstream_seconds = self._latency(
            "keybrake_upstream_seconds",
            "Time the vendor took to answer a forwarded call.",
            "vendor",
        )
        self.database_seconds = self._latency(
            "keybrake_database_seconds",
            "Time of the request path's database operations.",
            "operation",
        )
        # `labels()` takes a lock and builds a key on every call; the hot path keeps the children.
        self._children: dict[tuple[str, ...], Any] = {}
        # Threshold alerts look at once after a cap hit (keybrake.proxy.alerts).
        self.on_cap_hit: Callable[[], None] | None = None

    def _latency(self, name: str, documentation: str, label: str) -> Histogram:
        """A histogram of seconds by one label, in the buckets every latency here uses."""
        return Histogram(
            name, documentation, [label], buckets=_LATENCY_BUCKETS, registry=self.registry
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (str(id(metric)), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_call(self, vendor: str, decision: str) -> None:
        self._child(self.calls, vendor, decision).inc()
        if self.on_cap_hit is not None and is_cap_hit(decision):
            self.on_cap_hit()

    def count_report(self, vendor: str, decision: str) -> None:
        self._child(self.reports, vendor, decision).inc()

    def time_upstream(self, vendor: str, seconds: float) -> None:
        self._child(self.upstream_seconds, vendor).observe(seconds)

    def time_database(self, operation: str, seconds: float) -> None:
        self._child(self.database_seconds, operation).observe(seconds)

    def render(self, snapshot: MetricsSnapshot | None) -> bytes:
        """The exposition: every worker's counters, and `snapshot` (None: the database did not
        answer)."""
        folder = _multiprocess_dir()
        if folder is not None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
            body = generate_latest(registry)
        else:
            body = generate_latest(self.registry)
        return body + generate_latest(_database_registry(snapshot))


class _DatabaseCollector:
    """The scrape-time gauges, as metric families rather than Gauge objects: in multiprocess
    mode a Gauge would be written to the shared folder and summed again by the collector."""

    def __init__(self, snapshot: MetricsSnapshot | None) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.snapshot
        yield GaugeMetricFamily(
            "keybrake_database_up",
            "1 when the database answered this scrape, else 0.",
            value=0 if snapshot is None else 1,
        )
        if snapshot is None:
            return
        spend = GaugeMetricFamily(
            "keybrake_spend_usd",
            "Settled spend in the rolling 24-hour window, by vendor.",
            labels=["vendor"],
        )
        for vendor, micros in sorted(snapshot.spend_by_vendor.items()):
            spend.add_metric([vendor], micros / 1_000_000)  # Prometheus samples are floats
        yield spend
        for name, text, value in (
            (
                "keybrake_reservations_open",
                "Calls reserved and not yet settled (in flight, or stale).",
                snapshot.open_reservations,
            ),
            (
                "keybrake_reservations_stale",
                "Reservations older than KEYBRAKE_RESERVATION_TTL: left by a dead process.",
                snapshot.stale_reservations,
            ),
            (
                "keybrake_keys_active",
                "Vault keys neither revoked nor expired.",
                snapshot.active_keys,
            ),
            (
                "keybrake_keys_near_cap",
                "Active keys that have used 80 % or more of their 24-hour cap.",
                snapshot.keys_near_cap,
            ),
            (
                "keybrake_alerts_pending",
                "Threshold alerts raised and not yet delivered to the webhook.",
                snapshot.alerts_pending,
            ),
            (
                "keybrake_alerts_failing",
                "Of those, alerts whose delivery has failed at least once (retried with backoff).",
                snapshot.alerts_failing,
            ),
        ):
            yield GaugeMetricFamily(name, text, value=value)


def _database_registry(snapshot: MetricsSnapshot | None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_DatabaseCollector(snapshot))
    return registry
