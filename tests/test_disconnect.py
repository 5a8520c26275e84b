"""Work for clients who left: the OpenAI routes cancel the job of a client that disconnects before its answer is
complete (CANCEL_ON_DISCONNECT, on by default), through nginx as deployed; the job API, a request with an
Idempotency-Key, a background response and CANCEL_ON_DISCONNECT=0 leave the job running.

Paced-engine stacks (no model: every job makes exactly its max_tokens at a fixed rate) make the jobs long and the
timings exact: a LONG job would run for a minute, a SHORT one ends a second or two after the client left.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
import redis

from conftest import running_stack, stack_environment
from llamaq_protocol import keys
from helpers import wait_for_job_status

# A stream that never gets its first chunks (a worker down) fails instead of holding the run.
pytestmark = [pytest.mark.timeout(120), pytest.mark.stack]  # its stacks are `paced` and `paced_kept`

PACED_TOKENS_PER_S = 20
LONG = 1200  # tokens: a minute of generation, were it not canceled
SHORT = 30  # tokens: 1.5 s, long enough to be running when its client leaves, short enough to wait for
# A canceled job ends within a couple of seconds of its client leaving (with room for a loaded test machine).
CANCELED_WITHIN_S = 5
# Running on: SHORT tokens, and some slack.
SUCCEEDED_WITHIN_S = 20
GONE_AFTER_S = 0.5  # the client timeout of the requests that give up

CHAT = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]
PROMPT = "Count from 1 to 500, one number per line."


def paced_environment(**overrides: str) -> dict[str, str]:
    return stack_environment(ENGINE="paced", PACED_TOKENS_PER_S=str(PACED_TOKENS_PER_S), MAX_BATCH="8", **overrides)


@pytest.fixture(scope="module")
def paced():
    with running_stack("llamaq-disconnect-", paced_environment()) as running:
        yield running


@pytest.fixture(scope="module")
def paced_kept():
    """CANCEL_ON_DISCONNECT=0: today's behaviour, every job runs on."""
    with running_stack("llamaq-disconnect-off-", paced_environment(CANCEL_ON_DISCONNECT="0")) as running:
        yield running


@pytest.fixture
def http(paced):
    with httpx.Client(base_url=paced.url, timeout=30) as client:
        yield client


def job_of_request(stack, request_id: str) -> str:
    """The id of the job a request (sent with this X-Request-ID) queued, from the stack's Redis: a request that
    timed out never said."""
    with redis.Redis.from_url(stack.env["REDIS_URL"]) as store:
        for key in store.scan_iter(match=keys.job("*"), count=1000):
            if store.hget(key, "request_id") == request_id.encode():
                return key.decode().removeprefix(keys.job(""))
    raise AssertionError(f"no job has request id {request_id}")


def stream_first_data(client: httpx.Client, path: str, body: dict, chunks: int = 2, **kwargs) -> list[dict]:
    """POST a streamed request, read its first `chunks` data events (pings and [DONE] aside), then hang up."""
    seen: list[dict] = []
    with client.stream("POST", path, json=body, **kwargs) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                seen.append(json.loads(line.removeprefix("data: ")))
                if len(seen) == chunks:
                    break
    return seen  # leaving the block closes the connection mid-stream


def give_up_waiting(stack, client: httpx.Client, method: str, path: str, headers: dict | None = None,
                    **kwargs) -> str:
    """A request whose client times out before the answer (its connection closed); the id of its job."""
    request_id = uuid.uuid4().hex
    try:
        answer = client.request(method, path, timeout=GONE_AFTER_S,
                                headers={**(headers or {}), "X-Request-ID": request_id}, **kwargs)
    except httpx.TimeoutException:
        return job_of_request(stack, request_id)
    raise AssertionError(f"answered before the client gave up: {answer.status_code} {answer.text[:500]}")


def chat(max_tokens: int, **extra) -> dict:
    return {"messages": CHAT, "max_tokens": max_tokens, **extra}


# ---- canceled: the OpenAI routes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "prefix"), [
    ("/v1/chat/completions", chat(LONG, stream=True), "chatcmpl-"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": LONG, "stream": True}, "cmpl-"),
])
def test_a_stream_whose_client_hangs_up_is_canceled(paced, http, path, body, prefix):
    chunks = stream_first_data(http, path, body)
    job_id = chunks[0]["id"].removeprefix(prefix)
    job = wait_for_job_status(http, job_id, "canceled", CANCELED_WITHIN_S)
    assert 0 < job["output"]["usage"]["completion_tokens"] < LONG / 4
    log = (paced.workdir / "gateway.log").read_text(errors="replace")
    assert f"job {job_id} canceled: its client disconnected" in log


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", chat(LONG)),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": LONG}),
])
def test_a_wait_whose_client_times_out_is_canceled(paced, http, path, body):
    job_id = give_up_waiting(paced, http, "POST", path, json=body)
    job = wait_for_job_status(http, job_id, "canceled", CANCELED_WITHIN_S)
    assert job["output"]["usage"]["completion_tokens"] < LONG / 4


def test_a_response_whose_client_leaves_is_canceled(paced, http):
    streamed = stream_first_data(http, "/v1/responses", {"input": PROMPT, "max_output_tokens": LONG, "stream": True},
                                 chunks=4)
    response_id = streamed[0]["response"]["id"]
    wait_for_job_status(http, response_id, "canceled", CANCELED_WITHIN_S)
    assert http.get(f"/v1/responses/{response_id}").json()["status"] == "cancelled"

    waited = give_up_waiting(paced, http, "POST", "/v1/responses", json={"input": PROMPT, "max_output_tokens": LONG})
    assert waited.startswith("resp_")
    wait_for_job_status(http, waited, "canceled", CANCELED_WITHIN_S)


# ---- kept: the job API, Idempotency-Key, background ------------------------------------------------------------


def test_the_job_api_outlives_its_connection(paced, http):
    job_params = {"prompt": PROMPT, "max_new_tokens": SHORT}
    generated = give_up_waiting(paced, http, "POST", "/v1/generate", json={**job_params, "wait_s": 60})
    legacy = give_up_waiting(paced, http, "POST", "/", json=job_params)
    polled = http.post("/v1/jobs", json=job_params).json()["id"]
    with pytest.raises(httpx.TimeoutException):
        http.get(f"/v1/jobs/{polled}", params={"wait": 30}, timeout=GONE_AFTER_S)
    for job_id in (generated, legacy, polled):
        job = wait_for_job_status(http, job_id, "succeeded", SUCCEEDED_WITHIN_S)
        assert job["output"]["usage"]["completion_tokens"] == SHORT


def test_a_client_with_an_idempotency_key_or_a_background_response_is_waited_for(paced, http):
    """A client that sends Idempotency-Key means to retry and reattach; a background response outlives its
    connection by design."""
    chunks = stream_first_data(http, "/v1/chat/completions", chat(SHORT, stream=True),
                               headers={"Idempotency-Key": "disconnect-test-stream"})
    keyed_stream = chunks[0]["id"].removeprefix("chatcmpl-")
    keyed_wait = give_up_waiting(paced, http, "POST", "/v1/chat/completions", json=chat(SHORT),
                                 headers={"Idempotency-Key": "disconnect-test-wait"})
    streamed = stream_first_data(http, "/v1/responses", {"input": PROMPT, "max_output_tokens": SHORT, "stream": True,
                                                         "background": True}, chunks=3)
    background = streamed[0]["response"]["id"]
    for job_id in (keyed_stream, keyed_wait, background):
        wait_for_job_status(http, job_id, "succeeded", SUCCEEDED_WITHIN_S)


# ---- CANCEL_ON_DISCONNECT=0 ------------------------------------------------------------------------------------


def test_cancel_on_disconnect_off_keeps_every_job(paced_kept):
    with httpx.Client(base_url=paced_kept.url, timeout=30) as client:
        chunks = stream_first_data(client, "/v1/chat/completions", chat(SHORT, stream=True))
        streamed = chunks[0]["id"].removeprefix("chatcmpl-")
        waited = give_up_waiting(paced_kept, client, "POST", "/v1/chat/completions", json=chat(SHORT))
        for job_id in (streamed, waited):
            job = wait_for_job_status(client, job_id, "succeeded", SUCCEEDED_WITHIN_S)
            assert job["output"]["usage"]["completion_tokens"] == SHORT
