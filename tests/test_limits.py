"""Backpressure, idempotency, keys and job timeouts: the real gateway app in-process, against the stack's real
Redis and real worker (settings that the shared stack does not use are given to this app only)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from helpers import LONG_JOB
from llamaq_gateway.app import create_app
from llamaq_gateway.settings import GatewaySettings

PARIS = {"prompt": "What is the capital of France?", "max_new_tokens": 12, "temperature": 0}


@pytest.fixture
def gateway(stack):
    def make(**settings) -> TestClient:
        app = create_app(GatewaySettings(redis_url=stack.env["REDIS_URL"], **settings))
        return TestClient(app)

    return make


def test_queue_full_is_429_and_nothing_is_queued(gateway, store):
    # A queue no worker serves, so the jobs stay queued.
    queue_name = f"unserved-{uuid.uuid4().hex[:8]}"
    with gateway(queue_name=queue_name, max_queue=4) as client:
        # One client holds at most MAX_CLIENT_SHARE (half) of the queue; the rest is left to the others.
        for _ in range(2):
            assert client.post("/v1/jobs", json=PARIS).status_code == 202
        jobs_before = len(store.keys("llamaq:job:*"))
        refused = client.post("/v1/jobs", json=PARIS)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "queue_full"
        assert "this client" in refused.json()["error"]["message"]
        for address in ("10.0.0.1", "10.0.0.2"):  # (X-Real-IP: nginx's; here the app is reached directly)
            assert client.post("/v1/jobs", json=PARIS, headers={"X-Real-IP": address}).status_code == 202
        refused = client.post("/v1/jobs", json=PARIS, headers={"X-Real-IP": "10.0.0.3"})
        assert refused.status_code == 429
        assert "the interactive queue holds 4" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) > 0
        assert store.llen(f"llamaq:fq:{queue_name}:interactive:depth") == 4
        assert len(store.keys("llamaq:job:*")) == jobs_before + 2


def test_idempotency_key_returns_the_same_job(gateway):
    key = uuid.uuid4().hex
    with gateway() as client:
        first = client.post("/v1/jobs", json=PARIS, headers={"Idempotency-Key": key})
        again = client.post("/v1/jobs", json=PARIS, headers={"Idempotency-Key": key})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        other = client.post("/v1/jobs", json={**PARIS, "max_new_tokens": 13}, headers={"Idempotency-Key": key})
        assert other.status_code == 400 and other.json()["error"]["type"] == "idempotency_key_reused"
        fresh = client.post("/v1/jobs", json=PARIS, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert fresh.json()["id"] != first.json()["id"]


CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12,
        "temperature": 0}


@pytest.mark.parametrize(("path", "body", "job_of"), [
    ("/", PARIS, lambda answer: answer["id"]),
    ("/v1/generate", PARIS, lambda answer: answer["id"]),
    ("/v1/chat/completions", CHAT, lambda answer: answer["id"].removeprefix("chatcmpl-")),
    ("/v1/completions", {"prompt": "What is the capital of France?", "max_tokens": 12, "temperature": 0},
     lambda answer: answer["id"].removeprefix("cmpl-")),
    ("/v1/responses", {"input": "What is the capital of France?", "max_output_tokens": 12, "temperature": 0},
     lambda answer: answer["id"]),
])
def test_every_submit_route_answers_a_retry_from_the_job_its_first_try_queued(client, path, body, job_of):
    key = uuid.uuid4().hex
    first = client.post(path, json=body, headers={"Idempotency-Key": key})
    again = client.post(path, json=body, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert job_of(first.json()) == job_of(again.json())
    assert first.json() == again.json() or path == "/"  # (POST / stamps the time of its answer)
    other = client.post(path, json={**body, "temperature": 0.5}, headers={"Idempotency-Key": key})
    assert other.status_code == 400 and "Idempotency-Key" in other.json()["error"]["message"], other.text


def test_a_streamed_retry_replays_the_same_answer(client):
    key = uuid.uuid4().hex
    texts, ids = [], set()
    for _ in range(2):
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                           headers={"Idempotency-Key": key}) as reply:
            chunks = [json.loads(line.removeprefix("data: ")) for line in reply.iter_lines()
                      if line.startswith("data: {")]
        ids |= {chunk["id"] for chunk in chunks}
        texts.append("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]))
    assert len(ids) == 1 and texts[0] == texts[1] and "Paris" in texts[0]


def test_api_keys_guard_every_route_and_jobs_belong_to_their_key(gateway):
    with gateway(api_keys="key-a,key-b") as client:
        assert client.get("/healthz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic key-a"}):
            denied = client.post("/v1/jobs", json=PARIS, headers=headers)
            assert denied.status_code == 401 and denied.json()["error"]["type"] == "unauthorized"
            assert client.post("/", json=PARIS, headers=headers).status_code == 401
        as_a = {"Authorization": "Bearer key-a"}
        as_b = {"Authorization": "Bearer key-b"}
        job = client.post("/v1/jobs", json=PARIS, headers=as_a).json()
        assert client.get(f"/v1/jobs/{job['id']}", headers=as_a).status_code == 200
        assert client.get(f"/v1/jobs/{job['id']}", headers=as_b).status_code == 404
        assert client.delete(f"/v1/jobs/{job['id']}", headers=as_b).status_code == 404
        assert client.get(f"/v1/jobs/{job['id']}/events", headers=as_b).status_code == 404
        done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}, headers=as_a).json()
        assert done["status"] == "succeeded"


def test_job_timeout_fails_the_job_and_frees_its_slot(gateway):
    with gateway(job_timeout_s=2) as client:
        job = client.post("/v1/jobs", json=LONG_JOB).json()
        started = time.monotonic()
        done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
        assert done["status"] == "failed", done
        assert done["error"]["type"] == "timeout"
        assert done["output"]["text"]  # what it had produced is kept
        assert time.monotonic() - started < 30
    # The slot is free again: a normal job runs at once.
    with gateway() as client:
        assert client.post("/v1/generate", json={**PARIS, "wait_s": 60}).json()["status"] == "succeeded"
