"""Token streaming and the OpenAI-compatible API, through nginx with every part real.

The SSE tests read `/v1/jobs/{id}/events` with httpx, drop the connection and resume with Last-Event-ID; the
OpenAI tests use the official `openai` package against the stack.
"""

from __future__ import annotations

import json

import openai
import pytest

from helpers import read_sse

PARIS_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
# The small model's greedy answer to PARIS_CHAT (test_stack asks the same through `prompt`).
PARIS_ANSWER = "The capital of France is Paris."
# Greedy SmolLM2 keeps counting: exactly max_new_tokens tokens, many token events.
COUNTING = {"prompt": "Count from 1 to 500, one number per line.", "max_new_tokens": 40, "temperature": 0}


def stream_id(event: dict) -> tuple[int, int]:
    ms, _, seq = event["id"].partition("-")
    return int(ms), int(seq or 0)


# ---- GET /v1/jobs/{id}/events ----------------------------------------------------------------------------------


def test_events_resume_after_disconnect_without_loss_or_duplicates(client):
    job = client.post("/v1/jobs", json=COUNTING).json()
    url = f"/v1/jobs/{job['id']}/events"

    with client.stream("GET", url) as first:
        assert first.status_code == 200
        assert first.headers["content-type"].startswith("text/event-stream")
        assert first.headers["cache-control"] == "no-cache"
        head = read_sse(first, token_limit=3)  # then hang up mid-generation
    assert head[0] == {"id": head[0]["id"], "event": "status", "data": '{"status":"queued"}'}
    assert [e["event"] for e in head].count("token") == 3

    with client.stream("GET", url, headers={"Last-Event-ID": head[-1]["id"]}) as second:
        assert second.status_code == 200
        tail = read_sse(second)

    events = head + tail
    ids = [stream_id(e) for e in events]
    assert ids == sorted(set(ids)), "event ids must strictly increase across the reconnect"
    tokens = [json.loads(e["data"]) for e in events if e["event"] == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert events[-1]["event"] == "done"
    done = json.loads(events[-1]["data"])
    statuses = [json.loads(e["data"])["status"] for e in events if e["event"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]

    # The disconnect did not cancel anything: the job ran to its length limit.
    assert done["id"] == job["id"] and done["status"] == "succeeded"
    assert done["output"]["finish_reason"] == "length"
    assert done["output"]["usage"]["completion_tokens"] == COUNTING["max_new_tokens"]
    assert "".join(t["text"] for t in tokens) == done["output"]["text"]
    assert client.get(f"/v1/jobs/{job['id']}").json()["output"]["text"] == done["output"]["text"]

    # A finished job replays from the start (same ids, same text); the query parameter resumes too.
    with client.stream("GET", url) as replay:
        assert read_sse(replay) == events
    with client.stream("GET", url, params={"last_event_id": events[-3]["id"]}) as resumed:
        assert read_sse(resumed) == events[-2:]
    # A client that already has `done` is told there is nothing more (EventSource stops on 204).
    assert client.get(url, headers={"Last-Event-ID": events[-1]["id"]}).status_code == 204


def test_events_refusals(client):
    unknown = client.get("/v1/jobs/0123456789abcdef0123456789abcdef/events")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == 404
    job = client.post("/v1/jobs", json={**COUNTING, "max_new_tokens": 2}).json()
    bad = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "not-an-id"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request"


# ---- OpenAI-compatible API -------------------------------------------------------------------------------------


def test_models_list(oai, model):
    models = oai.models.list().data
    assert [m.id for m in models] == [model]
    assert models[0].object == "model" and models[0].owned_by == "llamaq"
    assert oai.models.retrieve(model).id == model


def test_chat_completion_answers_paris(oai, model):
    reply = oai.chat.completions.create(model=model, messages=PARIS_CHAT, temperature=0, max_tokens=24)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == model
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == PARIS_ANSWER
    assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_reassembles_the_greedy_answer(oai, model):
    request = {"model": model, "messages": PARIS_CHAT, "temperature": 0, "max_tokens": 24}
    chunks = list(oai.chat.completions.create(**request, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks)
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == PARIS_ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    with_usage = list(
        oai.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    last = with_usage[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in with_usage[:-1]) == PARIS_ANSWER


def test_stop_text_across_tokens_is_cut_and_not_returned(oai, model):
    reply = oai.chat.completions.create(
        model=model, messages=PARIS_CHAT, temperature=0, max_tokens=24, stop=["of Fra"]
    )
    assert reply.choices[0].message.content == "The capital "
    assert reply.choices[0].finish_reason == "stop"


def test_completions_plain_and_streamed(oai, model):
    request = {"model": model, "prompt": "What is the capital of France?", "temperature": 0, "max_tokens": 24}
    reply = oai.completions.create(**request)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert "Paris" in reply.choices[0].text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    streamed = list(oai.completions.create(**request, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    assert streamed[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_openai_errors_in_both_shapes(oai, model, client):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model=model, messages=PARIS_CHAT, n=99)  # over MAX_N
    assert refused.value.body["param"] == "n" and refused.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="gpt-4o", messages=PARIS_CHAT)
    assert missing.value.body["type"] == "model_not_found" and missing.value.body["param"] == "model"

    reply = client.post("/v1/chat/completions", json={"messages": PARIS_CHAT, "tools": [{"type": "function"}]})
    assert reply.status_code == 400
    assert reply.json() == {"error": {
        "type": "invalid_request_error", "message": reply.json()["error"]["message"], "code": 400,
        "param": "tools.0.function",
    }}
    invalid = client.post("/v1/completions", json={"prompt": "hi", "temperature": 9})
    assert invalid.status_code == 422
    assert invalid.json()["error"]["param"] == "temperature" and invalid.json()["error"]["code"] == 422


def test_openai_request_leaves_a_job_behind(client, oai, model):
    """The completion id names the job, so its record and events stay reachable."""
    reply = oai.chat.completions.create(model=model, messages=PARIS_CHAT, temperature=0, max_tokens=4)
    job = client.get(f"/v1/jobs/{reply.id.removeprefix('chatcmpl-')}").json()
    assert job["status"] == "succeeded" and job["output"]["text"] == reply.choices[0].message.content
