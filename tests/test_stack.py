"""The whole stack through nginx, every part real: the original contract, jobs, waiting, cancel, errors."""

from __future__ import annotations

import re
import time

import pytest
from rq import Queue
from rq.registry import CanceledJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from helpers import LONG_JOB, wait_for_job_status, wait_until
from rq_checks import wait_for_rq_status

PARIS = {"prompt": "What is the capital of France?"}
# Greedy SmolLM2 keeps counting for hundreds of tokens: a job that reliably stays running.


def rq_queue(store) -> Queue:
    return Queue("llamaq", connection=store, serializer=JSONSerializer)


def test_original_contract_answers_paris(client):
    reply = client.post("/", json=PARIS)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"response", "status", "time", "id"}
    assert "Paris" in body["response"]
    assert body["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    assert reply.headers["x-request-id"]


def test_submit_then_poll_and_rq_agrees(client, store):
    reply = client.post("/v1/jobs", json={**PARIS, "max_new_tokens": 16, "temperature": 0})
    assert reply.status_code == 202, reply.text
    job = reply.json()
    assert reply.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running")
    assert job["created_at"].endswith("Z") or "+00:00" in job["created_at"]

    done = client.get(reply.headers["location"], params={"wait": 60}).json()
    assert done["status"] == "succeeded", done
    assert "Paris" in done["output"]["text"]
    assert done["output"]["finish_reason"] == "stop"
    usage = done["output"]["usage"]
    assert usage["prompt_tokens"] > 10 and 0 < usage["completion_tokens"] <= 16
    assert done["started_at"] and done["finished_at"]
    assert "position" not in done and "error" not in done

    # RQ's own bookkeeping tells the same story (what `rq info` reads).
    rq_job = wait_for_rq_status(store, job["id"], "finished")
    assert rq_job.return_value()["text"] == done["output"]["text"]
    assert job["id"] in FinishedJobRegistry(queue=rq_queue(store)).get_job_ids()


def test_poll_wait_returns_as_soon_as_the_job_ends(client):
    job = client.post("/v1/jobs", json={**PARIS, "max_new_tokens": 8, "temperature": 0}).json()
    started = time.monotonic()
    done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
    assert done["status"] == "succeeded"
    assert time.monotonic() - started < 30


def test_generate_waits_then_falls_back_to_202(client):
    quick = client.post("/v1/generate", json={**PARIS, "max_new_tokens": 16, "temperature": 0, "wait_s": 60})
    assert quick.status_code == 200, quick.text
    assert quick.json()["status"] == "succeeded"
    assert "Paris" in quick.json()["output"]["text"]

    slow = client.post("/v1/generate", json={**PARIS, "max_new_tokens": 16, "wait_s": 0})
    assert slow.status_code == 202, slow.text
    assert slow.json()["status"] in ("queued", "running")
    location = slow.headers["location"]
    assert client.get(location, params={"wait": 60}).json()["status"] == "succeeded"


def test_cancel_queued_and_running_jobs(stack, client, store):
    batch = int(stack.env["MAX_BATCH"])
    fillers = [client.post("/v1/jobs", json=LONG_JOB).json() for _ in range(batch)]
    for filler in fillers:  # both claimed by the worker: the batch is full
        wait_for_job_status(client, filler["id"], "running", 30)
    waiting = client.post("/v1/jobs", json={**PARIS, "max_new_tokens": 8}).json()
    polled = client.get(f"/v1/jobs/{waiting['id']}").json()
    assert polled["status"] == "queued" and polled["position"] == 0
    # A wait that runs out answers the job as it is (longer than redis-py's 5 s default read timeout).
    started = time.monotonic()
    held = client.get(f"/v1/jobs/{waiting['id']}", params={"wait": 6})
    assert held.status_code == 200 and held.json()["status"] == "queued"
    assert time.monotonic() - started >= 5.9

    canceled = client.delete(f"/v1/jobs/{waiting['id']}")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled" and canceled.json()["finished_at"]

    for filler in fillers:
        stopped = client.delete(f"/v1/jobs/{filler['id']}").json()
        assert stopped["status"] == "canceled", stopped
        assert stopped["output"]["finish_reason"] == "canceled"
        assert stopped["output"]["text"].startswith("1")  # the partial text is kept

    # The queued job never ran, and cancelling a terminal job returns it unchanged.
    again = client.delete(f"/v1/jobs/{waiting['id']}").json()
    assert again["status"] == "canceled" and again["started_at"] is None and "output" not in again
    assert waiting["id"] not in rq_queue(store).get_job_ids()
    # The job record is the API's truth and changes first; the worker moves RQ's registries right after it.
    expected = {waiting["id"], *(f["id"] for f in fillers)}
    wait_until(lambda canceled: expected <= canceled, 10, "RQ's canceled registry to catch up with the job records",
               observe=lambda: set(CanceledJobRegistry(queue=rq_queue(store)).get_job_ids()))


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"prompt": ""}, 422, "invalid_request"),
        ({"prompt": "hi", "colour": "red"}, 422, "invalid_request"),
        ({"prompt": "hi", "temperature": 3}, 422, "invalid_request"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422, "invalid_request"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "invalid_request"),
        ({"prompt": "hi", "max_new_tokens": 5000}, 400, "invalid_request"),
        ({"prompt": "word " * 1500}, 400, "prompt_too_long"),
        ({"prompt": "word " * 100, "max_new_tokens": 4096, "system": "x" * 20000}, 400, "prompt_too_long"),
    ],
)
@pytest.mark.parametrize("path", ["/", "/v1/jobs", "/v1/generate"])
def test_bad_input_is_refused_with_json_and_nothing_is_queued(client, store, path, body, status, error_type):
    jobs_before = len(store.keys("llamaq:job:*"))
    reply = client.post(path, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["type"] == error_type and error["code"] == status and error["message"]
    assert len(store.keys("llamaq:job:*")) == jobs_before


def test_malformed_json_and_wrong_content(client):
    reply = client.post("/v1/jobs", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_json"
    reply = client.post("/v1/jobs", content=b"prompt=hi", headers={"Content-Type": "text/plain"})
    assert reply.status_code in (400, 422) and reply.json()["error"]["code"] == reply.status_code


def test_unknown_jobs_and_routes_are_json_404(client):
    for method, path in [
        ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef"),
        ("DELETE", "/v1/jobs/0123456789abcdef0123456789abcdef"),
        ("GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd"),
        ("GET", "/v1/nothing-here"),
    ]:
        reply = client.request(method, path)
        assert reply.status_code == 404, (method, path, reply.text)
        assert reply.json()["error"]["code"] == 404


def test_body_over_one_mib_is_413_json_from_nginx(client):
    reply = client.post("/v1/jobs", json={"prompt": "x" * (1024 * 1024 + 10)})
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == 413


def test_gateway_processes_never_load_torch(stack):
    master = stack.procs["gateway"].pid
    pids = [master] + [
        int(p.name) for p in __import__("pathlib").Path("/proc").iterdir()
        if p.name.isdigit() and _parent_pid(p.name) == master
    ]
    assert len(pids) >= 2, "gunicorn has no worker processes"
    for pid in pids:
        maps = open(f"/proc/{pid}/maps").read()
        assert "torch" not in maps, f"gateway process {pid} has torch mapped"


def _parent_pid(pid: str) -> int | None:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_readyz_is_503_without_a_worker_and_recovers(stack, client):
    assert client.get("/readyz").status_code == 200
    assert client.get("/healthz").status_code == 200
    stack.stop_process("worker")
    try:
        reply = client.get("/readyz")
        assert reply.status_code == 503
        assert reply.json()["error"]["type"] == "no_ready_worker"
        assert reply.headers["retry-after"]
        refused = client.post("/v1/jobs", json=PARIS)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert client.get("/healthz").status_code == 200
    finally:
        stack.start_worker()
        stack.wait_ready(120)
    assert client.post("/", json=PARIS).status_code == 200
