"""Backpressure, idempotency, keys and job timeouts: the real gateway app in-process, against the stack's real
Redis and real worker (settings that the shared stack does not use are given to this app only)."""

from __future__ import annotations

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
    with gateway(queue_name=queue_name, max_queue=2) as client:
        for _ in range(2):
            assert client.post("/v1/jobs", json=PARIS).status_code == 202
        jobs_before = len(store.keys("llamaq:job:*"))
        refused = client.post("/v1/jobs", json=PARIS)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "queue_full"
        assert int(refused.headers["retry-after"]) > 0
        assert store.llen(f"rq:queue:{queue_name}") == 2
        assert len(store.keys("llamaq:job:*")) == jobs_before


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
