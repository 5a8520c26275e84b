"""The trust boundary at the worker: it runs llamaq's job function (keys.GENERATE_FUNC) and nothing else. An RQ job
with any other function, or whose data does not even deserialize, is failed without running (RQ's failed registry,
the reason as its exc_string, an error logged), whether the worker pops it idle or while a batch runs. Real
redis-server, real RQ, a BatchWorker in burst mode."""

from __future__ import annotations

import logging
import uuid
import zlib
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job as RQJob
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from llamaq_protocol import GenerationParams, JobPayload, keys, utc_now
from llamaq_protocol.records import new_record
from llamaq_worker.batch_worker import BatchWorker
from llamaq_worker.engines.base import SamplingParams, SequenceSlots, StepOutput
from llamaq_worker.metrics import WorkerMetrics
from llamaq_worker.settings import WorkerSettings


class OneTokenEngine(SequenceSlots):
    """Answers every sequence with one token, finished, in the step after it was added."""

    model_name = "fake"
    context_length = 2048
    defaults = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    tokenizer = None

    def __init__(self) -> None:
        super().__init__(max_batch=4)
        self.seen: list[str] = []

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return [1, 2, 3]

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.seen.append(seq_id)
        self._enqueue(seq_id, lambda: _Seq(seq_id))

    def step(self) -> list[StepOutput]:
        done = self._take_pending()
        self._release(*done)
        return [StepOutput(seq.seq_id, "ok", 1, "stop") for seq in done]

    def device_memory(self) -> tuple[int, int]:
        return 0, 0


class _Seq:
    def __init__(self, seq_id: str) -> None:
        self.seq_id = seq_id
        self.canceled = False


@pytest.fixture
def r(lone_redis):
    client = redis.Redis.from_url(lone_redis.env["REDIS_URL"])
    client.flushall()
    yield client
    client.close()


def submit(r: redis.Redis, queue: Queue) -> str:
    """A job queued as the gateway queues one: its record, its first event, RQ's enqueue."""
    job_id = uuid.uuid4().hex
    r.hset(keys.job(job_id), mapping=new_record(utc_now(), None, "public"))
    r.xadd(keys.events(job_id), {"event": "status", "data": '{"status":"queued"}'})
    payload = JobPayload(job_id=job_id, params=GenerationParams(prompt="hi", max_new_tokens=8))
    queue.enqueue_call(func=keys.GENERATE_FUNC, args=(payload.model_dump(mode="json"),), job_id=job_id,
                       timeout=600, result_ttl=60, failure_ttl=60)
    return job_id


def foreign(queue: Queue, marker: Path) -> str:
    """What anyone who can write to Redis could queue: a job that would run a shell command on the GPU host."""
    return queue.enqueue_call(func="os.system", args=(f"touch {marker}",), failure_ttl=300).id


def test_the_worker_fails_any_job_but_llamaqs_own_without_running_it(r: redis.Redis, tmp_path, caplog) -> None:
    queue = Queue(keys.DEFAULT_QUEUE_NAME, connection=r, serializer=JSONSerializer)
    # Popped idle (execute_job), then one of ours starts a batch, during which the rest are claimed (_claim_more).
    marker_idle, marker_batch = tmp_path / "idle", tmp_path / "batch"
    idle_foreign = foreign(queue, marker_idle)
    ours_first = submit(r, queue)
    batch_foreign = foreign(queue, marker_batch)
    unreadable = queue.enqueue_call(func="os.getcwd").id
    r.hset(RQJob.key_for(unreadable), "data", zlib.compress(b"\x80 not JSON"))
    ours_second = submit(r, queue)

    engine = OneTokenEngine()
    worker = BatchWorker(
        [queue], engine=engine, settings=WorkerSettings(metrics_port=0), metrics=WorkerMetrics(engine.device_memory),
        connection=r, serializer=JSONSerializer, log_job_description=False,
    )
    with caplog.at_level(logging.ERROR, logger="llamaq_worker.batch_worker"):
        worker.work(burst=True)

    assert not marker_idle.exists() and not marker_batch.exists()
    assert sorted(engine.seen) == sorted([ours_first, ours_second])
    for job_id in (ours_first, ours_second):
        assert r.hget(keys.job(job_id), "status") == b"succeeded"
    failed = FailedJobRegistry(queue=queue)
    assert sorted(failed.get_job_ids()) == sorted([idle_foreign, batch_foreign, unreadable])
    for job_id, func in ((idle_foreign, "'os.system'"), (batch_foreign, "'os.system'"),
                         (unreadable, "'<unreadable")):
        job = RQJob.fetch(job_id, connection=r, serializer=JSONSerializer)
        assert job.get_status() == "failed"
        exc = job.latest_result().exc_string
        assert exc.startswith("refused without running") and keys.GENERATE_FUNC in exc and func in exc, exc
        assert any(job_id in rec.getMessage() and rec.levelno == logging.ERROR for rec in caplog.records), job_id
    assert queue.get_job_ids() == [] and r.llen(queue.intermediate_queue_key) == 0
    assert int(r.hget(worker.key, "failed_job_count")) == 3  # `rq info`'s count of the worker's failures
