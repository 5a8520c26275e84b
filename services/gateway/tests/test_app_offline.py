"""The gateway app on its own, against a Redis that is not there: clear 503s, never a stack trace."""

import logging
import subprocess
import sys
import threading
import time
import types

import anyio
import pytest
from fastapi.testclient import TestClient

from llamaq_gateway import app as app_module
from llamaq_gateway import deps
from llamaq_gateway.app import create_app
from llamaq_gateway.metrics import HTTP_REQUESTS
from llamaq_gateway.settings import GatewaySettings
from llamaq_protocol.logs import request_id_var
from nginx_local import free_port


@pytest.fixture
def offline_client():
    settings = GatewaySettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings)) as client:
        yield client


def test_health_is_independent_of_redis(offline_client):
    assert offline_client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/readyz", None),
        ("GET", "/health", None),
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("POST", "/v1/jobs", {"prompt": "hi"}),
        ("POST", "/", {"prompt": "hi"}),
        ("GET", "/v1/jobs/abc", None),
        ("DELETE", "/v1/jobs/abc", None),
    ],
)
def test_redis_away_is_503_with_retry_after(offline_client, method, path, body):
    reply = offline_client.request(method, path, json=body)
    assert reply.status_code == 503, reply.text
    assert reply.headers["retry-after"]
    error = reply.json()["error"]
    assert error["code"] == 503 and error["type"] in ("unavailable", "no_ready_worker")
    assert "Traceback" not in reply.text


def test_validation_comes_before_redis(offline_client):
    reply = offline_client.post("/v1/jobs", json={"prompt": "hi", "top_p": 7})
    assert reply.status_code == 422
    assert reply.json()["error"]["message"].startswith("top_p")


def test_request_id_is_echoed_or_made(offline_client):
    assert offline_client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = offline_client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert made and " " not in made


def test_importing_and_serving_never_imports_torch():
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from llamaq_gateway.app import create_app\n"
        "with TestClient(create_app()) as c:\n"
        "    c.get('/healthz'); c.post('/v1/jobs', json={'prompt': 'hi'})\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'accelerate'))\n"
        "print(heavy); sys.exit(1 if heavy else 0)\n"
    )
    env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


class _Capture(logging.Handler):
    """Each record's message, whether it carries a traceback, and the request id set while it was logged."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, bool, str | None]] = []

    def emit(self, record):
        self.seen.append((record.getMessage(), record.exc_info is not None, request_id_var.get(None)))


@pytest.mark.parametrize(
    ("path", "route", "openai"), [("/v1/jobs/abc", "/v1/jobs/{job_id}", False), ("/v1/models", "/v1/models", True)]
)
def test_a_crash_is_a_500_in_the_error_shape_that_keeps_its_request_id(path, route, openai):
    async def crash():
        raise RuntimeError("a bug")

    app = create_app(GatewaySettings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    app.dependency_overrides[deps._owner] = crash
    counted = HTTP_REQUESTS.labels("GET", route, "500")
    before = counted._value.get()
    capture = _Capture()
    levels = {name: logging.getLogger(name).level for name in ("llamaq_gateway.app", "llamaq_gateway.access")}
    for name in levels:
        logging.getLogger(name).addHandler(capture)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        with TestClient(app) as client:
            reply = client.get(path, headers={"X-Request-ID": "crash-1"})
    finally:
        for name, level in levels.items():
            logging.getLogger(name).removeHandler(capture)
            logging.getLogger(name).setLevel(level)
    assert reply.status_code == 500
    assert reply.headers["x-request-id"] == "crash-1"
    expected = {"type": "internal_error", "message": "internal error", "code": 500}
    assert reply.json() == {"error": {**expected, "param": None} if openai else expected}
    assert "a bug" not in reply.text and "Traceback" not in reply.text
    assert ("unhandled error", True, "crash-1") in capture.seen  # the traceback, logged with the request's id
    assert (f"GET {route} 500", False, "crash-1") in capture.seen  # and its access-log line
    assert counted._value.get() == before + 1


def test_rqs_question_to_redis_is_asked_at_startup_off_the_event_loop(monkeypatch):
    asked_from = []

    def version():
        asked_from.append(threading.get_ident())
        return (7, 0, 0)

    settings = GatewaySettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings)) as client:  # Redis away: the failed question did not stop the start
        assert client.get("/healthz").status_code == 200
    jobs = types.SimpleNamespace(queue=types.SimpleNamespace(get_redis_server_version=version))
    anyio.run(app_module._warm_rq, jobs)
    assert asked_from and asked_from[0] != threading.get_ident()
    # A Redis that does not answer holds the start up RQ_WARM_S at most.
    monkeypatch.setattr(app_module, "RQ_WARM_S", 0.05)
    jobs.queue.get_redis_server_version = lambda: time.sleep(1)
    started = time.monotonic()
    anyio.run(app_module._warm_rq, jobs)
    assert time.monotonic() - started < 0.5
