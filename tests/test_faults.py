"""Faults through the real stack: a worker killed with SIGKILL mid-job."""

from __future__ import annotations

import json
import signal

import pytest

from helpers import LONG_JOB, read_sse, wait_for_job_status, wait_until
from rq_checks import wait_for_rq_status

SHORT_COUNT = {"prompt": "Count from 1 to 10, one number per line.", "max_new_tokens": 24, "temperature": 0}
# Time for each status change awaited here, the lost-worker sweep included (stale after WORKER_STALE_S).
FAULT_WAIT_S = 45
# Tiers (the root conftest.py): 20-50 s a test, each waits out a killed worker.
pytestmark = pytest.mark.slow


def kill_worker_mid_job(stack, client, job_id: str) -> None:
    wait_for_job_status(client, job_id, "running", FAULT_WAIT_S)
    stack.stop_process("worker", signal.SIGKILL)


def requeued_then_done(stack, client, job_id: str) -> dict:
    """The killed worker's job back in the queue (its start forgotten), then, a worker started again, succeeded."""
    try:
        requeued = wait_for_job_status(client, job_id, "queued", FAULT_WAIT_S)
        assert requeued["started_at"] is None
    finally:
        stack.start_worker()  # whatever happens, the session stack keeps a worker for the tests after this one
    done = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
    assert done["status"] == "succeeded", done
    return done


def test_killed_worker_job_is_requeued_and_succeeds_on_the_restarted_worker(stack, client, store):
    job = client.post("/v1/jobs", json=SHORT_COUNT).json()
    kill_worker_mid_job(stack, client, job["id"])
    done = requeued_then_done(stack, client, job["id"])
    assert done["output"]["text"].startswith("1")
    wait_for_rq_status(store, job["id"], "finished")
    stack.wait_ready(60)


def test_a_generation_whose_worker_was_killed_continues_where_it_stopped(stack, client, store):
    """Request migration: the next worker takes the prompt plus the tokens already streamed as its prompt and
    generates what is left, so the stream carries on with no reset and, greedy, the text is an uninterrupted run's."""
    body = {"prompt": "Count from 1 to 200, one number per line.", "max_new_tokens": 80, "temperature": 0,
            "ignore_eos": True}
    job = client.post("/v1/jobs", json=body).json()
    wait_until(lambda: store.hget(f"llamaq:job:{job['id']}", "token_events") not in (None, b"0", b"1", b"2"),
               FAULT_WAIT_S, "a few tokens streamed")
    stack.stop_process("worker", signal.SIGKILL)
    done = requeued_then_done(stack, client, job["id"])
    events = [(e["event"], json.loads(e["data"])) for e in read_sse(client.get(f"/v1/jobs/{job['id']}/events"))]
    tokens = [data for name, data in events if name == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))  # numbered on, nothing sent twice
    assert "".join(t["text"] for t in tokens) == done["output"]["text"]
    assert {"status": "queued", "requeued": True, "resumed": True} in [data for name, data in events
                                                                        if name == "status"]
    assert done["output"]["usage"]["completion_tokens"] == 80
    uninterrupted = client.post("/v1/generate", json={**body, "wait_s": 120}).json()
    assert done["output"]["text"] == uninterrupted["output"]["text"]
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


def test_an_openai_stream_carries_on_across_a_killed_worker(stack, client, store, model):
    """The chat stream open through nginx while its worker is killed: the next worker continues the generation and
    the same stream goes on to `[DONE]`, no error chunk, its deltas spelling the job's whole text."""
    body = {"model": model, "messages": [{"role": "user", "content": "Count from 1 to 200, one number per line."}],
            "max_tokens": 80, "temperature": 0, "ignore_eos": True, "stream": True}
    deltas, killed = [], False
    with client.stream("POST", "/v1/chat/completions", json=body, timeout=180) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            for choice in chunk.get("choices", []):
                deltas.append(choice["delta"].get("content") or "")
            if not killed and len("".join(deltas)) > 10:
                killed = True
                job_id = chunk["id"].removeprefix("chatcmpl-")
                stack.stop_process("worker", signal.SIGKILL)
                stack.start_worker()
    assert killed
    done = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
    assert done["status"] == "succeeded" and done["output"]["usage"]["completion_tokens"] == 80, done
    assert "".join(deltas) == done["output"]["text"]
    assert store.hget(f"llamaq:job:{job_id}", "attempts") == b"2"
    stack.wait_ready(60)
