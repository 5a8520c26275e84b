"""Fair share and per-key limits through the real stack (nginx, gunicorn, Redis, a worker with the paced engine and
one slot, so the order jobs run in is the queue's choice alone), with keys from an API_KEYS_FILE."""

from __future__ import annotations

import concurrent.futures
import hashlib
import signal
import time
from datetime import datetime

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from conftest import running_stack, stack_environment
from helpers import wait_for_job_status
from llamaq_protocol import keys

TOKENS_PER_S = 100
SHORT = {"prompt": "count", "max_new_tokens": 10}  # 0.1 s of the one slot
KEYS = {
    # name: (weight, limits)
    "flood": (1, {}),
    "patient": (1, {}),
    "heavy": (3, {}),
    "light": (1, {}),
    "limited": (1, {"rpm": 2}),
    "tokens": (1, {"tpm": 100}),
    "capped": (1, {"max_queued": 2}),
    "overflow": (1, {"rpm": 1, "over_limit": "queue"}),
}


def secret(name: str) -> str:
    return f"sk-test-{name}"


@pytest.fixture(scope="module")
def fair_stack(tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.toml"
    entries = []
    for name, (weight, limits) in KEYS.items():
        lines = [f'name = "{name}"', f'sha256 = "{hashlib.sha256(secret(name).encode()).hexdigest()}"',
                 f"weight = {weight}"] + [f"{k} = {v!r}".replace("'", '"') for k, v in limits.items()]
        entries.append("[[key]]\n" + "\n".join(lines))
    keys_file.write_text("\n\n".join(entries) + "\n")
    env = stack_environment(ENGINE="paced", MAX_BATCH="1", PACED_TOKENS_PER_S=str(TOKENS_PER_S),
                            API_KEYS_FILE=str(keys_file), MAX_QUEUE="1000")
    with running_stack("llamaq-fair-", env) as running:
        yield running


def as_key(stack, name: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, timeout=60, headers={"Authorization": f"Bearer {secret(name)}"})


@pytest.fixture(scope="module")
def store(fair_stack):
    client = redis.Redis.from_url(fair_stack.env["REDIS_URL"])
    yield client
    client.close()


def started(client: httpx.Client, job_id: str) -> datetime:
    job = wait_for_job_status(client, job_id, "succeeded", 120)
    return datetime.fromisoformat(job["started_at"])


def waited_s(client: httpx.Client, job_id: str) -> float:
    job = wait_for_job_status(client, job_id, "succeeded", 120)
    return (datetime.fromisoformat(job["started_at"]) - datetime.fromisoformat(job["created_at"])).total_seconds()


def submit(client: httpx.Client, body=SHORT, **headers) -> dict:
    reply = client.post("/v1/jobs", json=body, headers=headers)
    assert reply.status_code == 202, reply.text
    return reply.json()


def test_a_flooding_key_does_not_make_another_wait_behind_its_backlog(fair_stack):
    with as_key(fair_stack, "flood") as flood, as_key(fair_stack, "patient") as patient:
        backlog = [submit(flood)["id"] for _ in range(40)]  # 4 s of work for the one slot
        late = submit(patient)
        # Its place counts what will really run first: a job or two of the flood's, not forty.
        assert late["position"] <= 2, late
        wait = waited_s(patient, late["id"])
        # Within a slot's time or two (0.1 s each, plus the claim), not after the backlog (FIFO: ~4 s).
        assert wait < 1.0, wait
        for job_id in backlog:
            flood.delete(f"/v1/jobs/{job_id}")


def test_weights_are_honoured_in_proportion(fair_stack):
    with as_key(fair_stack, "heavy") as heavy, as_key(fair_stack, "light") as light, \
            as_key(fair_stack, "patient") as other:
        # Another key's long job holds the slot while both queue their work, so the order is all the scheduler's.
        blocker = submit(other, {"prompt": "hold", "max_new_tokens": 100})
        wait_for_job_status(other, blocker["id"], "running", 30)
        ids = {}
        for _ in range(16):
            ids[submit(heavy)["id"]] = "heavy"
            ids[submit(light)["id"]] = "light"
        order = sorted(ids, key=lambda job_id: started(heavy if ids[job_id] == "heavy" else light, job_id))
        first = [ids[job_id] for job_id in order[:12]]
        # Weight 3 to 1: about three heavy jobs to each light one while both wait.
        assert 7 <= first.count("heavy") <= 11, first


def test_rate_limits_answer_429_with_retry_after_and_openai_headers(fair_stack):
    sdk = openai.OpenAI(base_url=f"{fair_stack.url}/v1", api_key=secret("limited"), max_retries=0)
    chat = {"model": "llamaq", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    model = sdk.models.list().data[0].id
    chat["model"] = model
    first = sdk.chat.completions.with_raw_response.create(**chat)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    sdk.chat.completions.create(**chat)
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.chat.completions.create(**chat)
    response = refused.value.response
    assert 1 <= int(response.headers["retry-after"]) <= 31
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.json()["error"]["type"] == "rate_limit_exceeded"
    # On every answer to the key, not only submissions; and GET /v1/usage tells what is left.
    with as_key(fair_stack, "limited") as limited:
        usage = limited.get("/v1/usage")
    assert usage.headers["x-ratelimit-limit-requests"] == "2"
    assert usage.json()["remaining"]["requests"] == 0 and usage.json()["limits"]["rpm"] == 2
    # Tokens per minute: prompt + max tokens reserved at admission; a request that can never fit is a 400.
    with as_key(fair_stack, "tokens") as tokens:
        too_big = tokens.post("/v1/jobs", json={"prompt": "hi", "max_new_tokens": 200})
        assert too_big.status_code == 400 and "tpm" in too_big.json()["error"]["message"], too_big.text
        job = tokens.post("/v1/jobs", json={"prompt": "hi", "max_new_tokens": 60})
        assert job.status_code == 202 and int(job.headers["x-ratelimit-remaining-tokens"]) < 40, job.headers
        over = tokens.post("/v1/jobs", json={"prompt": "hi", "max_new_tokens": 60})
        assert over.status_code == 429 and "tokens" in over.json()["error"]["message"]
        assert int(over.headers["retry-after"]) >= 1


def test_a_keys_queued_jobs_are_bounded(fair_stack):
    with as_key(fair_stack, "capped") as capped:
        running = submit(capped, {"prompt": "hold", "max_new_tokens": 300})
        wait_for_job_status(capped, running["id"], "running", 30)
        waiting = [submit(capped) for _ in range(2)]
        refused = capped.post("/v1/jobs", json=SHORT)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "queue_full", refused.text
        assert "this client" in refused.json()["error"]["message"]
        for job in (running, *waiting):
            capped.delete(f"/v1/jobs/{job['id']}")


def test_over_quota_work_can_queue_behind_everyones(fair_stack, store):
    with as_key(fair_stack, "overflow") as overflow:
        within = submit(overflow)
        behind = submit(overflow)  # over its one request per minute: queued, not refused
        assert store.hget(keys.job(behind["id"]), "fq_tier").decode().endswith(":over")
        assert wait_for_job_status(overflow, behind["id"], "succeeded", 60)["status"] == "succeeded"
        assert wait_for_job_status(overflow, within["id"], "succeeded", 60)["status"] == "succeeded"


def test_usage_per_key_in_v1_usage_and_metrics(fair_stack):
    with as_key(fair_stack, "patient") as patient:
        before = patient.get("/v1/usage").json()
        job = submit(patient)
        wait_for_job_status(patient, job["id"], "succeeded", 60)
        after = patient.get("/v1/usage").json()
        assert after["key"] == "patient" and after["weight"] == 1
        assert after["requests"] == before["requests"] + 1
        assert after["completion_tokens"] == before["completion_tokens"] + SHORT["max_new_tokens"]
        assert after["prompt_tokens"] > before["prompt_tokens"]
        metrics = patient.get("/metrics").text
    samples = {(s.name, s.labels.get("key")): s.value for family in text_string_to_metric_families(metrics)
               for s in family.samples if s.name.startswith("llamaq_key_")}
    assert samples[("llamaq_key_requests_total", "patient")] >= after["requests"]
    assert samples[("llamaq_key_completion_tokens_total", "patient")] >= after["completion_tokens"]
    # Labels are the keys' names only: never a key, its hash or an address.
    assert {key for _, key in samples} <= set(KEYS)


def test_an_idempotency_key_survives_a_gateway_killed_mid_submission(fair_stack):
    """The admission is one script: a gateway killed at any point leaves each key either unused or naming its job,
    never held by nothing ("in flight" for an hour)."""
    idem = [f"crash-{time.time_ns()}-{i}" for i in range(24)]

    def send(key: str) -> int | None:
        try:
            with as_key(fair_stack, "flood") as flood:
                return flood.post("/v1/jobs", json=SHORT, headers={"Idempotency-Key": key}).status_code
        except httpx.HTTPError:
            return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sent = [pool.submit(send, key) for key in idem]
        time.sleep(0.15)
        fair_stack.stop_process("gateway", signal.SIGKILL)
        [future.result() for future in sent]
    fair_stack.start_gateway()
    fair_stack.wait_ready(60)
    with as_key(fair_stack, "flood") as flood:
        for key in idem:
            retry = flood.post("/v1/jobs", json=SHORT, headers={"Idempotency-Key": key})
            assert retry.status_code == 202, retry.text
            again = flood.post("/v1/jobs", json=SHORT, headers={"Idempotency-Key": key})
            assert again.json()["id"] == retry.json()["id"]
            wait_for_job_status(flood, retry.json()["id"], "succeeded", 60)


def test_open_mode_lists_are_scoped_to_the_callers_address(stack):
    """With the API open every job belongs to one owner; its id is its capability, but a list shows only what was
    submitted from the caller's own address."""
    mine = httpx.Client(base_url=stack.url, timeout=60)
    other = httpx.Client(base_url=stack.url, timeout=60, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with mine, other:
        job = submit(mine, {"prompt": "hi", "max_new_tokens": 2})
        assert job["id"] in [j["id"] for j in mine.get("/v1/jobs", params={"limit": 100}).json()["data"]]
        assert job["id"] not in [j["id"] for j in other.get("/v1/jobs", params={"limit": 100}).json()["data"]]
        assert other.get(f"/v1/jobs/{job['id']}").status_code == 200
        line = ('{"custom_id":"a","method":"POST","url":"/v1/chat/completions",'
                '"body":{"model":"m","messages":[{"role":"user","content":"hi"}]}}\n')
        uploaded = mine.post("/v1/files", files={"file": ("a.jsonl", line.encode())}, data={"purpose": "batch"}).json()
        assert uploaded["id"] in [f["id"] for f in mine.get("/v1/files").json()["data"]]
        assert uploaded["id"] not in [f["id"] for f in other.get("/v1/files").json()["data"]]
        mine.delete(f"/v1/files/{uploaded['id']}")
