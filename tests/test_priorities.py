"""Job priorities through the real stack (nginx, gunicorn, Redis, a worker with the paced engine, one slot): a
batch backlog never delays an interactive job, each priority has its own queue bound and /metrics depth, and a
lost worker's batch job goes back onto the batch queue."""

from __future__ import annotations

import signal
import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import running_stack, stack_environment
from helpers import wait_for_job_status, wait_until, waiting_in_fair_queue, worker_metric
from llamaq_gateway.app import create_app
from llamaq_gateway.settings import GatewaySettings
from llamaq_protocol import keys

# One slot at 50 tokens/s: a 40-token batch job holds the worker for 0.8 s.
BATCH_JOB = {"prompt": "batch work", "max_new_tokens": 40, "priority": "batch"}


@pytest.fixture(scope="module")
def paced_stack():
    env = stack_environment(ENGINE="paced", MAX_BATCH="1", PACED_TOKENS_PER_S="50")
    with running_stack("llamaq-prio-", env) as running:
        yield running


@pytest.fixture
def client(paced_stack):
    with httpx.Client(base_url=paced_stack.url, timeout=60) as http:
        yield http


def test_an_interactive_job_is_claimed_before_a_queued_batch_backlog(client) -> None:
    backlog = []
    for _ in range(5):
        submitted = client.post("/v1/jobs", json=BATCH_JOB)
        assert submitted.status_code == 202, submitted.text
        assert submitted.json()["priority"] == "batch"
        backlog.append(submitted.json()["id"])
    wait_for_job_status(client, backlog[0], "running", 30)
    waiting = [job_id for job_id in backlog if client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"]
    assert len(waiting) >= 3, "the backlog should still be queued"
    # A batch job's position counts the batch jobs ahead of it (no interactive one is queued).
    last = client.get(f"/v1/jobs/{backlog[-1]}").json()
    assert last["position"] == len(waiting) - 1

    started = time.monotonic()
    answer = client.post("/", json={"prompt": "a person waiting", "max_new_tokens": 5})
    latency = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    interactive = client.get(f"/v1/jobs/{answer.json()['id']}").json()
    assert interactive["priority"] == "interactive"
    # At most the one batch job running when it arrived was ahead of it (well under the backlog's 4 s).
    assert latency < 3.0, latency

    done = [client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json() for job_id in waiting]
    assert all(job["status"] == "succeeded" for job in done), done
    assert all(job["started_at"] > interactive["started_at"] for job in done), (interactive, done)


def test_queue_depth_per_queue_and_priority_validation(client) -> None:
    samples = {
        sample.labels["queue"]
        for family in text_string_to_metric_families(client.get("/metrics").text)
        if family.name == "llamaq_queue_depth"
        for sample in family.samples
    }
    # (and the work keys queue over their rate limits, behind both)
    assert samples == {keys.DEFAULT_QUEUE_NAME, keys.queue_name(keys.DEFAULT_QUEUE_NAME, "batch"),
                       f"{keys.DEFAULT_QUEUE_NAME}:over"}
    refused = client.post("/v1/jobs", json={**BATCH_JOB, "priority": "urgent"})
    assert refused.status_code == 422
    assert set(refused.json()["error"]) == {"type", "message", "code"}
    assert "priority" in refused.json()["error"]["message"]
    generated = client.post("/v1/generate", json={**BATCH_JOB, "max_new_tokens": 3, "wait_s": 30})
    assert generated.status_code == 200 and generated.json()["priority"] == "batch"


def test_a_full_batch_queue_refuses_batch_jobs_only(paced_stack) -> None:
    # A queue no worker serves, so the jobs stay queued; the paced worker's model card makes the gateway ready.
    queue_name = f"unserved-{uuid.uuid4().hex[:8]}"
    settings = GatewaySettings(redis_url=paced_stack.env["REDIS_URL"], queue_name=queue_name, max_queue=5,
                               max_batch_queue=2, max_client_share=1)
    with TestClient(create_app(settings)) as gateway:
        first, second = (gateway.post("/v1/jobs", json=BATCH_JOB) for _ in range(2))
        assert first.status_code == second.status_code == 202
        assert first.json()["position"] == 0 and second.json()["position"] == 1
        refused = gateway.post("/v1/jobs", json=BATCH_JOB)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "queue_full"
        interactive = gateway.post("/v1/jobs", json={"prompt": "still welcome", "max_new_tokens": 4})
        assert interactive.status_code == 202 and interactive.json()["position"] == 0
        # Every interactive job is ahead of the batch ones.
        assert gateway.get(f"/v1/jobs/{second.json()['id']}").json()["position"] == 2


def test_a_lost_workers_batch_job_goes_back_onto_the_batch_queue(paced_stack, client) -> None:
    import redis

    store = redis.Redis.from_url(paced_stack.env["REDIS_URL"])
    job = client.post("/v1/jobs", json={**BATCH_JOB, "max_new_tokens": 2000}).json()
    wait_for_job_status(client, job["id"], "running", 30)
    paced_stack.stop_process("worker", signal.SIGKILL)
    try:
        # WORKER_STALE_S (6 s) later the sweep re-queues it, onto its own queue.
        wait_until(lambda: waiting_in_fair_queue(store, job["id"]), 30, "the job back in the fair queue")
        assert store.hget(keys.job(job["id"]), "fq_tier") == keys.fair_tier(keys.DEFAULT_QUEUE_NAME, "batch").encode()
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    finally:
        paced_stack.start_worker()
        paced_stack.wait_ready(60)
        store.close()
    wait_for_job_status(client, job["id"], "running", 30)
    client.delete(f"/v1/jobs/{job['id']}")


def batch_preemptions(stack) -> float:
    """llamaq_worker_preemptions_total{priority="batch"} over every worker, each read from its own METRICS_PORT."""
    return worker_metric(stack, "llamaq_worker_preemptions_total", priority="batch")


def test_an_interactive_job_takes_the_slot_of_the_batch_job_holding_it(paced_stack, client) -> None:
    """MAX_BATCH 1 and its interactive headroom (1): an interactive job sent while a batch job holds the one slot is
    claimed at once and decoded in its place (the batch job preempted, then resumed), and the batch job still gets
    every token."""
    batch = client.post("/v1/jobs", json={**BATCH_JOB, "max_new_tokens": 150}).json()  # 3 s of the slot
    wait_for_job_status(client, batch["id"], "running", 30)
    before = batch_preemptions(paced_stack)
    answer = client.post("/", json={"prompt": "a person waiting", "max_new_tokens": 5})
    assert answer.status_code == 200, answer.text
    interactive = client.get(f"/v1/jobs/{answer.json()['id']}").json()
    done = client.get(f"/v1/jobs/{batch['id']}", params={"wait": 30}).json()
    assert done["status"] == "succeeded" and done["output"]["usage"]["completion_tokens"] == 150, done
    # Not behind the batch job: started and finished while it ran.
    assert interactive["finished_at"] < done["finished_at"], (interactive, done)
    wait_until(lambda: batch_preemptions(paced_stack) > before, 15, "the batch job's preemption in its metrics")
