"""The server's Prometheus metrics: requests, latencies, the queue, tokens, the engine's cache.

The engine runs one request at a time: `sbr_concurrency_limit` says so, `sbr_queue_depth` and
`sbr_queue_seconds` show what waiting for it costs, `sbr_max_queue` is where 503s begin.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.server.worker import EngineWorker, Job, Outcome

CACHE_COUNTERS = frozenset(
    {  # monotonic keys of Engine.cache_stats(); the rest are gauges
        "requests",
        "hits",
        "misses",
        "cold",
        "rejected",
        "admits",
        "admit_refused",
        "hit_tokens",
        "replay_tokens",
        "kv_evicted_pages",
    }
)


class CacheCollector:
    """Exports the engine's cache counters (as of the last finished request) on each scrape."""

    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterable[Any]:
        stats = self.worker.cache_stats
        evictions = CounterMetricFamily(
            "sbr_snapshot_evictions", "Snapshot evictions by reason.", labels=["reason"]
        )
        for key, value in sorted(stats.items()):
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if key.startswith("evictions_"):
                evictions.add_metric([key.removeprefix("evictions_")], value)
            elif key in CACHE_COUNTERS:
                yield CounterMetricFamily(
                    f"sbr_cache_{key}", f"Engine cache counter {key}.", value=value
                )
            else:
                yield GaugeMetricFamily(
                    f"sbr_cache_{key}", f"Engine cache gauge {key}.", value=value
                )
        yield evictions


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (no process-global state)."""

    def __init__(self, worker: EngineWorker) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "sbr_requests",
            "Requests by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "sbr_ttft_seconds",
            "Engine time to first token.",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.queue_wait = Histogram(
            "sbr_queue_seconds",
            "Time spent waiting for the engine.",
            registry=r,
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
        )
        self.e2e = Histogram(
            "sbr_e2e_seconds",
            "Engine end-to-end time per request.",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.replay_hist = Histogram(
            "sbr_replay_tokens",
            "Replay distance m - s per request.",
            registry=r,
            buckets=(0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768),
        )
        self.tokens = Counter(
            "sbr_tokens",
            "Tokens by kind: prompt, cached, replay, new, generated.",
            ["kind"],
            registry=r,
        )
        Gauge("sbr_queue_depth", "Requests waiting for the engine.", registry=r).set_function(
            lambda: worker.waiting
        )
        Gauge("sbr_busy", "1 while the engine runs a request.", registry=r).set_function(
            lambda: int(worker.busy)
        )
        Gauge("sbr_concurrency_limit", "Requests the engine runs at once (no batching).",
              registry=r).set(1)
        Gauge("sbr_max_queue", "Requests that may wait before the server answers 503.",
              registry=r).set(worker.max_queue)
        r.register(CacheCollector(worker))

    def finished(self, job: Job, out: Outcome | None, outcome: str) -> None:
        """Called by the worker thread when a job ends (prometheus_client is thread-safe)."""
        self.requests.labels(job.endpoint, outcome).inc()
        if out is not None:
            self.observe(out)

    def observe(self, out: Outcome) -> None:
        st = out.result.stats
        s = st.cache
        self.ttft.observe(st.timing.ttft_s)
        self.e2e.observe(st.timing.e2e_s)
        self.queue_wait.observe(out.queue_s)
        self.replay_hist.observe(s.replay_tokens)
        for kind, n in (
            ("prompt", s.prompt_tokens),
            ("cached", s.cached_tokens),
            ("replay", s.replay_tokens),
            ("new", s.new_tokens),
            ("generated", st.generated_tokens),
        ):
            self.tokens.labels(kind).inc(n)
