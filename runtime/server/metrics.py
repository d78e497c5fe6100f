"""Prometheus metrics of a serving engine (prometheus-client, one registry per server).

Gauges read from `ServingEngine.stats()` at scrape time: r1c_queue_length (waiting requests),
r1c_running_sequences, r1c_cache_used_tokens / r1c_cache_capacity_tokens / r1c_cache_usage_ratio (filled tokens over
capacity) / r1c_cache_reserved_tokens (rows x capacity bucket) / r1c_cache_bucket_tokens; counters
r1c_prompt_tokens_total, r1c_generation_tokens_total, r1c_requests_finished_total, r1c_requests_cancelled_total,
r1c_steps_total; histograms observed by the scheduler thread: r1c_time_to_first_token_seconds (TTFT),
r1c_time_per_output_token_seconds (each inter-token gap, TPOT), r1c_e2e_request_latency_seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from r1c.runtime.serving import Observer, RequestOutput

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class Metrics(Observer):
    """The scheduler's observer and the `/metrics` exposition. Call `attach(stats)` once the engine exists."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._stats: Callable[[], dict[str, Any]] | None = None
        self.ttft = Histogram("r1c_time_to_first_token_seconds", "Time to first token (TTFT).",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("r1c_time_per_output_token_seconds", "Gap between consecutive output tokens (TPOT).",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("r1c_e2e_request_latency_seconds", "Arrival to last token of finished requests.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StatsCollector(self))

    def attach(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def token_gap(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def finished(self, output: RequestOutput) -> None:
        self.e2e.observe(output.e2e_s)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StatsCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        if self.metrics._stats is None:
            return
        s = self.metrics._stats()
        gauges = {"r1c_queue_length": ("waiting", "Requests waiting for a cache row."),
                  "r1c_running_sequences": ("running", "Sequences holding a cache row (decoding or prefilling)."),
                  "r1c_cache_used_tokens": ("cache_used_tokens", "Tokens stored in the latent cache."),
                  "r1c_cache_reserved_tokens": ("cache_reserved_tokens", "Rows x capacity bucket (what steps read)."),
                  "r1c_cache_capacity_tokens": ("cache_capacity_tokens", "Tokens the cache budget holds."),
                  "r1c_cache_bucket_tokens": ("cache_bucket", "Current capacity bucket (columns attention reads).")}
        for name, (key, doc) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=s[key])
        yield GaugeMetricFamily("r1c_cache_usage_ratio", "Filled cache tokens over capacity.",
                                value=s["cache_used_tokens"] / max(s["cache_capacity_tokens"], 1))
        counters = {"r1c_prompt_tokens": ("prompt_tokens", "Prompt tokens prefilled."),
                    "r1c_generation_tokens": ("generation_tokens", "Tokens generated."),
                    "r1c_requests_finished": ("finished", "Requests finished (stop or length)."),
                    "r1c_requests_cancelled": ("cancelled", "Requests cancelled (client disconnect or cancel)."),
                    "r1c_steps": ("steps", "Scheduler iterations that ran the model.")}
        for name, (key, doc) in counters.items():
            yield CounterMetricFamily(name, doc, value=s[key])
