"""The fair queue on a real redis-server of its own: the gateway's admission (JobService.enqueue, ADMIT_SCRIPT) and
the worker's pop (PriorityQueue.dequeue_any, POP_SCRIPT), claim and token charges (CLAIM_SCRIPT, TOKENS_SCRIPT),
without a model: what order jobs are claimed in, what limits refuse, what positions say."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio as aioredis
from rq.exceptions import DequeueTimeout
from rq.serializers import JSONSerializer

from llamaq_gateway.callers import Caller, KeyLimits
from llamaq_gateway.errors import IdempotencyConflict, QueueFull, RateLimited
from llamaq_gateway.jobs import JobService
from llamaq_gateway.settings import GatewaySettings
from llamaq_protocol import GenerationParams, Priority, keys
from llamaq_protocol.records import (
    CANCEL_SCRIPT, CLAIM_SCRIPT, FINISH_SCRIPT, TOKENS_SCRIPT, claim_keys, end_keys, tokens_call,
)
from llamaq_worker.priority_queues import PriorityQueue
from llamaq_worker.rq_adapter import intermediate_key
from private_redis import emptied, private_redis

PROMPT_TOKENS = 10
MAX_NEW = 20


@pytest.fixture(scope="module")
def redis_url():
    with private_redis("llamaq-fair-redis-") as url:
        yield url


@pytest.fixture
def r(redis_url):
    with emptied(redis_url) as client:
        yield client


class Harness:
    """A gateway's JobService (admission) and a worker's pop on one Redis, driven step by step."""

    def __init__(self, url: str, r: redis.Redis, **settings):
        self.r = r
        self.settings = GatewaySettings(redis_url=url, **settings)
        self.aio = aioredis.Redis.from_url(url)
        self.jobs = JobService(self.settings, self.aio, r, hub=None)
        self.queues = [PriorityQueue(name, connection=r, serializer=JSONSerializer)
                       for name in keys.queue_names(self.settings.queue_name)]
        self.loop = asyncio.new_event_loop()

    def submit(self, caller: Caller, priority=Priority.interactive, idempotency_key=None, max_new=MAX_NEW, n=1,
               prompt="hi"):
        params = GenerationParams(prompt=prompt, max_new_tokens=max_new, n=n)
        job_id, _ = self.loop.run_until_complete(self.jobs.enqueue(
            params, caller.owner, None, idempotency_key, priority, caller=caller, prompt_tokens=PROMPT_TOKENS))
        return job_id

    def pop(self, worker="w:1"):
        """The next job popped and claimed as a worker does (None when nothing can be taken)."""
        popped = PriorityQueue.dequeue_any(self.queues, None, connection=self.r, serializer=JSONSerializer)
        if popped is None:
            return None
        job, queue = popped
        assert self.r.eval(CLAIM_SCRIPT, 4, *claim_keys(job.id), "t1", worker, job.id) == b"claimed"
        self.r.lrem(intermediate_key(queue), 1, job.id)
        return job.id

    def generate(self, job_id, tokens, worker="w:1"):
        call_keys, args = tokens_call(worker, [(job_id, 0, 100, "", [], tokens)])
        self.r.eval(TOKENS_SCRIPT, len(call_keys), *call_keys, *args)

    def finish(self, job_id, worker="w:1"):
        assert self.r.eval(FINISH_SCRIPT, len(end_keys(job_id)), *end_keys(job_id), "succeeded", "t2", "", "", 60,
                           job_id, worker) == b"finished"

    def position(self, job_id, owner):
        return self.loop.run_until_complete(self.jobs.get(job_id, owner)).position

    def close(self):
        self.loop.run_until_complete(self.aio.aclose())
        self.loop.close()


@pytest.fixture
def fq(redis_url, r):
    harness = Harness(redis_url, r)
    yield harness
    harness.close()


def key(name, weight=1.0, **limits) -> Caller:
    return Caller(owner=f"owner-{name}", client=name, account=name, weight=weight, limits=KeyLimits(**limits),
                  list_owner=f"owner-{name}")


def run_everything(fq: Harness, tokens_each: int = MAX_NEW) -> list[str]:
    """Pop, generate and finish one job at a time until none is left; the order they ran in."""
    order = []
    while (job_id := fq.pop()) is not None:
        fq.generate(job_id, tokens_each)
        fq.finish(job_id)
        order.append(job_id)
    return order


def test_a_flooding_client_does_not_make_another_wait_behind_its_backlog(fq):
    a, b = key("a"), key("b")
    flood = [fq.submit(a) for _ in range(50)]
    late = [fq.submit(b) for _ in range(3)]
    # B's first job is next after the job A has already been served, not after A's 50.
    first = fq.pop()
    assert first == flood[0]
    fq.generate(first, MAX_NEW)
    fq.finish(first)
    order = [first] + run_everything(fq)
    places = [order.index(job) for job in late]
    assert places == [1, 3, 5], places  # alternating with A while both wait
    assert len(order) == 53


def test_weights_share_the_engine_in_proportion(fq):
    heavy, light = key("heavy", weight=3), key("light", weight=1)
    for _ in range(40):
        fq.submit(heavy)
        fq.submit(light)
    first_twenty = []
    for _ in range(20):
        job_id = fq.pop()
        first_twenty.append(fq.r.hget(keys.job(job_id), "client").decode())
        fq.generate(job_id, MAX_NEW)
        fq.finish(job_id)
    assert 14 <= first_twenty.count("heavy") <= 16, first_twenty


def test_an_idle_client_banks_no_credit(fq):
    a, b = key("a"), key("b")
    # A works alone for a while: it is served a lot, B nothing.
    for _ in range(10):
        fq.submit(a)
    run_everything(fq)
    # Both now queue work at once: B, idle until now, is lifted to A's service and does not get 10 jobs in a row.
    a_jobs = [fq.submit(a) for _ in range(6)]
    b_jobs = [fq.submit(b) for _ in range(6)]
    order = run_everything(fq)
    first_six = order[:6]
    assert 2 <= sum(job in b_jobs for job in first_six) <= 4, (first_six, a_jobs, b_jobs)


def test_service_is_counted_in_tokens_so_long_jobs_weigh_more(fq):
    short, long = key("short"), key("long")
    for _ in range(10):
        fq.submit(short, max_new=10)
        fq.submit(long, max_new=200)
    ran = []
    for _ in range(10):
        job_id = fq.pop()
        client = fq.r.hget(keys.job(job_id), "client").decode()
        fq.generate(job_id, 10 if client == "short" else 200)
        fq.finish(job_id)
        ran.append(client)
    assert ran.count("short") >= 7, ran


def test_interactive_before_batch_and_over_quota_last(fq):
    a = key("a", rpm=1, over_limit="queue")
    batch = fq.submit(key("b"), priority=Priority.batch)
    first = fq.submit(a)
    over = fq.submit(a)  # over its one request per minute: queued behind everyone's
    interactive = fq.submit(key("c"))
    assert fq.r.hget(keys.job(over), "fq_tier").decode().endswith(":over")
    assert run_everything(fq) == [first, interactive, batch, over]


def test_max_concurrent_holds_a_key_to_its_running_jobs(fq):
    a, b = key("a", max_concurrent=1), key("b")
    a1, a2 = fq.submit(a), fq.submit(a)
    b1 = fq.submit(b)
    assert fq.pop() == a1
    assert fq.pop() == b1  # a2 waits while a1 runs
    assert fq.pop() is None
    fq.finish(a1)
    assert fq.pop() == a2


def test_limits_refuse_with_retry_after_and_report_the_openai_headers(fq):
    a = key("a", rpm=2, tpm=1000)
    fq.submit(a)
    assert a.rate_headers["x-ratelimit-limit-requests"] == "2"
    assert a.rate_headers["x-ratelimit-remaining-requests"] == "1"
    assert a.rate_headers["x-ratelimit-remaining-tokens"] == str(1000 - PROMPT_TOKENS - MAX_NEW)
    assert a.rate_headers["x-ratelimit-reset-requests"].endswith("s")
    fq.submit(a)
    with pytest.raises(RateLimited) as refused:
        fq.submit(a)
    assert 1 <= refused.value.retry_after_s <= 30
    assert a.rate_headers["x-ratelimit-remaining-requests"] == "0"
    run_everything(fq)
    # Tokens: reserved at admission (prompt + max tokens), the unused part given back at the end.
    t = key("t", tpm=100)
    job = fq.submit(t, max_new=80)
    with pytest.raises(RateLimited):
        fq.submit(t, max_new=20)
    assert fq.pop() == job
    fq.generate(job, 5)
    fq.finish(job)
    fq.submit(t, max_new=20)  # 75 of the 90 reserved came back


def test_bounds_per_queue_and_per_client_are_exact(redis_url, r):
    small = Harness(redis_url, r, max_queue=4, max_client_share=0.5)
    try:
        a, b = key("a"), key("b")
        small.submit(a)
        small.submit(a)
        with pytest.raises(QueueFull):
            small.submit(a)  # its share: half of the queue
        small.submit(b)
        small.submit(b)
        with pytest.raises(QueueFull):
            small.submit(key("c"))  # the queue itself
        # Concurrent submissions never exceed the bound: the check and the write are one script.
        small.r.flushall()

        async def many():
            callers = [key(f"k{i}") for i in range(20)]
            results = await asyncio.gather(*[
                small.jobs.enqueue(GenerationParams(prompt="x", max_new_tokens=5), c.owner, None, None, caller=c,
                                   prompt_tokens=1) for c in callers], return_exceptions=True)
            return results

        results = small.loop.run_until_complete(many())
        assert sum(not isinstance(x, Exception) for x in results) == 4
        assert small.r.llen(keys.fair_tier("llamaq", "interactive") + ":depth") == 4
    finally:
        small.close()


def test_an_idempotency_key_is_never_left_held_by_no_job(fq):
    a = key("a")
    first = fq.submit(a, idempotency_key="k1")
    assert fq.submit(a, idempotency_key="k1") == first
    with pytest.raises(IdempotencyConflict):
        fq.submit(a, idempotency_key="k1", prompt="another body")
    # Refused admissions (over a limit) write nothing: the key stays free for the retry.
    limited = key("l", rpm=1)
    fq.submit(limited)
    with pytest.raises(RateLimited):
        fq.submit(limited, idempotency_key="k2")
    assert fq.r.get(keys.idempotency(limited.owner, "k2")) is None


def test_positions_count_what_will_run_first(fq):
    a, b = key("a"), key("b")
    flood = [fq.submit(a) for _ in range(30)]
    late = fq.submit(b)
    assert fq.position(flood[0], a.owner) == 0
    # B's job goes after A's first (equal service, A's jobs are older), not after all 30.
    assert fq.position(late, b.owner) <= 2
    assert fq.position(flood[20], a.owner) >= 20
    batch = fq.submit(b, priority=Priority.batch)
    assert fq.position(batch, b.owner) == 31


def test_a_canceled_queued_job_leaves_the_fair_queue(fq):
    a = key("a", tpm=1000)
    job = fq.submit(a)
    assert fq.r.eval(CANCEL_SCRIPT, len(end_keys(job)), *end_keys(job), "t", job, 60) == b"canceled"
    assert fq.pop() is None
    assert fq.r.llen(keys.fair_tier("llamaq", "interactive") + ":depth") == 0
    # Its whole reservation is back.
    fq.submit(a)
    assert a.rate_headers["x-ratelimit-remaining-tokens"] == str(1000 - PROMPT_TOKENS - MAX_NEW)


def test_a_pop_costs_the_same_at_ten_thousand_queued_jobs_as_at_ten(redis_url, r):
    big = Harness(redis_url, r, max_queue=20_000)
    try:
        def pop_cost(queued: int) -> float:
            big.r.flushall()
            callers = [key(f"c{i}") for i in range(4)]
            for i in range(queued):
                big.submit(callers[i % 4])
            started = time.perf_counter()
            for _ in range(10):
                big.pop()
            return (time.perf_counter() - started) / 10

        small, large = pop_cost(10), pop_cost(10_000)
    finally:
        big.close()
    # A loose bound (this is no benchmark; scripts/bench_fairness.py measures it): no scan of the waiting jobs.
    assert large < small * 3 + 0.002, (small, large)


def test_a_popped_job_waits_on_its_queues_intermediate_list_until_claimed(fq):
    job_id = fq.submit(key("a"), priority=Priority.batch)
    job, queue = PriorityQueue.dequeue_any(fq.queues, None, connection=fq.r, serializer=JSONSerializer)
    assert (job.id, queue.name) == (job_id, "llamaq:batch")
    # Until the worker claims it, a popped id sits there (the sweep's net should the worker die first).
    assert fq.r.lrange(intermediate_key(queue), 0, -1) == [job_id.encode()]
    assert fq.r.llen(queue.key) == 0  # RQ's own list is not where jobs wait


def test_an_idle_worker_wakes_at_once_for_any_tier(fq):
    with pytest.raises(DequeueTimeout):
        PriorityQueue.dequeue_any(fq.queues, 0.3, connection=fq.r, serializer=JSONSerializer)
    for priority in (Priority.interactive, Priority.batch):
        # A job queued from another thread (its own event loop and connection, as another gateway would).
        submitter = Harness(fq.settings.redis_url, redis.Redis.from_url(fq.settings.redis_url))
        submitted = {}
        timer = threading.Timer(0.2, lambda: submitted.setdefault("id", submitter.submit(key("a"), priority)))
        timer.start()
        started = time.monotonic()
        job, _ = PriorityQueue.dequeue_any(fq.queues, 10, connection=fq.r, serializer=JSONSerializer)
        timer.join()
        submitter.close()
        assert job.id == submitted["id"]
        assert time.monotonic() - started < 0.2 + 0.3  # woken by the admission, not by the poll (WAKE_POLL_S)


def test_a_job_whose_rq_record_expired_is_skipped(fq):
    gone, here = fq.submit(key("a")), fq.submit(key("a"))
    fq.r.delete(f"rq:job:{gone}")
    job, queue = PriorityQueue.dequeue_any(fq.queues, None, connection=fq.r, serializer=JSONSerializer)
    assert job.id == here
    assert fq.r.lrange(intermediate_key(queue), 0, -1) == [here.encode()]
