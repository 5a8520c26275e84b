"""The worker's Prometheus metrics.

They live in this process's own registry and leave it one way: served on METRICS_PORT, where Prometheus scrapes
each worker as a target of its own (a compose service each, a pod each in Kubernetes), as vLLM's production stack
scrapes each engine. They are not in the gateway's /metrics: each series is counted once, by the one worker that
has it, and a query sums over the workers' targets with no label of ours to de-duplicate by.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .engines.base import PRIORITY_NAMES, EngineStats

# Counters without their `_created` twins: half the series.
disable_created_metrics()

# Latencies on CPU run to minutes, on a GPU to milliseconds.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    def __init__(self, device_memory: Callable[[], tuple[int, int]], engine_stats: EngineStats | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        # By priority (interactive, batch, over): what interactive-first decides is how long each waits.
        self.queue_wait = Histogram("llamaq_job_queue_wait_seconds", "Time from enqueue to a worker admitting the job",
                                    ["priority"], buckets=SECONDS_BUCKETS, registry=r)
        self.run_time = Histogram("llamaq_job_run_seconds", "Time from admission to the job's end on the worker",
                                  buckets=SECONDS_BUCKETS, registry=r)
        self.first_token = Histogram("llamaq_time_to_first_token_seconds",
                                     "Time from enqueue to the job's first generated token (what a client waits)",
                                     ["priority"], buckets=SECONDS_BUCKETS, registry=r)
        for name in PRIORITY_NAMES.values():  # every series there from the start, at 0
            self.queue_wait.labels(priority=name)
            self.first_token.labels(priority=name)
        self.generated_tokens = Counter("llamaq_generated_tokens", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter("llamaq_prompt_tokens", "Prompt tokens of admitted jobs", registry=r)
        self.batch_size = Histogram("llamaq_batch_size", "Sequences in the batch at each decoding step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.jobs_running = Gauge("llamaq_worker_jobs_running", "Jobs in this worker's batch now", registry=r)
        used = Gauge("llamaq_gpu_memory_used_bytes", "GPU memory held by tensors (0 on a CPU worker)", registry=r)
        reserved = Gauge("llamaq_gpu_memory_reserved_bytes", "GPU memory reserved by torch's allocator (0 on a CPU "
                         "worker)", registry=r)
        used.set_function(lambda: device_memory()[0])
        reserved.set_function(lambda: device_memory()[1])
        if engine_stats is not None:
            self._engine_series(engine_stats)

    def _engine_series(self, stats: EngineStats) -> None:
        """What the engine's own scheduler knows (vLLM: its running and waiting sequences, KV cache, preemptions; the
        transformers and paced engines: their batch and preemptions)."""
        r = self.registry
        Gauge("llamaq_engine_requests_running", "Sequences the engine is decoding now", registry=r).set_function(
            lambda: stats.running)
        Gauge("llamaq_engine_requests_waiting", "Sequences handed to the engine and waiting for room in it",
              registry=r).set_function(lambda: stats.waiting)
        Gauge("llamaq_engine_kv_cache_usage_ratio", "Share of the engine's KV cache blocks in use (0..1)",
              registry=r).set_function(lambda: stats.kv_cache_usage)

        class Preemptions(Collector):
            def collect(self):
                yield CounterMetricFamily("llamaq_engine_preemptions", "Sequences the engine preempted (KV cache "
                                          "full, or a higher priority's took their place) to recompute later",
                                          value=stats.preemptions)

        class PreemptionsByPriority(Collector):
            def collect(self):
                family = CounterMetricFamily("llamaq_worker_preemptions", "Sequences the engine preempted, by their "
                                             "priority (a higher priority's took their place, or the KV cache was "
                                             "full), to resume later", labels=["priority"])
                for priority, name in PRIORITY_NAMES.items():
                    family.add_metric([name], stats.preempted.get(priority, 0))
                yield family

        r.register(Preemptions())
        r.register(PreemptionsByPriority())

    def serve(self, port: int) -> None:
        """A daemon thread answering GET /metrics on `port` (threads only: the worker never forks)."""
        start_http_server(port, registry=self.registry)


def seconds_since(moment: datetime | None) -> float | None:
    """Age of an RQ timestamp (RQ writes UTC, naive in older releases); None when unknown."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, (datetime.now(timezone.utc) - moment).total_seconds())
