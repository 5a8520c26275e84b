"""PriorityQueue.dequeue_any against a real redis-server: queue order first, every pop onto an intermediate list."""

import threading
import time

import pytest
import redis
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.serializers import JSONSerializer

from llamaq_protocol import keys
from llamaq_worker.priority_queues import BATCH_POLL_S, PriorityQueue
from private_redis import private_redis


@pytest.fixture(scope="module")
def redis_url():
    with private_redis("llamaq-prio-redis-") as url:
        yield url


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


def queues(r) -> list[PriorityQueue]:
    return [PriorityQueue(name, connection=r, serializer=JSONSerializer) for name in keys.queue_names("q")]


def enqueue(queue: Queue, job_id: str) -> None:
    queue.enqueue_call(func=keys.GENERATE_FUNC, args=({},), job_id=job_id)


def test_interactive_jobs_come_first_and_every_pop_is_on_an_intermediate_list(r) -> None:
    interactive, batch = queues(r)
    for i in range(3):
        enqueue(batch, f"b{i}")
    enqueue(interactive, "i0")
    enqueue(interactive, "i1")
    order = []
    while (popped := PriorityQueue.dequeue_any([interactive, batch], None, connection=r,
                                               serializer=JSONSerializer)) is not None:
        job, queue = popped
        order.append((job.id, queue.name))
        # Until the worker claims it, a popped id sits on its own queue's intermediate list (the sweep's net).
        assert r.lrange(queue.intermediate_queue_key, 0, -1)[-1] == job.id.encode()
    assert order == [("i0", "q"), ("i1", "q"), ("b0", "q:batch"), ("b1", "q:batch"), ("b2", "q:batch")]


def test_an_idle_worker_wakes_at_once_for_interactive_and_soon_for_batch(r) -> None:
    interactive, batch = queues(r)
    with pytest.raises(DequeueTimeout):
        PriorityQueue.dequeue_any([interactive, batch], 1, connection=r, serializer=JSONSerializer)

    for target, job_id, bound_s in ((interactive, "late-i", 0.3), (batch, "late-b", BATCH_POLL_S + 0.3)):
        threading.Timer(0.2, enqueue, (target, job_id)).start()
        started = time.monotonic()
        job, queue = PriorityQueue.dequeue_any([interactive, batch], 10, connection=r, serializer=JSONSerializer)
        assert (job.id, queue.name) == (job_id, target.name)
        assert time.monotonic() - started < 0.2 + bound_s


def test_an_expired_job_is_skipped_and_leaves_no_trace(r) -> None:
    interactive, batch = queues(r)
    r.rpush(batch.key, "gone")  # an id whose RQ job hash expired
    enqueue(batch, "here")
    job, _ = PriorityQueue.dequeue_any([interactive, batch], None, connection=r, serializer=JSONSerializer)
    assert job.id == "here"
    assert r.lrange(batch.intermediate_queue_key, 0, -1) == [b"here"]
