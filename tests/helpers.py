"""Helpers shared by the integration tests: waiting for a condition, reading Server-Sent Events, a long job, the
workers' metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")


# A job that runs long enough to be caught running: ignore_eos, so its 400 tokens come whatever the model would
# say (greedy vLLM on one CPU stopped this count at "30", 192 tokens).
LONG_JOB = {"prompt": "Count from 1 to 500, one number per line.", "max_new_tokens": 400, "temperature": 0,
            "ignore_eos": True}

def poll(observe: Callable[[], T], done: Callable[[T], Any], timeout_s: float, interval_s: float = 0.05) -> T:
    """`observe()` again and again until `done(value)` or `timeout_s` has passed; the last value either way
    (for callers whose own assertions judge what came back)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = observe()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def wait_until(
    predicate: Callable[..., Any],
    timeout_s: float,
    what: str,
    *,
    observe: Callable[[], Any] | None = None,
    interval_s: float = 0.05,
) -> Any:
    """Waits until `predicate()` is truthy and returns its value; with `observe`, until `predicate(observe())` is,
    and returns what `observe` gave (so the failure can show the last thing seen, not just False)."""
    if observe is None:
        observe, predicate = predicate, bool
    value = poll(observe, predicate, timeout_s, interval_s)
    if not predicate(value):
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last seen: {value!r:.500}")
    return value


def wait_for_job_status(client, job_id: str, wanted: str, timeout_s: float) -> dict:
    """The job's record (GET /v1/jobs/{id}) once its status is `wanted`."""
    return wait_until(
        lambda job: job["status"] == wanted, timeout_s, f"job {job_id} to be {wanted}",
        observe=lambda: client.get(f"/v1/jobs/{job_id}").json(), interval_s=0.1,
    )


def worker_metric(stack, name: str, **labels: str) -> float:
    """Sample `name` (e.g. `llamaq_worker_preemptions_total`) with `labels`, summed over the stack's workers, each read
    from its own METRICS_PORT as Prometheus scrapes them (the gateway's /metrics has no worker series)."""
    total = 0.0
    for url in stack.worker_metrics_urls:
        response = httpx.get(url, timeout=10)
        response.raise_for_status()
        total += sum(sample.value for family in text_string_to_metric_families(response.text)
                     for sample in family.samples
                     if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))
    return total


def read_sse(response: httpx.Response, token_limit: int | None = None) -> list[dict[str, str]]:
    """Server-Sent Events as dicts of their fields (`id`, `event`, `data`; a multi-line `data` joined by newlines,
    comments such as pings skipped), until the stream ends or `token_limit` token events have come (a stream left
    there is hung up on when its `client.stream(...)` block ends)."""
    events, current, tokens = [], {}, 0
    for line in _sse_lines(response):
        if line.startswith(":"):
            continue
        if line == "":
            if current:
                events.append(current)
                tokens += current.get("event") == "token"
                if token_limit is not None and tokens >= token_limit:
                    break
            current = {}
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        current[field] = current[field] + "\n" + value if field == "data" and field in current else value
    return events


def _sse_lines(response: httpx.Response) -> Iterator[str]:
    # Split at line ends only: httpx's iter_lines (str.splitlines) also splits at U+2028 and its kin, which the
    # JSON of a token's text may hold unescaped.
    pending = ""
    for text in response.iter_text():
        *complete, pending = (pending + text).split("\n")
        yield from (line.removesuffix("\r") for line in complete)
    if pending:
        yield pending.removesuffix("\r")


def waiting_in_fair_queue(store, job_id: str) -> bool:
    """Whether the job waits in its client's list of the fair queue (records.FAIR_LUA), where its record says."""
    from llamaq_protocol import keys

    tier, client = store.hmget(keys.job(job_id), "fq_tier", "client")
    if tier is None or client is None:
        return False
    return store.lpos(keys.fair_jobs(tier.decode(), client.decode()), job_id) is not None


def pop_as_a_worker_would(store, queue_name: str = "llamaq") -> str | None:
    """The next job of the fair queue moved onto its RQ queue's intermediate list, as a worker's dequeue moves it
    (records.POP_SCRIPT), without claiming it."""
    from llamaq_protocol import keys
    from llamaq_protocol.records import POP_SCRIPT

    popped = store.eval(POP_SCRIPT, 0, 16, keys.job(""), *keys.fair_tiers(queue_name))
    return popped.decode() if popped else None


def admit(redis_url: str, params, priority: str = "interactive") -> str:
    """A job queued as a gateway queues one (JobService.enqueue: the admission script), without running a gateway;
    its id."""
    import asyncio

    import redis
    import redis.asyncio as aioredis

    from llamaq_gateway.jobs import JobService
    from llamaq_gateway.settings import GatewaySettings
    from llamaq_protocol import Priority

    async def enqueue() -> str:
        aio, sync = aioredis.Redis.from_url(redis_url), redis.Redis.from_url(redis_url)
        try:
            jobs = JobService(GatewaySettings(redis_url=redis_url), aio, sync, hub=None)
            job_id, _ = await jobs.enqueue(params, "public", None, None, Priority(priority))
            return job_id
        finally:
            await aio.aclose()
            sync.close()

    return asyncio.run(enqueue())
