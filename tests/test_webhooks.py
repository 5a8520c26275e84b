"""Webhooks through the real stack (echo engine, WEBHOOK_ALLOW_PRIVATE=1) to a real local HTTP receiver: delivery,
Standard Webhooks signatures, retries after failures, and one success delivered once."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from conftest import running_stack, stack_environment
from helpers import wait_until
from llamaq_gateway.app import create_app
from llamaq_gateway.settings import GatewaySettings
from llamaq_protocol import keys
from nginx_local import free_port

KEY = secrets.token_bytes(24)
SECRET = "whsec_" + base64.b64encode(KEY).decode()


class Receiver(ThreadingHTTPServer):
    """Records every delivery; a path under /flaky/ answers 500 to its first two."""

    def __init__(self):
        self.deliveries: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), Handler)

    def received(self, path: str) -> list[dict]:
        with self.lock:
            return [d for d in self.deliveries if d["path"] == path]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        server: Receiver = self.server
        with server.lock:
            earlier = sum(d["path"] == self.path for d in server.deliveries)
            status = 500 if self.path.startswith("/flaky/") and earlier < 2 else 204
            server.deliveries.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                      "status": status, "at": time.monotonic()})
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def hook_stack():
    env = stack_environment(ENGINE="echo", WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOW_PRIVATE="1",
                            WEBHOOK_BACKOFF_S="0.3")
    with running_stack("llamaq-hooks-", env) as running:
        yield running


@pytest.fixture
def client(hook_stack):
    with httpx.Client(base_url=hook_stack.url, timeout=60) as http:
        yield http


def verified(delivery: dict) -> dict:
    """The delivery's job object, once its signature checks out (Standard Webhooks, computed here anew)."""
    headers = {k.lower(): v for k, v in delivery["headers"].items()}
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + delivery["body"]
    expected = base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    return json.loads(delivery["body"])


def test_webhook_urls_are_checked_at_submit(hook_stack) -> None:
    base = {"prompt": "hello", "max_new_tokens": 4}
    # This app alone refuses private addresses; its own deliverer finds nothing due meanwhile.
    guarded = GatewaySettings(redis_url=hook_stack.env["REDIS_URL"], webhook_secret=SECRET)
    with TestClient(create_app(guarded)) as gateway:
        for url in ("http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/hook",
                    "http://169.254.169.254/latest", "http://[::1]/hook", "http://example.com:99999/hook",
                    "http://example.com:0/hook", "http://[::1/hook"):
            refused = gateway.post("/v1/jobs", json={**base, "webhook": url})
            assert refused.status_code == 400, (url, refused.text)
            assert refused.json()["error"]["type"] == "invalid_request"
            assert "webhook" in refused.json()["error"]["message"]
        for body in ({**base, "webhook": "ftp://example.com/x"}, {**base, "webhook_events": ["completed"]},
                     {**base, "webhook": "https://example.com/x", "webhook_events": ["finished"]},
                     {**base, "webhook": "https://example.com/x", "webhook_events": []}):
            refused = gateway.post("/v1/jobs", json=body)
            assert refused.status_code == 422, (body, refused.text)
            assert set(refused.json()["error"]) == {"type", "message", "code"}
    no_secret = GatewaySettings(redis_url=hook_stack.env["REDIS_URL"])
    with TestClient(create_app(no_secret)) as gateway:
        refused = gateway.post("/v1/jobs", json={**base, "webhook": "https://example.com/x"})
        assert refused.status_code == 400 and "WEBHOOK_SECRET" in refused.json()["error"]["message"]


def test_started_and_completed_are_delivered_signed(client, receiver) -> None:
    url = f"http://127.0.0.1:{receiver.server_port}/ok/1"
    job = client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 4, "wait_s": 30,
                                            "webhook": url, "webhook_events": ["started", "completed"]}).json()
    assert job["status"] == "succeeded"
    wait_until(lambda: len(receiver.received("/ok/1")) >= 2, 20, "two deliveries")
    deliveries = receiver.received("/ok/1")
    ids = sorted(d["headers"]["webhook-id"] for d in deliveries)
    assert ids == sorted([f"msg_{job['id']}_started", f"msg_{job['id']}_completed"])
    completed = next(d for d in deliveries if d["headers"]["llamaq-event"] == "completed")
    assert verified(completed) == job  # the job object, as GET /v1/jobs/{id} shows it
    assert completed["headers"]["content-type"] == "application/json"


def test_a_failing_receiver_gets_retries_then_one_success(hook_stack, client, receiver) -> None:
    url = f"http://127.0.0.1:{receiver.server_port}/flaky/1"
    job = client.post("/v1/jobs", json={"prompt": "hello", "max_new_tokens": 4, "webhook": url}).json()
    wait_until(lambda: len(receiver.received("/flaky/1")) >= 3, 30, "three attempts")
    attempts = receiver.received("/flaky/1")
    assert [a["status"] for a in attempts] == [500, 500, 204]
    assert {a["headers"]["webhook-id"] for a in attempts} == {f"msg_{job['id']}_completed"}
    assert all(verified(a)["status"] == "succeeded" for a in attempts)
    # Exponential backoff: 0.3 s, then 0.6 s.
    gaps = [b["at"] - a["at"] for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.5, gaps
    time.sleep(3)  # nothing more comes for a delivered webhook
    assert len(receiver.received("/flaky/1")) == 3
    store = redis.Redis.from_url(hook_stack.env["REDIS_URL"])
    try:
        assert store.zcard(keys.WEBHOOKS_DUE) == 0 and store.hlen(keys.WEBHOOK_ATTEMPTS) == 0
    finally:
        store.close()


def test_no_webhook_no_delivery(client, receiver) -> None:
    before = len(receiver.deliveries)
    job = client.post("/v1/generate", json={"prompt": "quiet", "max_new_tokens": 4, "wait_s": 30}).json()
    assert job["status"] == "succeeded" and "webhook" not in job
    time.sleep(1)
    assert len(receiver.deliveries) == before
