"""vLLM's sampling extensions, logprobs and echo through the real stack (nginx, gunicorn, Redis, a transformers
worker with the small model in float32): each parameter does what it says, on the OpenAI routes and on /v1/jobs,
and what an engine cannot do is refused before anything is queued.

guidellm sends `ignore_eos` and `stream_options.continuous_usage_stats`; lm-eval's `local-completions` scores
with `echo` + `logprobs` + `max_tokens: 1` on a raw prompt (token ids by default).
"""

from __future__ import annotations

import json
import os

import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from helpers import read_sse
from llamaq_protocol.keys import DEFAULT_QUEUE_NAME

QUEUE = f"llamaq:fq:{DEFAULT_QUEUE_NAME}:interactive:depth"  # (as long as the jobs waiting)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."  # greedy; 7 tokens, then EOS


@pytest.fixture(scope="module")
def oai(stack):
    with OpenAI(base_url=stack.url + "/v1", api_key="test", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(os.environ["LLAMAQ_TEST_MODEL"])


def sse_chunks(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as reply:
        assert reply.status_code == 200, reply.read()
        lines = [line.removeprefix("data: ") for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_guidellm_request_ignore_eos_with_usage_on_every_chunk(client):
    """What guidellm sends: ignore_eos and continuous usage. Exactly max_tokens tokens; every chunk has usage."""
    chunks = sse_chunks(client, "/v1/chat/completions", {
        "messages": FRANCE, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    })
    assert all(chunk["usage"] is not None for chunk in chunks)
    final = chunks[-1]["usage"]
    assert final["completion_tokens"] == 40 and final["total_tokens"] == final["prompt_tokens"] + 40
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and len(set(c["usage"]["prompt_tokens"] for c in chunks)) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.startswith(ANSWER) and len(text) > len(ANSWER)


def test_ignore_eos_and_min_tokens_on_completions_and_jobs(oai, client):
    done = oai.completions.create(model=oai.models.list().data[0].id, prompt="What is the capital of France?",
                                  max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 40 and done.choices[0].finish_reason == "length"
    plain = client.post("/v1/generate", json={"messages": FRANCE, "temperature": 0, "max_new_tokens": 40}).json()
    assert plain["output"]["usage"]["completion_tokens"] == 8 and plain["output"]["text"] == ANSWER
    held = client.post("/v1/generate", json={"messages": FRANCE, "temperature": 0, "max_new_tokens": 40,
                                             "min_tokens": 15}).json()
    assert held["status"] == "succeeded" and held["output"]["usage"]["completion_tokens"] > 15
    assert held["output"]["text"].startswith("The capital of France is Paris")


def test_stop_token_ids_and_include_stop_str_in_output(client, tokenizer):
    paris = tokenizer.encode(" Paris", add_special_tokens=False)[0]
    base = {"messages": FRANCE, "temperature": 0, "max_tokens": 40}
    cut = client.post("/v1/chat/completions", json={**base, "stop_token_ids": [paris]}).json()
    assert cut["choices"][0]["message"]["content"] == "The capital of France is"
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["usage"]["completion_tokens"] == 6
    kept = client.post("/v1/chat/completions", json={**base, "stop": ["Paris"], "include_stop_str_in_output": True})
    assert kept.json()["choices"][0]["message"]["content"] == "The capital of France is Paris"
    special = client.post("/v1/chat/completions", json={**base, "skip_special_tokens": False,
                                                        "include_stop_str_in_output": True}).json()
    assert special["choices"][0]["message"]["content"] == ANSWER + tokenizer.eos_token


def test_chat_logprobs_with_the_openai_sdk(oai):
    reply = oai.chat.completions.create(model=oai.models.list().data[0].id, messages=FRANCE, temperature=0,
                                        max_tokens=20, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert reply.choices[0].message.content == ANSWER
    assert len(content) == reply.usage.completion_tokens  # the ending EOS too, as vLLM reports it
    assert "".join(c.token for c in content[:-1]) == ANSWER
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen is the most likely
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)


def test_streamed_logprobs_match_the_unstreamed(client):
    body = {"messages": FRANCE, "temperature": 0, "max_tokens": 20, "logprobs": True, "top_logprobs": 2}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    chunks = sse_chunks(client, "/v1/chat/completions", {**body, "stream": True})
    streamed = [entry for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for entry in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in whole], abs=1e-5)


def test_lm_eval_loglikelihood_request_echo_logprobs(client, tokenizer):
    """lm-eval's local-completions scoring request, token ids (its default) and text: raw continuation, the
    prompt echoed with its tokens' logprobs (the first null), one generated token after it."""
    context, continuation = "The capital of France is", " Paris"
    ids = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctxlen = len(tokenizer.encode(context, add_special_tokens=False))
    scored = {}
    for prompt in ([ids], context + continuation):
        reply = client.post("/v1/completions", json={"prompt": prompt, "temperature": 0, "max_tokens": 1,
                                                     "logprobs": 1, "seed": 1234, "echo": True})
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        logprobs = choice["logprobs"]
        assert choice["text"].startswith(context + continuation)
        assert len(logprobs["tokens"]) == len(ids) + 1 == len(logprobs["token_logprobs"])
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
        assert "".join(logprobs["tokens"][:len(ids)]) == context + continuation
        assert logprobs["text_offset"][:2] == [0, len(logprobs["tokens"][0])]
        # what lm-eval reads: the continuation's logprobs, and whether each token was the greedy one
        continuation_lps = logprobs["token_logprobs"][ctxlen:-1]
        assert len(continuation_lps) == len(ids) - ctxlen
        for token_lp, top in zip(continuation_lps, logprobs["top_logprobs"][ctxlen:-1]):
            assert token_lp <= max(top.values()) + 1e-6
        scored[type(prompt).__name__] = sum(continuation_lps)
    assert scored["list"] == pytest.approx(scored["str"], abs=1e-4)
    # a likely continuation scores above an unlikely one
    odd = tokenizer.encode(context + " Berlin", add_special_tokens=False)
    other = client.post("/v1/completions", json={"prompt": [odd], "max_tokens": 1, "logprobs": 0, "echo": True})
    assert sum(other.json()["choices"][0]["logprobs"]["token_logprobs"][ctxlen:-1]) < scored["list"]


def test_echo_with_max_tokens_0_returns_the_prompt_alone(client):
    reply = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 0, "echo": True,
                                                 "logprobs": 0}).json()
    choice = reply["choices"][0]
    assert choice["text"] == "Once upon a time"
    assert "".join(choice["logprobs"]["tokens"]) == "Once upon a time"
    chunks = sse_chunks(client, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 3, "echo": True,
                                                    "temperature": 0, "stream": True})
    assert chunks[0]["choices"][0]["text"].startswith("Once upon a time")


def test_jobs_carry_logprobs_in_their_output_and_token_events(client):
    job = client.post("/v1/generate", json={"messages": FRANCE, "temperature": 0, "max_new_tokens": 20,
                                            "logprobs": 1, "prompt_logprobs": 0}).json()
    output = job["output"]
    assert len(output["logprobs"]) == output["usage"]["completion_tokens"]
    assert output["prompt_logprobs"][0] is None and len(output["prompt_logprobs"]) == output["usage"]["prompt_tokens"]
    assert all(e["logprob"] <= 0 and e["top"][0]["id"] == e["id"] for e in output["logprobs"])
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
        tokens = [json.loads(e["data"]) for e in read_sse(events) if e["event"] == "token"]
    assert [e for t in tokens for e in t.get("logprobs", [])] == output["logprobs"]
    assert tokens[0]["prompt_logprobs"] == output["prompt_logprobs"]
    assert tokens[-1]["completion_tokens"] == output["usage"]["completion_tokens"]
    plain = client.post("/v1/generate", json={"messages": FRANCE, "temperature": 0, "max_new_tokens": 4}).json()
    assert "logprobs" not in plain["output"] and "prompt_logprobs" not in plain["output"]


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/chat/completions", {"messages": FRANCE, "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": [[10**6]]}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": FRANCE, "min_tokens": 50, "max_tokens": 10}, 400, "min_tokens"),
    ("/v1/chat/completions", {"messages": FRANCE, "min_p": 2}, 422, "min_p"),
    ("/v1/chat/completions", {"messages": FRANCE, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": FRANCE, "presence_penalty": 3}, 422, "presence_penalty"),  # -2 .. 2
])
def test_bad_combinations_are_refused_before_queueing(client, store, path, body, status, param):
    before = store.llen(QUEUE)
    reply = client.post(path, json=body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param
    assert store.llen(QUEUE) == before


def test_bad_job_parameters_are_refused(client):
    assert client.post("/v1/jobs", json={"messages": FRANCE, "min_tokens": 60, "max_new_tokens": 10}).status_code == 422
    assert client.post("/v1/jobs", json={"prompt": "hi", "logprobs": 21}).status_code == 422
    assert client.post("/v1/jobs", json={"prompt": "hi", "raw_prompt": True, "system": "x"}).status_code == 422
    refused = client.post("/v1/jobs", json={"prompt_token_ids": [1, 10**6]})
    assert refused.status_code == 400 and "prompt_token_ids" in refused.json()["error"]["message"]


def test_an_engine_without_logprobs_refuses_them_before_queueing(prompt_logging_stack):
    """The echo engine runs no model: logprobs are a 400 naming the parameter and the engine, nothing queued;
    its other sampling settings are accepted."""
    import httpx

    with httpx.Client(base_url=prompt_logging_stack.url, timeout=60) as http:
        for path, body in [("/v1/chat/completions", {"messages": FRANCE, "logprobs": True}),
                           ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1}),
                           ("/v1/jobs", {"prompt": "hi", "logprobs": 0})]:
            reply = http.post(path, json=body)
            assert reply.status_code == 400, reply.text
            assert "echo engine" in reply.json()["error"]["message"] and "logprobs" in reply.json()["error"]["message"]
        ok = http.post("/v1/chat/completions", json={"messages": FRANCE, "ignore_eos": True, "min_tokens": 1,
                                                    "max_tokens": 8})
        assert ok.status_code == 200, ok.text
        # Nor can it hold its output to a grammar: refused the same way, naming the request's own field.
        for path, body, param in [
            ("/v1/chat/completions", {"messages": FRANCE, "response_format": {"type": "json_object"}},
             "response_format"),
            ("/v1/jobs", {"prompt": "hi", "structured_outputs": {"choice": ["a", "b"]}}, None),
        ]:
            reply = http.post(path, json=body)
            assert reply.status_code == 400 and "echo engine" in reply.json()["error"]["message"], reply.text
            assert param is None or reply.json()["error"]["param"] == param
