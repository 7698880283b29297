"""Prometheus metrics of one application instance, in a registry of its own.

Each app owns a `CollectorRegistry`, never the process-wide default, so that
several apps in one process (tests, an embedded simulator) do not clash.
Request and upload counters are counted as they happen; round counts are read
from the database at scrape time, so they agree across workers and restarts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aggregator import Aggregator, FederationStatus, RoundStatus

__all__ = ["Metrics", "MetricsMiddleware"]

logger = logging.getLogger(__name__)

# The round statuses exported as counters.
_ROUND_COUNTERS = (RoundStatus.CLOSED, RoundStatus.FAILED)
# Long polls hold requests up to 30 s: the buckets reach that far.
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The service's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fedcore_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fedcore_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.updates_accepted = Counter(
            "fedcore_updates_accepted", "Client updates stored.", registry=self.registry
        )
        self.updates_repeated = Counter(
            "fedcore_updates_repeated",
            "Identical re-uploads answered with the original receipt.",
            registry=self.registry,
        )
        self.updates_rejected = Counter(
            "fedcore_updates_rejected",
            "Client updates refused, by problem type.",
            ["reason"],
            registry=self.registry,
        )

    def watch(self, aggregator: Callable[[], Aggregator | None]) -> None:
        """Report round and federation counts read from `aggregator()` at each scrape."""
        self.registry.register(_StoreCollector(aggregator))


class _StoreCollector(Collector):
    def __init__(self, aggregator: Callable[[], Aggregator | None]) -> None:
        self._aggregator = aggregator

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        aggregator = self._aggregator()
        if aggregator is None:
            return
        try:
            feds, rounds, spent = _counts(aggregator)
        except SQLAlchemyError:
            # /readyz reports the database; a scrape still returns the rest.
            logger.warning("database unreachable; round metrics left out of this scrape")
            return
        closed = CounterMetricFamily("fedcore_rounds_closed", "Rounds closed with a new model.")
        closed.add_metric([], rounds[RoundStatus.CLOSED])
        failed = CounterMetricFamily("fedcore_rounds_failed", "Rounds that failed.")
        failed.add_metric([], rounds[RoundStatus.FAILED])
        federations = GaugeMetricFamily(
            "fedcore_federations", "Federations by status.", labels=["status"]
        )
        for status in FederationStatus:
            federations.add_metric([status.value], feds[status])
        epsilon = GaugeMetricFamily(
            "fedcore_privacy_epsilon_spent",
            "Epsilon spent by the released rounds of each DP federation (at its delta).",
            labels=["federation"],
        )
        for federation_id, value in spent.items():
            epsilon.add_metric([federation_id], value)
        yield from (closed, failed, federations, epsilon)


def _counts(
    aggregator: Aggregator,
) -> tuple[dict[FederationStatus, int], dict[RoundStatus, int], dict[str, float]]:
    """Count federations and rounds by status, and read each DP federation's ε spent.

    Rounds are counted by the store, not listed: a scrape every few seconds
    must not read every round's cohort and metrics of a long federation.
    Only a federation whose rounds the aggregator accounts (central or
    distributed DP) has its rounds read: a released DP round stores the ε
    of every round released so far in its metrics (`aggregator.privacy`),
    so the last one holds the total.
    """
    feds = dict.fromkeys(FederationStatus, 0)
    rounds = dict.fromkeys(RoundStatus, 0)
    spent: dict[str, float] = {}
    for fed in aggregator.list_federations():
        feds[fed.status] += 1
        for status in _ROUND_COUNTERS:
            rounds[status] += aggregator.count_rounds(fed.id, status)
        if aggregator.config(fed.id).client_level_dp is None:
            continue
        for rnd in aggregator.list_rounds(fed.id):
            if rnd.status is RoundStatus.CLOSED and rnd.privacy is not None:
                spent[fed.id] = rnd.metrics.get("epsilon", spent.get(fed.id, 0.0))
    return feds, rounds, spent


class MetricsMiddleware:
    """ASGI middleware counting requests and their latency per route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request through the wrapped app, timing and counting it."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            # The router put the matched route into the scope; templates, not
            # raw paths, keep the label set small.
            route = getattr(scope.get("route"), "path", "unmatched")
            method = str(scope["method"])
            self._metrics.requests.labels(method, route, str(status)).inc()
            self._metrics.latency.labels(method, route).observe(time.perf_counter() - start)
