"""Faults through the real stack: a worker killed with SIGKILL mid-job."""

from __future__ import annotations

import signal

from helpers import LONG_JOB, wait_for_job_status
from rq_checks import wait_for_rq_status

SHORT_COUNT = {"prompt": "Count from 1 to 10, one number per line.", "max_new_tokens": 24, "temperature": 0}
# Time for each status change awaited here, the lost-worker sweep included (stale after WORKER_STALE_S).
FAULT_WAIT_S = 45


def kill_worker_mid_job(stack, client, job_id: str) -> None:
    wait_for_job_status(client, job_id, "running", FAULT_WAIT_S)
    stack.stop_process("worker", signal.SIGKILL)


def test_killed_worker_job_is_requeued_and_succeeds_on_the_restarted_worker(stack, client, store):
    job = client.post("/v1/jobs", json=SHORT_COUNT).json()
    kill_worker_mid_job(stack, client, job["id"])
    try:
        requeued = wait_for_job_status(client, job["id"], "queued", FAULT_WAIT_S)
        assert requeued["started_at"] is None
    finally:
        stack.start_worker()
    done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
    assert done["status"] == "succeeded", done
    assert done["output"]["text"].startswith("1")
    wait_for_rq_status(store, job["id"], "finished")
    stack.wait_ready(60)


def test_job_fails_as_worker_lost_when_retries_run_out(stack, client, store):
    job = client.post("/v1/jobs", json=LONG_JOB).json()
    # JOB_RETRIES=1: the first loss re-queues the job, the second fails it.
    kill_worker_mid_job(stack, client, job["id"])
    try:
        wait_for_job_status(client, job["id"], "queued", FAULT_WAIT_S)
    finally:
        stack.start_worker()  # whatever happens, the session stack keeps a worker for the tests after this one
    kill_worker_mid_job(stack, client, job["id"])
    try:
        failed = wait_for_job_status(client, job["id"], "failed", FAULT_WAIT_S)
    finally:
        stack.start_worker()
    assert failed["error"]["type"] == "worker_lost"
    assert failed["finished_at"]
    wait_for_rq_status(store, job["id"], "failed")
    stack.wait_ready(60)
    # Nothing of it is left in the running set, and the stack still answers.
    assert not store.sismember("llamaq:running", job["id"])
    assert client.post("/", json={"prompt": "What is the capital of France?"}).status_code == 200
