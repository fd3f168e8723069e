"""GET /metrics: Prometheus text, names modelled on vLLM's (`vllm:` -> `tokenmill:`).

Values are read from the engine at scrape time (plain ints written by the engine thread; a scrape may
see a step half-applied, which Prometheus tolerates).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tokenmill.outputs import RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineCollector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        engine = self.state.engine.engine
        sched, kv, stats = engine.scheduler, engine.kv, engine.stats
        labels = ["model_name"]
        name = [self.state.model_name]

        def gauge(metric, doc, value):
            g = GaugeMetricFamily(f"tokenmill:{metric}", doc, labels=labels)
            g.add_metric(name, value)
            return g

        def counter(metric, doc, value):
            c = CounterMetricFamily(f"tokenmill:{metric}", doc, labels=labels)
            c.add_metric(name, value)
            return c

        yield gauge("num_requests_running", "Sequences in the running batch.", len(sched.running))
        yield gauge("num_requests_waiting", "Sequences queued or preempted.", len(sched.waiting))
        yield gauge("kv_cache_usage_perc", "Share of KV-cache blocks held by requests (0-1).", kv.usage)
        yield gauge("kv_cache_free_blocks", "KV-cache blocks not held by any request.", kv.num_free_blocks)
        yield counter("prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).",
                      stats.prompt_tokens_computed)
        yield counter("generation_tokens", "Tokens generated.", stats.generation_tokens)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", kv.stats.queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", kv.stats.hits)
        yield counter("num_preemptions", "Sequences preempted for lack of KV blocks.", sched.num_preemptions)


class ServerMetrics:
    """The engine's gauges and counters, read at scrape time, plus per-request latency histograms."""

    def __init__(self, state):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(state))
        self.model_name = state.model_name
        labels = ["model_name"]
        self.ttft = Histogram("tokenmill:time_to_first_token_seconds", "Arrival to first generated token.",
                              labels, registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("tokenmill:inter_token_latency_seconds", "Mean time between generated tokens.",
                             labels, registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("tokenmill:e2e_request_latency_seconds", "Arrival to the last token.",
                             labels, registry=self.registry, buckets=_LATENCY_BUCKETS)

    def observe(self, out: RequestOutput) -> None:
        """Called once per finished request (from the engine thread; prometheus_client is thread-safe)."""
        m = out.metrics
        if m is None or m.finished_time is None or m.first_token_time is None:
            return
        self.ttft.labels(self.model_name).observe(m.first_token_time - m.arrival_time)
        self.e2e.labels(self.model_name).observe(m.finished_time - m.arrival_time)
        tokens = max(len(c.token_ids) for c in out.outputs) if out.outputs else 0
        if tokens > 1:
            self.itl.labels(self.model_name).observe((m.finished_time - m.first_token_time) / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
