"""An engine that dies (`step` raises EngineDead) takes the worker down, but not its jobs: each goes back on the
queue with its attempt counted (as the lost-worker sweep counts one), fails as worker_lost once JOB_RETRIES are
used up, and the worker process exits non-zero for its supervisor to restart it. Real redis-server, real RQ."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import redis
from rq import Queue
from rq.job import Job as RQJob
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from fake_engines import FakeEngine, queue_on_rq_list
from helpers import admit, waiting_in_fair_queue
from llamaq_protocol import GenerationParams, keys
from llamaq_worker.decoding_loop import DecodingWorker
from llamaq_worker.engines.base import EngineDead, StepOutput
from llamaq_worker.metrics import WorkerMetrics
from llamaq_worker.settings import WorkerSettings
from private_redis import emptied


class DyingEngine(FakeEngine):
    """Emits one token for every sequence in its first step, then dies."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.running: list = []

    def step(self) -> list[StepOutput]:
        self.steps += 1
        if self.steps > 1:
            raise EngineDead("EngineCore process died")
        self.running += self._take_pending()
        return [StepOutput(seq.seq_id, "tok", 1, None) for seq in self.running]


@pytest.fixture
def r(lone_redis):
    with emptied(lone_redis.env["REDIS_URL"]) as client:
        yield client


def run_worker(r: redis.Redis, queue: Queue) -> DecodingWorker:
    engine = DyingEngine()
    worker = DecodingWorker(
        [queue], engine=engine, settings=WorkerSettings(metrics_port=0), metrics=WorkerMetrics(engine.device_memory),
        connection=r, serializer=JSONSerializer, log_job_description=False,
    )
    worker.work(burst=True)
    return worker


def test_jobs_go_back_counted_then_fail_as_worker_lost(r: redis.Redis) -> None:
    queue = Queue(keys.DEFAULT_QUEUE_NAME, connection=r, serializer=JSONSerializer)
    first, second = queue_on_rq_list(r, queue), queue_on_rq_list(r, queue)

    worker = run_worker(r, queue)
    assert worker.gave_up and not worker.slots
    for job_id in (first, second):
        record = r.hgetall(keys.job(job_id))
        assert (record[b"status"], record[b"attempts"]) == (b"queued", b"1")
        assert b"worker" not in record
        events = [fields[b"event"] for _, fields in r.xrange(keys.events(job_id))]
        assert b"token" not in events  # the void attempt's tokens are gone
        assert RQJob.fetch(job_id, connection=r, serializer=JSONSerializer).get_status() == "queued"
    assert sorted(queue.get_job_ids()) == sorted([first, second])
    assert StartedJobRegistry(queue=queue).get_job_ids() == []
    assert r.scard(keys.RUNNING) == 0

    # JOB_RETRIES (1) used up: the second death fails them, in the record and in RQ.
    run_worker(r, queue)
    for job_id in (first, second):
        record = r.hgetall(keys.job(job_id))
        assert (record[b"status"], record[b"attempts"]) == (b"failed", b"2")
        assert b'"type":"worker_lost"' in record[b"error"] and b"engine" in record[b"error"]
        assert RQJob.fetch(job_id, connection=r, serializer=JSONSerializer).get_status() == "failed"
    assert sorted(FailedJobRegistry(queue=queue).get_job_ids()) == sorted([first, second])
    assert queue.get_job_ids() == []


@pytest.mark.model  # the echo engine loads the small model's tokenizer
def test_worker_process_exits_non_zero_and_closes_the_engine(r: redis.Redis, lone_redis, tmp_path) -> None:
    # Queued as the gateway queues jobs (in the fair queue), for the real worker process to pop.
    job_id = admit(lone_redis.env["REDIS_URL"], GenerationParams(prompt="hi", max_new_tokens=8))
    script = tmp_path / "dying_worker.py"
    script.write_text(textwrap.dedent("""
        import sys
        from llamaq_worker import __main__ as worker_main
        from llamaq_worker.engines.base import EngineDead
        from llamaq_worker.engines.echo import EchoEngine

        class Dying(EchoEngine):
            def step(self):
                raise EngineDead("EngineCore process died")

            def close(self):
                print("engine closed", flush=True)

        worker_main.build_engine = lambda settings, model_dir: Dying(model_dir, max_batch=settings.max_batch)
        sys.exit(worker_main.main())
    """))
    env = dict(os.environ, REDIS_URL=lone_redis.env["REDIS_URL"], MODEL_PATH=os.environ["LLAMAQ_TEST_MODEL"],
               DEVICE="cpu", METRICS_PORT="0", LOG_FORMAT="text", HEARTBEAT_S="1")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "engine closed" in done.stdout
    assert "the engine died (EngineCore process died)" in done.stderr
    assert f"job {job_id} handed back (requeued)" in done.stderr
    assert r.hget(keys.job(job_id), "status") == b"queued"
    assert waiting_in_fair_queue(r, job_id)
