"""Claiming that knows the engine (DecodingWorker._claim_more, the fair queue's pop by tier): with MAX_BATCH batch jobs
running an interactive job is still claimed, into the engine's headroom, and handed to it with its priority; batch
work is never claimed beyond MAX_BATCH, nor while the engine says it has no room (sequences waiting in it, its KV
cache full): it waits in the fair queue instead. Real redis-server, jobs admitted as the gateway admits them, a real
DecodingWorker over the fair queue and a model-free engine."""

from __future__ import annotations

import pytest
import redis
from rq.serializers import JSONSerializer

from fake_engines import FakeEngine
from helpers import admit, waiting_in_fair_queue
from llamaq_protocol import GenerationParams, keys
from llamaq_worker.decoding_loop import DecodingWorker
from llamaq_worker.claiming import job_priority
from llamaq_worker.engines.base import PRIORITY_BATCH, PRIORITY_INTERACTIVE, PRIORITY_OVER, EngineStats
from llamaq_worker.metrics import WorkerMetrics
from llamaq_worker.priority_queues import PriorityQueue
from llamaq_worker.settings import WorkerSettings
from private_redis import emptied


class HoldingEngine(FakeEngine):
    """Holds every sequence it is given (no step runs here), noting each one's priority; reports `stats`."""

    def __init__(self, max_batch: int, headroom: int) -> None:
        super().__init__()
        self.max_batch, self.headroom = max_batch, headroom
        self.stats = EngineStats()
        self.priorities: dict[str, int] = {}

    def add(self, seq_id, prompt_ids, params, priority=PRIORITY_INTERACTIVE) -> None:
        super().add(seq_id, prompt_ids, params, priority)
        self.priorities[seq_id] = priority


@pytest.fixture
def r(lone_redis):
    with emptied(lone_redis.env["REDIS_URL"]) as client:
        yield client


def make_worker(r: redis.Redis, engine: HoldingEngine, per_step: int | None = None) -> DecodingWorker:
    """A worker over the fair queue; `per_step`: BATCH_CLAIM_PER_STEP (None: no limit, MAX_BATCH)."""
    queues = [PriorityQueue(name, connection=r, serializer=JSONSerializer)
              for name in keys.queue_names(keys.DEFAULT_QUEUE_NAME)]
    settings = WorkerSettings(metrics_port=0, max_batch=engine.max_batch, interactive_headroom=engine.headroom,
                              batch_claim_per_step=per_step or engine.max_batch)
    return DecodingWorker(queues, queue_class=PriorityQueue, engine=engine, settings=settings,
                       metrics=WorkerMetrics(engine.device_memory, engine.stats), connection=r,
                       serializer=JSONSerializer, log_job_description=False)


def claim_at_next_step(worker: DecodingWorker) -> None:
    """What the decoding loop claims between two engine steps."""
    worker.engine.stats.steps += 1
    worker._claim_more()


def queue_jobs(url: str, priority: str, n: int) -> list[str]:
    return [admit(url, GenerationParams(prompt="hi", max_new_tokens=8), priority) for _ in range(n)]


def test_interactive_work_takes_the_headroom_batch_work_stops_at_max_batch(r: redis.Redis, lone_redis) -> None:
    url = lone_redis.env["REDIS_URL"]
    engine = HoldingEngine(max_batch=2, headroom=1)
    worker = make_worker(r, engine)
    batch = queue_jobs(url, "batch", 3)
    claim_at_next_step(worker)
    # MAX_BATCH batch jobs claimed; the third waits in the fair queue though the headroom is free.
    assert list(worker.slots) == batch[:2]
    assert waiting_in_fair_queue(r, batch[2]) and r.hget(keys.job(batch[2]), "status") == b"queued"

    interactive = queue_jobs(url, "interactive", 2)
    claim_at_next_step(worker)
    # One interactive job at once, into the headroom, with its priority; the next finds no room.
    assert list(worker.slots) == batch[:2] + interactive[:1]
    assert engine.priorities == {batch[0]: PRIORITY_BATCH, batch[1]: PRIORITY_BATCH,
                                 interactive[0]: PRIORITY_INTERACTIVE}
    assert [worker.slots[job_id].priority for job_id in worker.slots] == [PRIORITY_BATCH] * 2 + [PRIORITY_INTERACTIVE]
    assert r.hget(keys.job(interactive[0]), "status") == b"running"
    for job_id in (batch[2], interactive[1]):
        assert waiting_in_fair_queue(r, job_id)

    # A batch job ends: the interactive job takes its slot; the batch one still waits (MAX_BATCH are running).
    held = {}

    def end(job_id: str) -> None:
        held.update((seq.seq_id, seq) for seq in engine._take_pending())
        engine._release(held.pop(job_id))
        worker.slots.pop(job_id)

    end(batch[0])
    claim_at_next_step(worker)
    assert list(worker.slots) == [batch[1], interactive[0], interactive[1]]
    end(interactive[0])
    end(interactive[1])
    claim_at_next_step(worker)  # room under MAX_BATCH again
    assert list(worker.slots) == [batch[1], batch[2]]


def test_batch_work_waits_while_the_engine_has_no_room(r: redis.Redis, lone_redis) -> None:
    url = lone_redis.env["REDIS_URL"]
    engine = HoldingEngine(max_batch=4, headroom=1)
    worker = make_worker(r, engine)
    batch = queue_jobs(url, "batch", 2)

    engine.stats.kv_cache_usage = 0.95  # above BATCH_CLAIM_MAX_KV (0.9)
    claim_at_next_step(worker)
    assert not worker.slots
    interactive = queue_jobs(url, "interactive", 1)
    claim_at_next_step(worker)  # interactive work is claimed all the same (the engine decodes it first)
    assert list(worker.slots) == interactive

    engine.stats.kv_cache_usage, engine.stats.waiting = 0.5, 1  # a sequence waits inside the engine
    claim_at_next_step(worker)
    assert list(worker.slots) == interactive
    assert all(waiting_in_fair_queue(r, job_id) for job_id in batch)

    engine.stats.waiting = 0  # room again
    claim_at_next_step(worker)
    assert list(worker.slots) == interactive + batch
    assert [engine.priorities[job_id] for job_id in batch] == [PRIORITY_BATCH] * 2


def test_a_backlog_starts_a_few_jobs_per_step_interactive_work_at_once(r: redis.Redis, lone_redis) -> None:
    url = lone_redis.env["REDIS_URL"]
    engine = HoldingEngine(max_batch=8, headroom=2)
    worker = make_worker(r, engine, per_step=3)
    batch = queue_jobs(url, "batch", 8)
    claim_at_next_step(worker)  # one step's claims: BATCH_CLAIM_PER_STEP of the backlog
    assert list(worker.slots) == batch[:3]
    worker._claim_more()  # the loop again before the engine's next step (vLLM steps apart from it): none more
    assert list(worker.slots) == batch[:3]
    assert all(waiting_in_fair_queue(r, job_id) for job_id in batch[3:])

    interactive = queue_jobs(url, "interactive", 2)
    claim_at_next_step(worker)  # the next step: the interactive jobs are not counted against the backlog's share
    assert list(worker.slots) == batch[:3] + interactive + batch[3:6]
    claim_at_next_step(worker)
    assert list(worker.slots) == batch[:3] + interactive + batch[3:6]  # MAX_BATCH reached (interactive jobs count)
    assert all(waiting_in_fair_queue(r, job_id) for job_id in batch[6:])


def test_batch_claims_per_step_auto_is_an_eighth_of_max_batch() -> None:
    assert [WorkerSettings(metrics_port=0, max_batch=n).batch_claims_per_step for n in (1, 8, 16, 64)] == [1, 1, 2, 8]
    assert WorkerSettings(metrics_port=0, max_batch=16, batch_claim_per_step=5).batch_claims_per_step == 5


def test_a_jobs_priority_is_its_tiers_or_its_rq_queues() -> None:
    interactive, batch = (PriorityQueue(name, connection=redis.Redis(), serializer=JSONSerializer)
                          for name in keys.queue_names(keys.DEFAULT_QUEUE_NAME))
    for tier, priority in (("interactive", PRIORITY_INTERACTIVE), ("batch", PRIORITY_BATCH), ("over", PRIORITY_OVER)):
        assert job_priority(keys.fair_tier(keys.DEFAULT_QUEUE_NAME, tier).encode(), interactive) == priority
    assert job_priority(None, interactive) == PRIORITY_INTERACTIVE  # queued on RQ's own lists
    assert job_priority(None, batch) == PRIORITY_BATCH
