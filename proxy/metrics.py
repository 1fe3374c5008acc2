"""Prometheus metrics. Counters and histograms are per process (with `--workers N`, each scrape
sees one worker's); spend by label and open reservations are read from the database at scrape
time, so they are global across workers and replicas."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "keybrake_calls",
            "Vendor calls that reached the proxy, by vendor and decision.",
            ["vendor", "decision"],
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "keybrake_upstream_seconds",
            "Time the vendor took to answer a forwarded call.",
            ["vendor"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.database_seconds = Histogram(
            "keybrake_database_seconds",
            "Time of the request path's database operations.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.spend = Gauge(
            "keybrake_spend_usd",
            "Settled spend in the rolling 24-hour window by key label.",
            ["label"],
            registry=self.registry,
        )
        self.reservations_open = Gauge(
            "keybrake_reservations_open",
            "Calls reserved and not yet settled (in flight, or left by a dead process).",
            registry=self.registry,
        )

        # `labels()` takes a lock and builds a key on every call; the hot path keeps the children.
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (str(id(metric)), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_call(self, vendor: str, decision: str) -> None:
        self._child(self.calls, vendor, decision).inc()

    def time_upstream(self, vendor: str, seconds: float) -> None:
        self._child(self.upstream_seconds, vendor).observe(seconds)

    def time_database(self, operation: str, seconds: float) -> None:
        self._child(self.database_seconds, operation).observe(seconds)

    def render(self, spend_by_label: dict[str, int], open_reservations: int) -> bytes:
        self.spend.clear()
        for label, micros in spend_by_label.items():
            self.spend.labels(label).set(micros / 1_000_000)  # Prometheus samples are floats
        self.reservations_open.set(open_reservations)
        return generate_latest(self.registry)
