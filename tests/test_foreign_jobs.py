"""The trust boundary at the worker: it runs llamaq's job function (keys.GENERATE_FUNC) and nothing else. An RQ job
with any other function, or whose data does not even deserialize, is failed without running (RQ's failed registry,
the reason as its exc_string, an error logged), whether the worker pops it idle or while a batch runs. Real
redis-server, real RQ, a DecodingWorker in burst mode."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job as RQJob
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from fake_engines import FakeEngine, queue_on_rq_list
from llamaq_protocol import keys
from llamaq_worker.decoding_loop import DecodingWorker
from llamaq_worker.engines.base import StepOutput
from llamaq_worker.metrics import WorkerMetrics
from llamaq_worker.rq_adapter import intermediate_key
from llamaq_worker.settings import WorkerSettings
from private_redis import emptied


class OneTokenEngine(FakeEngine):
    """Answers every sequence with one token, finished, in the step after it was added."""

    def step(self) -> list[StepOutput]:
        done = self._take_pending()
        self._release(*done)
        return [StepOutput(seq.seq_id, "ok", 1, "stop") for seq in done]


@pytest.fixture
def r(lone_redis):
    with emptied(lone_redis.env["REDIS_URL"]) as client:
        yield client


def foreign(queue: Queue, marker: Path) -> str:
    """What anyone who can write to Redis could queue: a job that would run a shell command on the GPU host."""
    return queue.enqueue_call(func="os.system", args=(f"touch {marker}",), failure_ttl=300).id


def test_the_worker_fails_any_job_but_llamaqs_own_without_running_it(r: redis.Redis, tmp_path, caplog) -> None:
    queue = Queue(keys.DEFAULT_QUEUE_NAME, connection=r, serializer=JSONSerializer)
    # Popped idle (execute_job), then one of ours starts a batch, during which the rest are claimed (_claim_more).
    marker_idle, marker_batch = tmp_path / "idle", tmp_path / "batch"
    idle_foreign = foreign(queue, marker_idle)
    ours_first = queue_on_rq_list(r, queue)
    batch_foreign = foreign(queue, marker_batch)
    unreadable = queue.enqueue_call(func="os.getcwd").id
    r.hset(RQJob.key_for(unreadable), "data", zlib.compress(b"\x80 not JSON"))
    ours_second = queue_on_rq_list(r, queue)

    engine = OneTokenEngine()
    worker = DecodingWorker(
        [queue], engine=engine, settings=WorkerSettings(metrics_port=0), metrics=WorkerMetrics(engine.device_memory),
        connection=r, serializer=JSONSerializer, log_job_description=False,
    )
    with caplog.at_level(logging.ERROR, logger="llamaq_worker.decoding_loop"):
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
    assert queue.get_job_ids() == [] and r.llen(intermediate_key(queue)) == 0
    assert int(r.hget(worker.key, "failed_job_count")) == 3  # `rq info`'s count of the worker's failures
