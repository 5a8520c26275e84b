"""Metrics and logs through the real stack: nginx, gunicorn with two gateway processes, Redis, the worker."""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import poll, wait_until

JOBS = 4
# Unusual enough that finding it in a log can only mean the prompt was logged.
SECRET_PROMPT = "Spell the word zanzibarquux backwards"


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = defaultdict(list)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples, name: str, **labels: str) -> float:
    assert name in samples, f"{name} missing from /metrics"
    return sum(value for sample_labels, value in samples[name]
               if all(sample_labels.get(k) == v for k, v in labels.items()))


def queued_and_running(samples) -> tuple[float, float]:
    return total(samples, "llamaq_queue_depth"), total(samples, "llamaq_jobs_running")


@pytest.fixture(scope="module")
def observed(stack):
    """Metrics before and after JOBS jobs sent through nginx, one of them with a request id of ours."""
    # Jobs of earlier tests may still be queued or running on the shared stack: start from an idle one, once the
    # worker's series in Redis are at least one heartbeat newer than its last job.
    wait_until(lambda counts: counts == (0, 0), 300, "the stack to go idle (jobs queued, jobs running)",
               observe=lambda: queued_and_running(scrape(f"{stack.url}/metrics")), interval_s=0.5)
    time.sleep(2 * float(stack.env.get("HEARTBEAT_S", "2")))
    before = scrape(f"{stack.url}/metrics")
    request_id = f"obs-{uuid.uuid4().hex}"
    with httpx.Client(base_url=stack.url, timeout=120) as client:
        for i in range(JOBS):
            headers = {"X-Request-ID": request_id} if i == 0 else {}
            reply = client.post("/v1/jobs", json={"prompt": SECRET_PROMPT, "max_new_tokens": 4}, headers=headers)
            assert reply.status_code == 202, reply.text
            job_id = reply.json()["id"]
            if i == 0:
                first_job = job_id
            done = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
            assert done["status"] == "succeeded", done
    # Worker series reach the gateway with the next heartbeat (every HEARTBEAT_S).
    after = poll(lambda: scrape(f"{stack.url}/metrics"),
                 lambda after: delta(before, after, "llamaq_job_run_seconds_count") >= JOBS, 15, interval_s=0.5)
    return before, after, request_id, first_job


def delta(before, after, name: str, **labels: str) -> float:
    """How much `name` grew, over the workers alive now (a worker an earlier test replaced may still be listed
    in `before`, until its heartbeat goes stale); series without a worker label are the gateway's."""
    assert name in after, f"{name} missing from /metrics"
    workers = {sample_labels.get("worker") for sample_labels, _ in after[name]}

    def summed(samples) -> float:
        return sum(value for sample_labels, value in samples.get(name, [])
                   if sample_labels.get("worker") in workers
                   and all(sample_labels.get(k) == v for k, v in labels.items()))

    return summed(after) - summed(before)


def test_job_metrics_counted_every_job(observed):
    before, after, _, _ = observed
    assert delta(before, after, "llamaq_jobs_finished_total", status="succeeded") == JOBS
    for histogram in ("llamaq_job_queue_wait_seconds", "llamaq_job_run_seconds",
                      "llamaq_time_to_first_token_seconds"):
        assert delta(before, after, f"{histogram}_count") == JOBS, histogram
        assert delta(before, after, f"{histogram}_sum") > 0, histogram
        # Cumulative buckets: +Inf holds every observation.
        assert delta(before, after, f"{histogram}_bucket", le="+Inf") == JOBS, histogram
    tokens = delta(before, after, "llamaq_generated_tokens_total")
    assert JOBS <= tokens <= JOBS * 4
    assert delta(before, after, "llamaq_prompt_tokens_total") > JOBS * 5
    assert delta(before, after, "llamaq_batch_size_count") >= tokens / 2  # one observation a decoding step


def test_queue_and_worker_gauges(observed, stack):
    _, after, _, _ = observed
    assert total(after, "llamaq_queue_depth", queue=stack.env.get("QUEUE_NAME", "llamaq")) == 0
    assert total(after, "llamaq_jobs_running") == 0
    assert total(after, "llamaq_workers_alive") == 1
    # On this CPU worker: present, and zero.
    gpu = after["llamaq_gpu_memory_used_bytes"]
    assert len(gpu) == 1 and gpu[0][0]["worker"] and gpu[0][1] == 0


def test_http_metrics_are_summed_over_gunicorn_processes(stack):
    """Each request on a fresh connection lands on either gateway process; every scrape must still see all."""
    direct = f"http://127.0.0.1:{stack.gateway_port}"
    start = total(scrape(f"{direct}/metrics"), "llamaq_http_requests_total", route="/healthz")
    for _ in range(10):
        assert httpx.get(f"{direct}/healthz", headers={"Connection": "close"}).status_code == 200
    # A scrape is itself a request (to /metrics), so /healthz stays exactly as counted, scrape after scrape.
    seen = {total(scrape(f"{direct}/metrics"), "llamaq_http_requests_total", route="/healthz") for _ in range(6)}
    assert seen == {start + 10}
    durations = scrape(f"{direct}/metrics")
    assert total(durations, "llamaq_http_request_duration_seconds_count", route="/healthz") >= 10


def test_the_worker_serves_its_own_metrics(observed, stack):
    own = scrape(f"http://127.0.0.1:{stack.worker_metrics_port}/metrics")
    assert total(own, "llamaq_generated_tokens_total") > 0
    assert "llamaq_batch_size_bucket" in own


def _json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_one_request_id_in_nginx_gateway_and_worker_logs(observed, stack):
    _, _, request_id, job_id = observed
    nginx = [e for e in _json_lines(stack.nginx.read_access_log()) if e.get("request_id") == request_id]
    assert nginx and nginx[0]["status"] == 202
    gateway = [e for e in _json_lines((stack.workdir / "gateway.log").read_text()) if e.get("request_id") == request_id]
    assert any(e.get("job_id") == job_id and e["service"] == "gateway" for e in gateway), gateway
    worker = [e for e in _json_lines((stack.workdir / "worker.log").read_text()) if e.get("request_id") == request_id]
    messages = [e["message"] for e in worker if e.get("job_id") == job_id]
    assert any("admitted" in m for m in messages) and any("succeeded" in m for m in messages), messages


def test_no_prompt_text_in_any_log(observed, stack):
    logs = {name: (stack.workdir / f"{name}.log").read_text() for name in ("gateway", "worker")}
    logs["nginx"] = stack.nginx.read_access_log() + stack.nginx.read_error_log()
    for name, text in logs.items():
        assert "zanzibarquux" not in text, f"the prompt leaked into the {name} log"


def test_log_prompts_1_logs_each_jobs_messages(prompt_logging_stack):
    stack = prompt_logging_stack
    reply = httpx.post(f"{stack.url}/v1/generate", json={"prompt": SECRET_PROMPT, "wait_s": 30}, timeout=60)
    assert reply.status_code == 200 and reply.json()["status"] == "succeeded", reply.text
    job_id = reply.json()["id"]
    lines = [e for e in _json_lines((stack.workdir / "worker.log").read_text()) if e.get("job_id") == job_id]
    logged = [json.loads(e["messages"]) for e in lines if "messages" in e]
    assert logged == [[{"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": SECRET_PROMPT}]]
