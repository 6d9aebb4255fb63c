"""The service's Prometheus metrics (GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from elastilm.runtime_py.orchestrator import Answer


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "elastilm_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=self.registry
        )
        self.slo = Counter(
            "elastilm_slo", "Finished requests by whether their SLO was met", ["met"], registry=self.registry
        )
        self.tokens = Counter("elastilm_generated_tokens", "Tokens generated", registry=self.registry)
        self.queue = Gauge("elastilm_queue_depth", "Requests waiting", registry=self.registry)
        self.ttft = Histogram(
            "elastilm_ttft_seconds",
            "Measured time to first token",
            registry=self.registry,
            buckets=(0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4),
        )
        self.level = Counter(
            "elastilm_plans", "Plans by level and prompt ratio", ["level", "ratio"], registry=self.registry
        )

    def answered(self, answer: Answer, endpoint: str) -> None:
        self.requests.labels(endpoint, "200").inc()
        self.slo.labels(str(answer.slo_met).lower()).inc()
        self.tokens.inc(answer.tokens)
        self.ttft.observe(answer.ttft_ms / 1000)
        self.level.labels(f"{answer.plan.level:g}", f"{answer.plan.ratio:g}").inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
