"""Reliability through the real stack: Redis restarted under a running batch, and workers stopped with SIGTERM.

These run on a stack of their own whose Redis keeps an append-only file, as compose runs it (`aof_stack`), so
restarting Redis or stopping workers never disturbs the session stack.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager

import httpx
import pytest
import redis

from helpers import poll, pop_as_a_worker_would, read_sse, wait_until, waiting_in_fair_queue
from rq_checks import wait_for_rq_status

PARIS = {"prompt": "What is the capital of France?", "max_new_tokens": 12, "temperature": 0}
COUNT = {"prompt": "Count from 1 to 500, one number per line.", "temperature": 0}
# Tiers (the root conftest.py): up to two minutes a test (Redis restarted, workers drained).
pytestmark = pytest.mark.slow


@pytest.fixture
def client(aof_stack):
    with httpx.Client(base_url=aof_stack.url, timeout=120) as http:
        yield http


@pytest.fixture
def store(aof_stack):
    connection = redis.Redis.from_url(aof_stack.env["REDIS_URL"])
    yield connection
    connection.close()


def submit(client, body: dict) -> dict:
    reply = client.post("/v1/jobs", json=body)
    assert reply.status_code == 202, reply.text
    return reply.json()


def status_of(client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def finished(client, job_id: str, timeout_s: float = 300) -> dict:
    """The job once terminal (generous: these machines' two cores are shared); as it is, should time run out.
    A 503 (Redis still loading its append-only file after a restart) is retried, as the API asks of clients."""
    return poll(lambda: client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json(),
                lambda job: job.get("status") in ("succeeded", "failed", "canceled"), timeout_s, interval_s=0.2)


def token_events_in_redis(store, job_id: str) -> int:
    return sum(1 for _, fields in store.xrange(f"llamaq:events:{job_id}") if fields[b"event"] == b"token")


def wait_for_tokens(store, job_id: str, count: int) -> None:
    wait_until(lambda tokens: tokens >= count, 60, f"{count} tokens of job {job_id}",
               observe=lambda: token_events_in_redis(store, job_id))


def sse_events(client, job_id: str) -> list[tuple[str, dict]]:
    """The job's whole event stream, replayed through nginx (the job is finished)."""
    reply = client.get(f"/v1/jobs/{job_id}/events")
    assert reply.status_code == 200, reply.text
    events = [(event["event"], json.loads(event["data"])) for event in read_sse(reply)]
    assert events and events[-1][0] == "done", events[-3:]
    return events


def assert_stream_is_the_output(client, job: dict) -> None:
    """No token lost, none twice: the token events are numbered 0..n-1 and spell exactly the output text."""
    tokens = [data for name, data in sse_events(client, job["id"]) if name == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["text"] for t in tokens) == job["output"]["text"]
    assert job["output"]["text"]


def attempts(store, job_id: str) -> int:
    return int(store.hget(f"llamaq:job:{job_id}", "attempts") or 0)


def worker_log(stack) -> str:
    return (stack.workdir / "worker.log").read_text(errors="replace")


# Longer than redis-py's own retries of one command (about 3 s), so the services' outage handling is what runs.
OUTAGE_S = 12


@contextmanager
def redis_stopped(stack, outage_s: float = OUTAGE_S):
    """Redis stopped (SIGTERM) for `outage_s`, then started again on the same port and directory."""
    stack.stop_process("redis", signal.SIGTERM)
    stopped_at = time.monotonic()
    try:
        yield
        time.sleep(max(0.0, outage_s - (time.monotonic() - stopped_at)))
    finally:
        stack.start_redis()  # it reloads its append-only file


def assert_unavailable(reply: httpx.Response) -> None:
    assert reply.status_code == 503, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == 503 and error["type"] == "unavailable" and error["message"]
    assert int(reply.headers["retry-after"]) > 0


def test_redis_restart_under_a_running_batch_loses_no_job_and_no_token(aof_stack, client, store):
    worker = aof_stack.procs["worker"]
    # MAX_BATCH=2: two jobs run through the outage, two wait in the queue.
    running = [submit(client, {**COUNT, "max_new_tokens": 100}) for _ in range(2)]
    queued = [submit(client, {**COUNT, "max_new_tokens": 24}) for _ in range(2)]
    for job in running:
        wait_for_tokens(store, job["id"], 3)
    assert [status_of(client, job["id"])["status"] for job in queued] == ["queued", "queued"]

    with redis_stopped(aof_stack):
        assert_unavailable(client.post("/", json=PARIS))
        assert_unavailable(client.post("/v1/jobs", json=PARIS))
        assert_unavailable(client.get(f"/v1/jobs/{running[0]['id']}"))
        assert client.get("/healthz").status_code == 200
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == 503
        assert worker.poll() is None, "the worker died with Redis"

    results = [finished(client, job["id"]) for job in running + queued]
    for job in results:
        assert job["status"] == "succeeded", job
        assert_stream_is_the_output(client, job)
        # Not re-queued by the lost-worker sweep: the outage cost no attempt.
        assert attempts(store, job["id"]) == 1
    # Greedy, float32: the long answers went on exactly where they were (the short ones are their beginning).
    long_text, short_text = results[0]["output"]["text"], results[2]["output"]["text"]
    assert results[1]["output"]["text"] == long_text
    assert long_text.startswith(short_text) and len(long_text) > len(short_text)

    # The same worker process carried its batch through; it was never restarted.
    assert worker.poll() is None and aof_stack.procs["worker"] is worker
    assert "Redis is back after" in worker_log(aof_stack)
    aof_stack.wait_ready(30)
    answer = client.post("/", json=PARIS)
    assert answer.status_code == 200 and "Paris" in answer.json()["response"]


def test_idle_worker_survives_a_redis_restart_and_announces_its_model_again(aof_stack, client, store):
    worker = aof_stack.procs["worker"]
    with redis_stopped(aof_stack):
        pass  # the idle worker is in RQ's blocking dequeue when Redis goes
    aof_stack.wait_ready(30)
    assert client.post("/", json=PARIS).status_code == 200

    # A Redis that comes back empty (no persistence) has lost the model card; the worker's heartbeat restores it.
    store.flushall()
    aof_stack.wait_ready(30)
    assert store.exists("llamaq:model:" + os.path.basename(os.environ["LLAMAQ_TEST_MODEL"].rstrip("/")))
    answer = client.post("/", json=PARIS)
    assert answer.status_code == 200 and "Paris" in answer.json()["response"]
    assert worker.poll() is None and aof_stack.procs["worker"] is worker


def stop_worker_with_sigterm(stack, timeout_s: float = 180) -> int | None:
    """SIGTERM, as `docker compose stop` sends it (SIGKILL after `timeout_s`); returns the exit status."""
    return stack.stop_process("worker", signal.SIGTERM, timeout_s)


def worker_pid_of(store, job_id: str) -> int:
    # The default worker name is <hostname>:<pid>:<random suffix, new at every start>.
    name = store.hget(f"llamaq:job:{job_id}", "worker").decode()
    return int(name.rsplit(":", 2)[1])


def test_sigterm_finishes_the_running_jobs_and_leaves_the_queued_one(aof_stack, client, store):
    old_pid = aof_stack.procs["worker"].pid
    first, second = (submit(client, {**COUNT, "max_new_tokens": 40}) for _ in range(2))
    waiting = submit(client, {**COUNT, "max_new_tokens": 20})
    for job in (first, second):
        wait_for_tokens(store, job["id"], 1)
    assert status_of(client, waiting["id"])["status"] == "queued"

    assert stop_worker_with_sigterm(aof_stack) == 0
    for job in (first, second):
        done = status_of(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["output"]["finish_reason"] == "length"
        assert_stream_is_the_output(client, done)
    # The stopping worker claimed nothing more: the third job waits for the next one.
    left = status_of(client, waiting["id"])
    assert left["status"] == "queued" and left["started_at"] is None
    assert attempts(store, waiting["id"]) == 0

    aof_stack.start_worker()
    done = finished(client, waiting["id"])
    assert done["status"] == "succeeded", done
    assert worker_pid_of(store, waiting["id"]) != old_pid
    assert "stop requested: claiming no more jobs" in worker_log(aof_stack)
    aof_stack.wait_ready(60)


def test_jobs_still_running_when_the_drain_time_ends_go_back_to_the_queue(aof_stack, client, store):
    assert stop_worker_with_sigterm(aof_stack) == 0  # idle: it stops at once
    aof_stack.start_worker(env={"DRAIN_TIMEOUT_S": "1"})
    aof_stack.wait_ready(120)
    draining_pid = aof_stack.procs["worker"].pid

    job = submit(client, {**COUNT, "max_new_tokens": 200})
    wait_for_tokens(store, job["id"], 5)
    started = time.monotonic()
    assert stop_worker_with_sigterm(aof_stack) == 0
    assert time.monotonic() - started < 15

    # Handed back, not failed and not left to the lost-worker sweep: queued again at once, attempt not counted,
    # its tokens kept for the next worker to continue from.
    back = status_of(client, job["id"])
    assert back["status"] == "queued" and back["started_at"] is None, back
    assert attempts(store, job["id"]) == 0
    assert token_events_in_redis(store, job["id"]) >= 5
    made = int(store.hget(f"llamaq:job:{job['id']}", "generated"))  # tokens (an event may carry several)
    assert waiting_in_fair_queue(store, job["id"])
    assert f"job {job['id']} handed back (requeued)" in worker_log(aof_stack)

    aof_stack.start_worker()
    done = finished(client, job["id"])
    assert done["status"] == "succeeded", done
    # Continued, not restarted: one stream with no reset, and (greedy) the text of an uninterrupted run.
    assert_stream_is_the_output(client, done)
    assert f"job {job['id']} resumed after {made} tokens" in worker_log(aof_stack)
    again = finished(client, submit(client, {**COUNT, "max_new_tokens": 200})["id"])
    assert done["output"]["text"] == again["output"]["text"]
    assert done["output"]["usage"]["completion_tokens"] == again["output"]["usage"]["completion_tokens"]
    assert attempts(store, job["id"]) == 1
    assert worker_pid_of(store, job["id"]) != draining_pid
    wait_for_rq_status(store, job["id"], "finished")
    aof_stack.wait_ready(60)


def test_a_job_popped_by_a_worker_that_died_before_claiming_it_is_rescued(aof_stack, client, store):
    # A worker's pop moves the id onto the queue's intermediate list; a worker killed before its claim script ran
    # leaves it there, `queued` in its record but in no queue. Made here by hand: the one worker is busy with a
    # full batch, and the third job is moved as such a dequeue would have moved it.
    busy = [submit(client, {**COUNT, "max_new_tokens": 60}) for _ in range(2)]
    for job in busy:
        wait_for_tokens(store, job["id"], 1)
    stranded = submit(client, {**COUNT, "max_new_tokens": 8})
    assert pop_as_a_worker_would(store) == stranded["id"]
    assert store.lrange("rq:queue:llamaq:intermediate", 0, -1) == [stranded["id"].encode()]

    done = finished(client, stranded["id"], timeout_s=180)
    assert done["status"] == "succeeded", done
    assert attempts(store, stranded["id"]) == 1
    assert store.llen("rq:queue:llamaq:intermediate") == 0
    assert "popped but never claimed" in (aof_stack.workdir / "gateway.log").read_text(errors="replace")
    assert all(finished(client, job["id"])["status"] == "succeeded" for job in busy)
