"""`GET /metrics` in Prometheus' text format (prometheus-client), unauthenticated like the probes.

Two kinds of figures, one scrape target:
- the API process's own, counted as requests pass: `loraforge_http_requests_total` and
  `loraforge_http_request_duration_seconds` by method, route template and status (the route's
  path template, never the raw path, so ids cannot explode the label space);
- the platform's, read from the database when scraped (`PlatformCollector`, one connection of
  the small auth pool, a handful of queries): jobs by status, queue depth and the age of the
  oldest queued job per base, leases lost with their trainer (all read off the queue's
  bookkeeping, `control_plane.queue_stats`, so a scrape costs the same at 100 or 10 million
  jobs), and every trainer's own
  series from the trainer registry (tokens/s, step time, peak memory, resident base, and its
  counters of claims, outcomes and tokens trained). Trainers run in Ray actors that nothing
  scrapes; they report into the registry on every heartbeat, and this is where it shows.

Each app gets its own `CollectorRegistry`, so that two apps in one process (tests) keep apart.
No tenant's name, id or data appears in any label.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import Connection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane import interactive_calls, queue_stats, trainers, webhooks
from control_plane.job_status import JobStatus
from control_plane.services import Services

log = logging.getLogger(__name__)


# Request latency buckets: from a cached key check (~1 ms) to a large upload (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


class PlatformCollector(Collector):
    """The platform's state, read from the database on each scrape."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "loraforge_database_up", "1 when the database answered this scrape's queries"
        )
        try:
            with self.services.auth_engine.connect() as conn:
                families = list(self._families(conn))
        except Exception as exc:  # a scrape during an outage still answers, saying so
            log.warning("metrics: the database did not answer (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, conn: Connection) -> Iterator[Metric]:
        # Read off the queue's bookkeeping (one row per tenant, one per queue line, an index
        # probe per base): a scrape's cost does not grow with the backlog or with every job the
        # platform has ever run.
        counted = queue_stats.job_counts(conn)
        jobs = GaugeMetricFamily("loraforge_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counted.by_status[status])
        yield jobs

        lost = CounterMetricFamily(
            "loraforge_job_interruptions",
            "Leases lost with their trainer and handed back by the reaper (all jobs)",
        )
        lost.add_metric([], counted.interruptions)
        yield lost

        depth = GaugeMetricFamily(
            "loraforge_queue_depth", "Jobs waiting in the queue, by base", labels=["base"]
        )
        oldest = GaugeMetricFamily(
            "loraforge_queue_oldest_age_seconds",
            "Age of the oldest queued job, by base",
            labels=["base"],
        )
        for base in queue_stats.base_queues(conn):
            depth.add_metric([base.base_name], base.queued)
            oldest.add_metric([base.base_name], base.oldest_age_seconds)
        yield depth
        yield oldest

        hooks = webhooks.backlog(conn)
        pending = GaugeMetricFamily(
            "loraforge_webhook_deliveries_pending",
            "Webhook deliveries not yet delivered, retries included",
        )
        pending.add_metric([], hooks.pending)
        yield pending
        overdue = GaugeMetricFamily(
            "loraforge_webhook_oldest_due_seconds",
            "How long the most overdue webhook delivery has been due (0: none is)",
        )
        overdue.add_metric([], hooks.oldest_due_seconds)
        yield overdue

        yield from self._interactive_families(conn)
        yield from self._trainer_families(conn)

    def _interactive_families(self, conn: Connection) -> Iterator[Metric]:
        families = {
            "pending": GaugeMetricFamily(
                "loraforge_interactive_calls_pending",
                "Interactive sessions' calls not yet taken by an executor, by base",
                labels=["base"],
            ),
            "oldest_pending_seconds": GaugeMetricFamily(
                "loraforge_interactive_oldest_pending_seconds",
                "How long the oldest call not yet taken has waited, by base (0: none waits)",
                labels=["base"],
            ),
            "executors": GaugeMetricFamily(
                "loraforge_interactive_executors_alive",
                "Interactive executors heard from within a lease, by the base they hold",
                labels=["base"],
            ),
        }
        for line in interactive_calls.backlog(conn, self.services.settings.lease_seconds):
            for field, family in families.items():
                family.add_metric([line.base], getattr(line, field))
        yield from families.values()

    def _trainer_families(self, conn: Connection) -> Iterator[Metric]:
        lease = self.services.settings.lease_seconds
        known = trainers.list_trainers(conn, lease, include_gone=False)
        alive = GaugeMetricFamily(
            "loraforge_trainers_alive", f"Trainers heard from within a lease ({lease:g} s)"
        )
        alive.add_metric([], len(known))
        yield alive

        labels = ["trainer", "host"]
        info = GaugeMetricFamily(
            "loraforge_trainer_info",
            "1 per live trainer, with its device and resident base",
            labels=[*labels, "device", "resident_base"],
        )
        gauges = {
            "tokens_per_second": GaugeMetricFamily(
                "loraforge_trainer_tokens_per_second",
                "Tokens/s of its latest step (of its latest job while idle)",
                labels=labels,
            ),
            "step_seconds": GaugeMetricFamily(
                "loraforge_trainer_step_seconds", "Duration of its latest step", labels=labels
            ),
            "peak_memory_bytes": GaugeMetricFamily(
                "loraforge_trainer_peak_memory_bytes",
                "Peak memory of its latest job (GPU memory on a GPU, peak RSS on a CPU)",
                labels=labels,
            ),
        }
        busy = GaugeMetricFamily(
            "loraforge_trainer_busy", "1 while it holds a job, 0 while it waits", labels=labels
        )
        counters = {
            "claims": CounterMetricFamily(
                "loraforge_trainer_claims", "Jobs it claimed since it started", labels=labels
            ),
            "tokens_trained": CounterMetricFamily(
                "loraforge_trainer_tokens_trained", "Tokens it trained on", labels=labels
            ),
        }
        outcomes = CounterMetricFamily(
            "loraforge_trainer_jobs_ended",
            "Runs it ended: succeeded (published), failed, let_go (cancelled, handed back, "
            "lease lost)",
            labels=[*labels, "outcome"],
        )
        for t in known:
            values = [t.id, t.host]
            info.add_metric([*values, t.device, t.resident_base or ""], 1)
            for name, family in gauges.items():
                value = getattr(t, name)
                if value is not None:
                    family.add_metric(values, float(value))
            busy.add_metric(values, 1 if t.current_job_id else 0)
            for name, counter in counters.items():
                counter.add_metric(values, getattr(t, name))
            for outcome in ("succeeded", "failed", "let_go"):
                outcomes.add_metric([*values, outcome], getattr(t, outcome))
        yield info
        yield from gauges.values()
        yield busy
        yield from counters.values()
        yield outcomes


def install_metrics(app: FastAPI, services: Services) -> None:
    """Count every request and serve `/metrics` from this app's own registry."""
    registry = CollectorRegistry()
    requests = Counter(
        "loraforge_http_requests",
        "HTTP requests answered, by method, route template and status",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "loraforge_http_request_duration_seconds",
        "Time to the response's start, by method and route template",
        ["method", "route"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    registry.register(PlatformCollector(services))
    app.state.metrics_registry = registry
    app.add_middleware(RequestMetrics, requests=requests, latency=latency)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """ASGI middleware counting each HTTP request by method, route template and status, and
    timing it to the start of its response (a stream's first byte, not its end)."""

    def __init__(self, app: ASGIApp, *, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"]
        status = 500  # an exception before the response starts is answered 500 upstream

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed = time.perf_counter() - started
                self.latency.labels(method, _route_template(scope)).observe(elapsed)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.requests.labels(method, _route_template(scope), str(status)).inc()


def _route_template(scope: Scope) -> str:
    """The path template of the route that answered (`/v1/fine_tuning/jobs/{job_id}`; the
    router records it in the scope when it matches), or `unmatched`: ids never become labels."""
    route = scope.get("route")
    return str(getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched")
