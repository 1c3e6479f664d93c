"""What the server counts, exposed at GET /metrics in the Prometheus text format.

Owns the metric names and labels (listed in docs/serving.md) and the ASGI middleware that times
every request; each app has its own registry, so several servers in one process (tests) do not
share counts. Does not decide what a request or an answer is (server.py, batching.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from seecl.serving.routing import Answer

# Seconds: from a fast tiny-model answer to a long CPU answer.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ServerMetrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "seecl_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=registry
        )
        self.latency = Histogram(
            "seecl_request_duration_seconds",
            "Time from a request's arrival to its last byte (a stream's end), by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "seecl_time_to_first_token_seconds",
            "Streamed requests: time from arrival to the first answer text",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queries = Counter(
            "seecl_queries", "Queries answered, by who answered (an expert or base)", ["answered_by"], registry=registry
        )
        self.checks = Counter(
            "seecl_checks",
            "Routing checks by expert and verdict: pos (claimed), neg (declined), neither",
            ["expert", "verdict"],
            registry=registry,
        )
        self.tokens = Counter("seecl_tokens", "Tokens by kind: prompt, completion", ["kind"], registry=registry)
        self.batch_size = Histogram(
            "seecl_batch_queries",
            "Queries per engine call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "seecl_batch_duration_seconds", "Time of one engine call", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.queued = Gauge("seecl_queued_queries", "Queries waiting for the next batch", registry=registry)
        self.experts = Gauge("seecl_experts", "Experts being served", registry=registry)
        self.reloads = Counter(
            "seecl_ensemble_reloads", "Times the server switched to a grown ensemble", registry=registry
        )

    def answered(self, answers: Sequence[Answer], prompt_tokens: int) -> None:
        for answer in answers:
            self.queries.labels(answer.route.answered_by).inc()
            for check in answer.route.checks:
                self.checks.labels(check.expert, check.verdict).inc()
            self.tokens.labels("completion").inc(len(answer.token_ids))
        self.tokens.labels("prompt").inc(prompt_tokens)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Timing:
    """ASGI middleware: counts and times every HTTP request until its response's last byte."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
        status = [500]

        counted = []

        def count() -> None:
            if not counted:
                counted.append(True)
                self.metrics.requests.labels(endpoint, str(status[0])).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

        async def timed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                count()

        try:
            await self.app(scope, receive, timed_send)
        finally:
            count()  # a request that failed or whose client left is counted too
