"""GET /metrics: Prometheus text, names modelled on vLLM's (`vllm:` -> `tokenmill:`).

Values are read from the engine at scrape time (plain ints written by the engine thread; a scrape may
see a step half-applied, which Prometheus tolerates).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tokenmill.server.state import ServerState


class _EngineCollector:
    def __init__(self, state: ServerState):
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


def render(state: ServerState) -> bytes:
    registry = CollectorRegistry()
    registry.register(_EngineCollector(state))
    return generate_latest(registry)
