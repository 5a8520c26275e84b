"""Prometheus metrics for `GET /metrics`.

Two sources, one exposition:
- this gateway's HTTP series, summed over every gunicorn process (prometheus-client's multiprocess mode: each
  process writes its values under PROMETHEUS_MULTIPROC_DIR, which gunicorn_conf prepares);
- the queue as Redis holds it, read at scrape time: queue depth, running jobs, live workers, jobs by final
  status (counted by the job-state scripts, so every worker's and the sweeper's outcomes are in it), each key's
  usage.

The workers' series are not here: Prometheus scrapes each worker's own METRICS_PORT (llamaq_worker.metrics), so
each is counted once. The queue's series, read from the one Redis, are the same on every gateway replica scraped:
queries over them take one (`max by (queue) (llamaq_queue_depth)`, `max(llamaq_workers_alive)`), while the HTTP
series are each replica's own and add up (`sum`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llamaq_protocol import JobStatus, keys

__all__ = ["CONTENT_TYPE_LATEST", "HTTP_DURATION", "HTTP_REQUESTS", "SLOW_SUBSCRIBERS_DROPPED", "ClusterState",
           "render"]

HTTP_REQUESTS = Counter("llamaq_http_requests", "Requests answered by the gateway", ["method", "route", "status"])
HTTP_DURATION = Histogram(
    "llamaq_http_request_duration_seconds", "Time the gateway took to answer (waits for jobs included)",
    ["method", "route"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
SLOW_SUBSCRIBERS_DROPPED = Counter(
    "llamaq_stream_subscribers_dropped", "Event-stream readers dropped as too slow (STREAM_MAX_PENDING_EVENTS); each "
    "ends with an end it resumes from")
TERMINAL_STATUSES = [status.value for status in JobStatus if status.is_terminal()]
# Each key's usage (keys.usage), as llamaq_key_<field>_total{key}.
USAGE_FIELDS = [("requests", "Requests admitted"), ("prompt_tokens", "Prompt tokens processed"),
                ("completion_tokens", "Tokens generated")]


@dataclass(eq=False)  # registered as a collector, so hashed by identity
class ClusterState:
    """What Redis says at scrape time."""

    # queue name -> jobs waiting in it (one RQ queue per priority)
    queue_depths: dict[str, int]
    jobs_running: int
    finished: dict[str, int]
    workers_alive: int
    # account (a key's name, or "anonymous") -> its usage hash (requests, prompt_tokens, completion_tokens)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    async def read(cls, jobs, accounts: list[str]) -> ClusterState:
        """From the gateway's JobService: its Redis, its queue and its notion of a live worker; and the usage of
        `accounts` (the keys' names: a bounded label, never a raw key or an address)."""
        aio = jobs.aio
        base = jobs.settings.queue_name
        # Each tier of the fair queue under the name of the RQ queue its jobs run from (over-quota: `<base>:over`).
        tiers = {keys.fair_tier(base, tier): keys.queue_name(base, tier) if tier != "over" else f"{base}:over"
                 for tier in keys.FAIR_TIERS}
        async with aio.pipeline(transaction=False) as pipe:
            for tier in tiers:
                pipe.llen(tier + ":depth")
            pipe.scard(keys.RUNNING)
            pipe.hgetall(keys.STATS)
            pipe.zcount(keys.WORKERS, jobs.fresh_since(), "+inf")
            for account in accounts:
                pipe.hgetall(keys.usage(account))
            replies = await pipe.execute()
        depths, rest = replies[:len(tiers)], replies[len(tiers):]
        running, stats, workers_alive, usages = rest[0], rest[1], rest[2], rest[3:]
        return cls(
            queue_depths={name: int(depth or 0) for name, depth in zip(tiers.values(), depths)},
            usage={account: {k.decode(): int(v) for k, v in found.items()} for account, found in zip(accounts, usages)},
            jobs_running=running,
            finished={k.decode(): int(v) for k, v in stats.items()},
            workers_alive=workers_alive,
        )

    def collect(self):
        # Read from the one Redis: every gateway replica shows the same values (queries take one, `max by (queue)`).
        depth = GaugeMetricFamily("llamaq_queue_depth", "Jobs waiting in the queue", labels=["queue"])
        for name, waiting in self.queue_depths.items():
            depth.add_metric([name], waiting)
        yield depth
        yield GaugeMetricFamily("llamaq_jobs_running", "Jobs held by workers now", value=self.jobs_running)
        yield GaugeMetricFamily("llamaq_workers_alive", "Workers with a fresh heartbeat",
                                value=self.workers_alive)
        finished = CounterMetricFamily("llamaq_jobs_finished", "Jobs ended, by final status", labels=["status"])
        for status in TERMINAL_STATUSES:
            finished.add_metric([status], self.finished.get(status, 0))
        yield finished
        for field_name, what in USAGE_FIELDS:
            family = CounterMetricFamily(f"llamaq_key_{field_name}", f"{what}, by API key name", labels=["key"])
            for account, used in sorted(self.usage.items()):
                family.add_metric([account], used.get(field_name, 0))
            yield family


def _process_registry() -> CollectorRegistry:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY  # one process (tests, `uvicorn` by hand)


def render(state: ClusterState) -> bytes:
    cluster = CollectorRegistry()
    cluster.register(state)
    return generate_latest(_process_registry()) + generate_latest(cluster)
