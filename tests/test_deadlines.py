"""Deadlines through the stack (paced engine, one slot): `Cancel-After` and `deadline` on the submit routes. A queued
job past its deadline never starts, a running one stops with the text it has, both `canceled` with `error.type`
deadline_exceeded; a job that ends in time is untouched; bad values are a clear 400."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from conftest import running_stack, stack_environment
from helpers import wait_until

PACED_TOKENS_PER_S = 10


@pytest.fixture(scope="module")
def paced_stack():
    env = stack_environment(ENGINE="paced", PACED_TOKENS_PER_S=str(PACED_TOKENS_PER_S), MAX_BATCH="1",
                            INTERACTIVE_HEADROOM="0")
    with running_stack("llamaq-deadlines-", env) as running:
        yield running


def job(stack, job_id: str) -> dict:
    return httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()


def submit(stack, max_new_tokens: int, headers: dict | None = None, **fields) -> dict:
    resp = httpx.post(f"{stack.url}/v1/jobs", headers=headers or {}, json={
        "prompt": "count", "max_new_tokens": max_new_tokens, "ignore_eos": True, **fields})
    assert resp.status_code == 202, resp.text
    return resp.json()


def test_a_running_job_stops_and_a_queued_one_never_starts_past_their_deadline(paced_stack) -> None:
    # 600 tokens at 10/s: a minute of work, stopped after about 3 s; the job behind it has 2 s.
    running = submit(paced_stack, 600, headers={"Cancel-After": "3s"})
    wait_until(lambda: job(paced_stack, running["id"])["status"] == "running", 30, "the first job to run")
    queued = submit(paced_stack, 5, headers={"Cancel-After": "2"})
    in_time = submit(paced_stack, 5, deadline=(datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat())

    ended = wait_until(lambda j: j["status"] == "canceled", 30, "the queued job canceled",
                       observe=lambda: job(paced_stack, queued["id"]))
    assert ended["error"]["type"] == "deadline_exceeded" and "deadline" in ended["error"]["message"]
    assert ended.get("started_at") is None and "output" not in ended  # it never ran

    stopped = wait_until(lambda j: j["status"] == "canceled", 30, "the running job stopped",
                         observe=lambda: job(paced_stack, running["id"]))
    assert stopped["error"]["type"] == "deadline_exceeded"
    made = stopped["output"]["usage"]["completion_tokens"]
    assert 0 < made < 600 and stopped["output"]["finish_reason"] == "canceled"
    elapsed = (datetime.fromisoformat(stopped["finished_at"]) - datetime.fromisoformat(stopped["created_at"]))
    assert elapsed.total_seconds() < 3 + 10, elapsed  # the sweep's 2 s and a step, on busy cores

    done = wait_until(lambda j: j["status"] == "succeeded", 30, "the job with time to spare",
                      observe=lambda: job(paced_stack, in_time["id"]))
    assert "error" not in done and done["output"]["usage"]["completion_tokens"] == 5


def test_cancel_after_on_the_openai_route_and_bad_deadlines_are_refused(paced_stack) -> None:
    model = httpx.get(f"{paced_stack.url}/v1/models").json()["data"][0]["id"]
    chat = httpx.post(f"{paced_stack.url}/v1/chat/completions", headers={"Cancel-After": "1m"}, timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.status_code == 200, chat.text
    # A stream of 600 tokens (a minute) given 2 s: it ends early, and its job says why.
    with httpx.stream("POST", f"{paced_stack.url}/v1/chat/completions", headers={"Cancel-After": "2s"}, timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600,
                            "ignore_eos": True, "stream": True}) as stream:
        assert stream.status_code == 200
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) < 600
    job_id = json.loads(lines[0].removeprefix("data: "))["id"].removeprefix("chatcmpl-")
    stopped = job(paced_stack, job_id)
    assert stopped["status"] == "canceled" and stopped["error"]["type"] == "deadline_exceeded", stopped
    for headers, fields, param in [
        ({"Cancel-After": "soon"}, {}, "Cancel-After"),
        ({"Cancel-After": "0s"}, {}, "Cancel-After"),
        ({"Cancel-After": "-5"}, {}, "Cancel-After"),
        ({}, {"deadline": (datetime.now(timezone.utc) - timedelta(seconds=5)).isoformat()}, "deadline"),
        ({}, {"deadline": "2026-01-01T00:00:00"}, "deadline"),  # no time zone: which one?
    ]:
        resp = httpx.post(f"{paced_stack.url}/v1/jobs", headers=headers,
                          json={"prompt": "hi", "max_new_tokens": 2, **fields})
        assert resp.status_code in (400, 422), (headers, fields, resp.text)
        error = resp.json()["error"]
        assert param in (error.get("param") or "") + error["message"], error
    assert time.time()  # the stack answers on
    assert httpx.get(f"{paced_stack.url}/healthz").status_code == 200
