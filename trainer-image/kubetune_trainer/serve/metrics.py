"""Prometheus metrics of the built-in server (one registry per server, served on /metrics).

The ``model`` label is the adapter name or the base model's name; requests naming a model that
is not loaded are counted under ``model="unknown"`` so clients cannot grow the label set.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

UNKNOWN_MODEL = "unknown"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "kubetune_serve_requests",
            "HTTP requests to the OpenAI endpoints, by model, endpoint and status code",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "kubetune_serve_request_duration_seconds",
            "Time from receiving a generation request to its last byte",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "kubetune_serve_time_to_first_token_seconds",
            "Time from receiving a generation request to its first generated text",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kubetune_serve_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "kubetune_serve_completion_tokens", "Completion tokens generated", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "kubetune_serve_batch_size",
            "Sequences that started together (one prefill, or one static batch)",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.step_batch_size = Histogram(
            "kubetune_serve_step_batch_size",
            "Sequences in one decoding step of the running batch (continuous batching)",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_models = Histogram(
            "kubetune_serve_batch_models",
            "Distinct models (adapters and the base) among sequences that started together",
            buckets=(1, 2, 3, 4, 6, 8, 16, 32),
            registry=r,
        )
        self.batch_rows = Histogram(
            "kubetune_serve_batch_rows",
            "Sequences of one model among those that started together (its share of the batch size)",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "kubetune_serve_queue_wait_seconds",
            "Time a sequence waited in the queue before it started",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "kubetune_serve_queue_depth", "Sequences and commands waiting for the model", registry=r
        )
        self.adapter_loaded = Gauge(
            "kubetune_serve_adapter_loaded",
            "1 when the adapter is loaded and served, 0 when it is configured but not (yet) loaded",
            ["model"],
            registry=r,
        )
        self.row_failures = Counter(
            "kubetune_serve_row_failures",
            "Sequences that failed inside the engine (each failed alone; the rest of its batch went on)",
            ["model"],
            registry=r,
        )

    def observe_batch(self, models: Iterable[str]) -> None:
        counts: dict[str, int] = {}
        for m in models:
            counts[m] = counts.get(m, 0) + 1
        self.batch_size.observe(sum(counts.values()))
        self.batch_models.observe(len(counts))
        for m, n in counts.items():
            self.batch_rows.labels(m).observe(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
