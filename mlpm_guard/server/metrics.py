"""Prometheus metrics of one app: requests by route and status, latency, batch sizes, guard decisions.

Each app has its own registry, so several apps in one process (tests, Ray replicas) never clash.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mlpm_guard_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("mlpm_guard_request_seconds", "HTTP request latency by route (to the last byte)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("mlpm_guard_batch_size", "items per batched model call, by lane (score, answer)",
                                    ["lane"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.decisions = Counter("mlpm_guard_decisions", "guard decisions on inputs by route (refuse, pass, ...)",
                                 ["route"], registry=self.registry)
        self.logged = Counter("mlpm_guard_logged_decisions", "decisions written to the decision log, by route, "
                              "hazard category and prototypes version", ["route", "category", "prototypes_version"],
                              registry=self.registry)
        self.flags = Counter("mlpm_guard_flagged", "inputs or outputs judged unsafe, by kind (input, output)",
                             ["kind"], registry=self.registry)

    def observe_decision(self, row: dict) -> None:
        """A decision-log listener: counts each logged decision by route, category and version."""
        self.logged.labels(row["route"], row["category"] or "none", row["prototypes_version"] or "none").inc()

    def watch_log(self, log: Any) -> None:
        """Export the log's row counts (recorded, written, dropped, failed) as ``mlpm_guard_decision_log_rows``."""
        self.registry.register(_LogCollector(log))

    def observe_batch(self, lane: str, size: int) -> None:
        self.batch_size.labels(lane).observe(size)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LogCollector:
    """The decision log's counters, read when scraped (the log counts; Prometheus only reads)."""

    def __init__(self, log: Any) -> None:
        self.log = log

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("mlpm_guard_decision_log_rows", "rows handed to the decision log, by outcome",
                                     labels=["state"])
        stats = self.log.stats.to_dict()
        for state in ("recorded", "written", "dropped", "failed"):
            family.add_metric([state], stats[state])
        yield family
