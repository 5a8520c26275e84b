"""Metrics and logs through the real stack: nginx, gunicorn with two gateway processes, Redis, the worker."""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import poll, wait_until

JOBS = 4
# Unusual enough that finding it in a log can only mean the prompt was logged.
SECRET_PROMPT = "Spell the word zanzibarquux backwards"


# Sample name -> (labels, value) of each sample by that name.
Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = defaultdict(list)
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


@dataclass
class Observed:
    """Samples before and after the jobs: the gateway's /metrics (the queue as Redis holds it, its HTTP series) and
    the worker's own (METRICS_PORT: its jobs, tokens and batches), each a (before, after) pair."""

    gateway: tuple[Samples, Samples]
    worker: tuple[Samples, Samples]
    request_id: str
    job_id: str


@pytest.fixture(scope="module")
def observed(stack) -> Observed:
    """Metrics before and after JOBS jobs sent through nginx, one of them with a request id of ours."""
    gateway = f"{stack.url}/metrics"
    (worker,) = stack.worker_metrics_urls
    # Jobs of earlier tests may still be queued or running on the shared stack: start from an idle one, and give the
    # worker a moment to count the last one's run time (observed just after its record ends).
    wait_until(lambda counts: counts == (0, 0), 300, "the stack to go idle (jobs queued, jobs running)",
               observe=lambda: queued_and_running(scrape(gateway)), interval_s=0.5)
    time.sleep(1)
    gateway_before, worker_before = scrape(gateway), scrape(worker)
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
    worker_after = poll(lambda: scrape(worker),
                        lambda after: delta((worker_before, after), "llamaq_job_run_seconds_count") >= JOBS, 15,
                        interval_s=0.5)
    # Jobs by final status are counted by the script that ends each, before its waiter hears of it.
    return Observed((gateway_before, scrape(gateway)), (worker_before, worker_after), request_id, first_job)


def delta(pair: tuple[Samples, Samples], name: str, **labels: str) -> float:
    """How much `name` grew from one scrape of an endpoint to the next."""
    before, after = pair
    return total(after, name, **labels) - (total(before, name, **labels) if name in before else 0)


def test_job_metrics_counted_every_job(observed):
    assert delta(observed.gateway, "llamaq_jobs_finished_total", status="succeeded") == JOBS
    for histogram in ("llamaq_job_queue_wait_seconds", "llamaq_job_run_seconds",
                      "llamaq_time_to_first_token_seconds"):
        assert delta(observed.worker, f"{histogram}_count") == JOBS, histogram
        assert delta(observed.worker, f"{histogram}_sum") > 0, histogram
        # Cumulative buckets: +Inf holds every observation.
        assert delta(observed.worker, f"{histogram}_bucket", le="+Inf") == JOBS, histogram
    tokens = delta(observed.worker, "llamaq_generated_tokens_total")
    assert JOBS <= tokens <= JOBS * 4
    assert delta(observed.worker, "llamaq_prompt_tokens_total") > JOBS * 5
    assert delta(observed.worker, "llamaq_batch_size_count") >= tokens / 2  # one observation a decoding step


def test_queue_and_worker_gauges(observed, stack):
    _, after = observed.gateway
    assert total(after, "llamaq_queue_depth", queue=stack.env.get("QUEUE_NAME", "llamaq")) == 0
    assert total(after, "llamaq_jobs_running") == 0
    assert total(after, "llamaq_workers_alive") == 1
    # On this CPU worker: present, and zero.
    gpu = observed.worker[1]["llamaq_gpu_memory_used_bytes"]
    assert len(gpu) == 1 and gpu[0][1] == 0


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


def test_worker_series_are_on_its_own_endpoint_not_the_gateways(observed):
    """One way out for a worker's series: its METRICS_PORT, which Prometheus scrapes (each counted once)."""
    own, gateway = observed.worker[1], observed.gateway[1]
    assert total(own, "llamaq_generated_tokens_total") > 0
    assert "llamaq_batch_size_bucket" in own
    assert not set(own) & set(gateway), sorted(set(own) & set(gateway))
    assert not [labels for samples in gateway.values() for labels, _ in samples if "worker" in labels]


def _json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_one_request_id_in_nginx_gateway_and_worker_logs(observed, stack):
    request_id, job_id = observed.request_id, observed.job_id
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
