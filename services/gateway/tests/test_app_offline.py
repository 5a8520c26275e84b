"""The gateway app on its own, against a Redis that is not there: clear 503s, never a stack trace."""

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from llamaq_gateway.app import create_app
from llamaq_gateway.settings import GatewaySettings
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
