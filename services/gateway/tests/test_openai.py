"""The OpenAI-compatible layer: request translation, refusals, response objects, error shape; streaming from a job's
events on a real Redis."""

import asyncio
import json
import time
from datetime import datetime, timezone

import anyio
import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletionChunk

from llamaq_gateway.app import create_app
from llamaq_gateway.event_hub import EventHub
from llamaq_gateway.errors import InvalidParameter, ModelNotFound, WaitTimeout, error_response
from llamaq_gateway.openai import (
    ChatCompletionRequest,
    ChunkBuilder,
    CompletionRequest,
    Rendering,
    check_model,
    completion,
    models_list,
    stream_completion,
    to_params,
)
from llamaq_gateway.settings import GatewaySettings
from llamaq_protocol import Job, JobOutput, JobStatus, ModelCard, Usage, keys
from nginx_local import free_port

LIMIT = 4096
USER = {"role": "user", "content": "hi"}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [USER], **fields})


def text(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "hi", **fields})


def card(name: str = "SmolLM2") -> ModelCard:
    return ModelCard(name=name, context_length=8192, chat_template="", tokenizer_digest="x")


# ---- translation -----------------------------------------------------------------------------------------------


def test_chat_maps_messages_and_sampling():
    params = to_params(
        chat(
            model="SmolLM2",
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "ok", "name": "bot"},
                {"role": "user", "content": "again"},
            ],
            max_tokens=10,
            temperature=0,
            top_p=0.5,
            stop="\n\n",
            seed=7,
            user="someone",
            stream=True,
            stream_options={"include_usage": True},
            n=1,
            frequency_penalty=0,
            response_format={"type": "text"},
            tool_choice="none",
        ),
        LIMIT,
    )
    assert params.chat_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    assert (params.max_new_tokens, params.temperature, params.top_p, params.stop, params.seed) == (
        10, 0, 0.5, ["\n\n"], 7,
    )
    assert params.prompt is None and params.top_k is None and params.repetition_penalty is None


def test_defaults_are_the_protocols_and_max_completion_tokens_wins():
    params = to_params(chat(), LIMIT)
    assert params.max_new_tokens == 512 and params.temperature is None and params.stop is None
    assert to_params(chat(max_tokens=5, max_completion_tokens=9), LIMIT).max_new_tokens == 9


def test_completions_prompt_is_one_user_turn():
    assert to_params(text(max_tokens=3), LIMIT).chat_messages() == [USER]
    assert to_params(text(prompt=["hi"]), LIMIT).chat_messages() == [USER]


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (chat(tools=[{"type": "web_search"}]), "tools.0.type"),
        (chat(tools=[TOOL, TOOL]), "tools"),  # the same name twice
        (chat(tool_choice="auto"), "tool_choice"),  # without tools
        (chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}), "tool_choice"),
        (chat(functions=[{"name": "f"}]), "functions"),
        (chat(function_call="auto"), "function_call"),
        (chat(top_logprobs=3), "top_logprobs"),  # without logprobs: true
        (chat(min_tokens=10, max_tokens=5), "min_tokens"),
        (chat(response_format={"type": "xml"}), "response_format.type"),
        (chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), "response_format.json_schema"),
        (chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}), "structured_outputs"),
        (chat(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
        (chat(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"}), "structured_outputs"),
        (chat(logit_bias={"abc": -100}), "logit_bias"),
        (chat(max_tokens=LIMIT + 1), "max_tokens"),
        (chat(max_completion_tokens=LIMIT + 1), "max_completion_tokens"),
        # a tool turn answering no call an earlier assistant turn made
        (chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "messages.0"),
        (chat(messages=[{"role": "assistant", "tool_calls": [{"id": "1"}]}]), "messages.0.tool_calls.0.function"),
        (chat(messages=[USER, {"role": "user", "content": "x", "tool_call_id": "1"}]), "messages.1.tool_call_id"),
        (chat(messages=[USER, {"role": "assistant", "content": None}]), "messages.1.content"),
        (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
         "messages.0.content.0"),
        (text(best_of=2), "best_of"),
        (text(max_tokens=0), "max_tokens"),  # 0 only with echo
        (text(suffix="end"), "suffix"),
        (text(prompt=["a", "b"]), "prompt"),
        (text(prompt=[[1, 2], [3]]), "prompt"),
        (text(prompt=[]), "prompt"),
    ],
)
def test_unsupported_options_are_refused_naming_the_field(request_, param):
    with pytest.raises(InvalidParameter) as refused:
        to_params(request_, LIMIT)
    assert refused.value.param == param
    assert refused.value.status_code == 400 and refused.value.error_type == "invalid_request_error"
    assert refused.value.message.startswith(param)


@pytest.mark.parametrize(
    "fields",
    [{"temperature": 2.5}, {"top_p": 0}, {"stop": ["a"] * 5}, {"stop": [""]}, {"max_tokens": 0}, {"colour": 1}],
)
def test_out_of_range_fields_fail_validation(fields):
    with pytest.raises(ValueError):
        chat(**fields)


def test_model_must_be_the_served_one_or_omitted():
    check_model(None, card())
    check_model("SmolLM2", card())
    with pytest.raises(ModelNotFound) as missing:
        check_model("gpt-4o", card())
    assert missing.value.status_code == 404 and missing.value.param == "model"
    listed = models_list(card())
    assert listed["object"] == "list" and listed["data"][0]["id"] == "SmolLM2"
    assert listed["data"][0]["object"] == "model" and listed["data"][0]["owned_by"] == "llamaq"


# ---- responses -------------------------------------------------------------------------------------------------


def job(status=JobStatus.succeeded, finish_reason="stop", text_="Paris.") -> Job:
    return Job(
        id="abc",
        status=status,
        created_at=datetime(2024, 1, 1, tzinfo=timezone.utc),
        output=JobOutput(text=text_, finish_reason=finish_reason, usage=Usage(prompt_tokens=20, completion_tokens=3)),
    )


def test_completion_objects():
    reply = completion("chat", job(), "SmolLM2")
    assert reply == {
        "id": "chatcmpl-abc", "object": "chat.completion", "created": 1704067200, "model": "SmolLM2",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
    }
    plain = completion("text", job(finish_reason="length"), "SmolLM2")
    assert plain["id"] == "cmpl-abc" and plain["object"] == "text_completion"
    assert plain["choices"][0]["text"] == "Paris." and plain["choices"][0]["finish_reason"] == "length"
    # OpenAI has no "canceled": a canceled job ends as "stop" with the text it had.
    canceled = completion("chat", job(JobStatus.canceled, "canceled", "Par"), "m")
    assert canceled["choices"][0]["finish_reason"] == "stop"


def test_stream_chunks():
    chunks = ChunkBuilder("chat", job(), "m", include_usage=True)
    assert chunks.opening().startswith('data: {"id":"chatcmpl-abc","object":"chat.completion.chunk"')
    assert '"delta":{"role":"assistant","content":""}' in chunks.opening()
    assert '"delta":{"content":"Par"}' in chunks.text("Par") and '"usage":null' in chunks.text("Par")
    final, usage_chunk = chunks.closing(job())
    assert '"delta":{},"logprobs":null,"finish_reason":"stop"' in final
    assert '"choices":[],' in usage_chunk and '"total_tokens":23' in usage_chunk
    assert all(piece.endswith("\n\n") for piece in (final, usage_chunk))

    # A silence's keepalive: a chunk with no choices (the usage chunk's shape), no usage in it.
    keepalive = json.loads(chunks.keepalive().removeprefix("data: "))
    assert keepalive["choices"] == [] and keepalive["usage"] is None and keepalive["id"] == "chatcmpl-abc"
    assert ChatCompletionChunk.model_validate(keepalive).choices == []

    plain = ChunkBuilder("text", job(), "m", include_usage=False)
    assert plain.opening() is None
    assert '"text":"Par"' in plain.text("Par") and "usage" not in plain.text("Par")
    assert len(plain.closing(job())) == 1


# ---- vLLM's sampling extensions, logprobs and echo ---------------------------------------------------------------


def test_vllm_sampling_extensions_reach_the_job():
    fields = dict(top_k=-1, min_p=0.1, repetition_penalty=1.2, ignore_eos=True, min_tokens=3, stop_token_ids=[2, 7],
                  skip_special_tokens=False, include_stop_str_in_output=True, max_tokens=40,
                  stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    for request_ in (chat(**fields), text(**fields)):
        params = to_params(request_, LIMIT)
        assert (params.top_k, params.min_p, params.repetition_penalty, params.ignore_eos, params.min_tokens) == (
            0, 0.1, 1.2, True, 3)  # top_k -1 is vLLM's "off", as 0
        assert params.stop_token_ids == [2, 7] and params.skip_special_tokens is False
        assert params.include_stop_str_in_output is True and params.logprobs is None
        assert request_.continuous_usage()
    assert not chat(stream=True, stream_options={"continuous_usage_stats": True}).continuous_usage()


@pytest.mark.parametrize("fields", [{"min_p": 1.5}, {"top_k": -2}, {"stop_token_ids": [-1]}, {"min_tokens": -1},
                                    {"top_logprobs": 21}, {"repetition_penalty": 0}])
def test_vllm_ranges(fields):
    with pytest.raises(ValueError):
        chat(**fields)


def test_logprobs_and_echo_translation():
    assert to_params(chat(logprobs=True), LIMIT).logprobs == 0
    assert to_params(chat(logprobs=True, top_logprobs=5), LIMIT).logprobs == 5
    assert to_params(chat(logprobs=False), LIMIT).logprobs is None
    plain = to_params(text(logprobs=2), LIMIT)  # no echo: the chat-rendered prompt, generated tokens' logprobs
    assert plain.logprobs == 2 and plain.prompt_logprobs is None and plain.templated
    # lm-eval's local-completions log-likelihood request: raw text (or token ids), echo, logprobs, max_tokens 1
    raw = to_params(text(prompt="The sky is", echo=True, logprobs=1, max_tokens=1, temperature=0), LIMIT)
    assert (raw.prompt, raw.raw_prompt, raw.templated) == ("The sky is", True, False)
    assert (raw.logprobs, raw.prompt_logprobs, raw.max_new_tokens) == (1, 1, 1)
    ids = to_params(text(prompt=[[5, 6, 7]], echo=True, logprobs=0, max_tokens=0), LIMIT)
    assert ids.prompt_token_ids == [5, 6, 7] and ids.max_new_tokens == 1 and ids.prompt_logprobs == 0
    assert to_params(text(prompt=[5, 6]), LIMIT).prompt_token_ids == [5, 6]  # ids are always raw


def _entry(token: str, logprob: float, *top: tuple[str, float]) -> dict:
    return {"token": token, "id": len(token), "logprob": logprob,
            "top": [{"token": t, "id": len(t), "logprob": lp} for t, lp in top]}


def logprob_job() -> Job:
    output = JobOutput(
        text=" blue.", finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=2),
        logprobs=[_entry(" blue", -0.5, (" blue", -0.5), (" grey", -1.5)), _entry(".", -0.1, (".", -0.1), ("!", -3.0))],
        prompt_logprobs=[None, _entry(" sky", -4.0, (" is", -2.0), (" sky", -4.0)), _entry(" is", -1.0, (" is", -1.0))],
    )
    return Job(id="abc", status=JobStatus.succeeded, created_at=datetime(2024, 1, 1, tzinfo=timezone.utc),
               output=output)


def test_chat_logprobs_in_openais_shape():
    reply = completion("chat", logprob_job(), "m", Rendering(logprobs=1))
    content = reply["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": " blue", "logprob": -0.5, "bytes": list(b" blue"),
                          "top_logprobs": [{"token": " blue", "logprob": -0.5, "bytes": list(b" blue")}]}
    assert [c["token"] for c in content] == [" blue", "."]


def test_completions_echo_with_logprobs_as_vllm():
    rendering = Rendering(logprobs=1, echo="The sky is", first_prompt_token="The")
    choice = completion("text", logprob_job(), "m", rendering)["choices"][0]
    assert choice["text"] == "The sky is blue."
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["The", " sky", " is", " blue", "."]
    assert logprobs["token_logprobs"] == [None, -4.0, -1.0, -0.5, -0.1]
    # the chosen token first, then up to `logprobs` alternatives by rank (vLLM: at most logprobs + 1)
    assert logprobs["top_logprobs"] == [None, {" sky": -4.0, " is": -2.0}, {" is": -1.0}, {" blue": -0.5},
                                        {".": -0.1}]
    assert logprobs["text_offset"] == [0, 3, 7, 10, 15]
    only = completion("text", logprob_job(), "m", Rendering(
        logprobs=1, echo="The sky is", first_prompt_token="The", echo_only=True))["choices"][0]
    assert only["text"] == "The sky is" and only["logprobs"]["tokens"] == ["The", " sky", " is"]


def test_stream_chunks_with_logprobs_echo_and_continuous_usage():
    rendering = Rendering(logprobs=0, echo="The sky is", first_prompt_token="The",
                                        continuous_usage=True, prompt_tokens=3)
    chunks = ChunkBuilder("text", logprob_job(), "m", include_usage=True, rendering=rendering)
    out = logprob_job().output.model_dump()
    first = chunks.token_event({"index": 0, "text": " blue", "completion_tokens": 1,
                                "logprobs": out["logprobs"][:1], "prompt_logprobs": out["prompt_logprobs"]})
    assert '"text":"The sky is blue"' in first and '"tokens":["The"," sky"," is"," blue"]' in first
    assert '"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}' in first
    second = chunks.token_event({"index": 1, "text": ".", "completion_tokens": 2, "logprobs": out["logprobs"][1:]})
    assert '"text_offset":[15]' in second and '"completion_tokens":2' in second
    assert chunks.token_event({"index": 2, "text": "", "completion_tokens": 2}) is None
    finish, usage_chunk = chunks.closing(logprob_job())
    assert '"finish_reason":"stop"' in finish and '"total_tokens":5' in finish
    assert '"choices":[]' in usage_chunk


# ---- the error shape on the wire -------------------------------------------------------------------------------


@pytest.fixture
def offline_client():
    settings = GatewaySettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings)) as client:
        yield client


def test_refusals_come_before_redis_in_both_error_shapes(offline_client):
    refused = offline_client.post("/v1/chat/completions", json={"messages": [USER], "functions": [{"name": "f"}]})
    assert refused.status_code == 400
    assert refused.json() == {"error": {
        "type": "invalid_request_error", "message": refused.json()["error"]["message"], "code": 400,
        "param": "functions",
    }}
    invalid = offline_client.post("/v1/completions", json={"prompt": "hi", "top_p": 7})
    assert invalid.status_code == 422
    assert invalid.json()["error"]["type"] == "invalid_request_error"
    assert invalid.json()["error"]["param"] == "top_p" and invalid.json()["error"]["code"] == 422
    malformed = offline_client.post("/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] is None
    # Redis away: the usual 503, in the OpenAI shape on these paths.
    down = offline_client.get("/v1/models")
    assert down.status_code == 503 and down.json()["error"]["param"] is None and down.headers["retry-after"]
    # The other routes keep the plain shape.
    plain = offline_client.post("/v1/jobs", json={"prompt": "hi", "top_p": 7}).json()
    assert plain["error"]["type"] == "invalid_request" and "param" not in plain["error"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/v1/chat/completions", None, 405),  # a method mismatch still knows its route
        ("POST", "/v1/models", None, 405),
        ("PUT", "/v1/models/x", None, 405),
        ("GET", "/v1/models/x/y", None, 503),
        ("POST", "/v1/completions", b"{", 400),
    ],
)
def test_the_openai_shape_follows_the_route(offline_client, method, path, body, status):
    reply = offline_client.request(method, path, content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == status and reply.json()["error"]["param"] is None


@pytest.mark.parametrize("body", [b"{", b'{"prompt": "\xff"}', b"[" * 5000])  # FastAPI's own 400s: the last two
def test_a_body_that_does_not_parse_is_invalid_json_or_openais_invalid_request(offline_client, body):
    headers = {"Content-Type": "application/json"}
    for path, error_type in [("/v1/completions", "invalid_request_error"), ("/v1/jobs", "invalid_json")]:
        reply = offline_client.post(path, content=body, headers=headers)
        assert reply.status_code == 400 and reply.json()["error"]["type"] == error_type, reply.text


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nope"), ("PATCH", "/v1/jobs/abc"), ("GET", "/v1/chat")])
def test_other_routes_and_unknown_paths_keep_the_plain_shape(offline_client, method, path):
    error = offline_client.request(method, path).json()["error"]
    assert error["code"] in (404, 405) and "param" not in error


def test_the_new_tokens_cap_comes_before_redis_in_both_shapes(offline_client):
    openai = offline_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": LIMIT + 1}).json()
    assert openai["error"] == {
        "type": "invalid_request_error", "message": f"max_tokens: must be at most {LIMIT}", "code": 400,
        "param": "max_tokens",
    }
    plain = offline_client.post("/v1/jobs", json={"prompt": "hi", "max_new_tokens": LIMIT + 1}).json()
    assert plain["error"] == {
        "type": "invalid_request", "message": f"max_new_tokens: must be at most {LIMIT}", "code": 400,
    }


def test_a_wait_timeout_tells_sdks_not_to_retry():
    exc = WaitTimeout("job x is still running")
    reply = error_response(exc.status_code, exc.error_type, exc.message, retryable=exc.retryable)
    assert reply.status_code == 504 and reply.headers["x-should-retry"] == "false"


# ---- streaming from the job's events ---------------------------------------------------------------------------


class FakeJobs:
    """A JobService stand-in: the real event hub on a real Redis, and `get` answering the terminal job."""

    def __init__(self, hub: EventHub, final: Job):
        self.hub = hub
        self.final = final

    async def ended(self, job_id, owner):
        return self.final


@pytest.fixture
def streamed(redis_url, store):
    """The chunks `stream_completion` makes of these (id, event, data) entries on the job's stream."""

    def run_stream(entries, final=None) -> list[str]:
        final = final or job()
        store.delete(keys.events(final.id))
        for entry_id, event, data in entries:
            store.xadd(keys.events(final.id), {"event": event, "data": data}, id=entry_id)
        store.hset(keys.job(final.id), mapping={"status": final.status.value})

        async def run():
            commands = aioredis.Redis.from_url(redis_url)
            hub = EventHub(redis_url, commands)
            hub.start()
            try:
                return [p async for p in stream_completion(
                    "chat", FakeJobs(hub, final), job(), "o", "m", False, 0.01)]
            finally:
                await hub.aclose()
                await commands.aclose()

        return anyio.run(run)

    return run_stream


def test_stream_from_events_to_done(streamed):
    pieces = streamed([
        ("1-0", "status", '{"status":"running"}'),
        ("2-0", "token", '{"index":0,"text":"Par"}'),
        ("3-0", "token", '{"index":1,"text":"is."}'),
        ("4-0", "status", '{"status":"succeeded"}'),
        ("5-0", "done", "{}"),
    ])
    assert ['"content":"Par"' in p for p in pieces] == [False, True, False, False, False]
    assert '"finish_reason":"stop"' in pieces[3] and pieces[4] == "data: [DONE]\n\n"


def test_stream_of_a_failed_job_ends_with_an_error_event(streamed):
    failed = Job(id="abc", status=JobStatus.failed, created_at=datetime(2024, 1, 1, tzinfo=timezone.utc),
                 error={"type": "timeout", "message": "too slow"})
    pieces = streamed([("1-0", "status", '{"status":"failed"}'), ("2-0", "done", "{}")], failed)
    assert len(pieces) == 2 and pieces[-1] == "data: [DONE]\n\n"
    assert pieces[0].startswith('data: {"error":{"type":"timeout"') and '"code":500' in pieces[0]


def test_the_role_chunk_comes_with_the_first_token_not_while_queued(redis_url, store):
    """As vLLM streams: nothing is sent while the job waits, so a client's time to first chunk is the time to the
    first token. A job that ends with no token still opens with the role."""
    final = job()
    store.delete(keys.events(final.id))
    store.xadd(keys.events(final.id), {"event": "status", "data": '{"status":"queued"}'})

    async def run():
        commands = aioredis.Redis.from_url(redis_url)
        hub = EventHub(redis_url, commands)
        hub.start()
        token_written_at = None

        async def write():
            nonlocal token_written_at
            await asyncio.sleep(0.3)  # queued, then running: no chunk may go out meanwhile
            await commands.xadd(keys.events(final.id), {"event": "status", "data": '{"status":"running"}'})
            await asyncio.sleep(0.2)
            token_written_at = time.monotonic()
            await commands.xadd(keys.events(final.id), {"event": "token", "data": '{"index":0,"text":"Par"}'})
            await commands.xadd(keys.events(final.id), {"event": "done", "data": "{}"})

        writer = asyncio.create_task(write())
        try:
            received = [(time.monotonic(), p) async for p in stream_completion(
                "chat", FakeJobs(hub, final), job(), "o", "m", False, 10)]
            await writer
            return token_written_at, received
        finally:
            await hub.aclose()
            await commands.aclose()

    token_written_at, received = asyncio.run(run())
    assert '"role":"assistant"' in received[0][1] and received[0][0] >= token_written_at
    assert '"content":"Par"' in received[1][1]


def test_a_stream_that_ends_without_a_token_still_opens_with_the_role(streamed):
    pieces = streamed([("1-0", "status", '{"status":"succeeded"}'), ("2-0", "done", "{}")])
    assert '"role":"assistant"' in pieces[0] and '"finish_reason":"stop"' in pieces[1]
    assert pieces[-1] == "data: [DONE]\n\n"


def test_stream_restarted_by_a_lost_worker(streamed):
    requeued = ("3-0", "status", '{"status":"queued","requeued":true}')
    # Nothing sent yet: the client never notices.
    quiet = streamed([("1-0", "status", '{"status":"running"}'), requeued, ("4-0", "token", '{"index":0,"text":"P"}'),
                      ("5-0", "done", "{}")])
    assert '"content":"P"' in quiet[1] and quiet[-1] == "data: [DONE]\n\n" and "error" not in "".join(quiet)
    # Text already sent cannot be taken back: the stream ends with an error.
    loud = streamed([("1-0", "token", '{"index":0,"text":"P"}'), requeued, ("4-0", "token", '{"index":0,"text":"P"}')])
    assert '"type":"worker_lost"' in loud[2] and loud[3] == "data: [DONE]\n\n" and len(loud) == 4


def test_tools_response_formats_and_sampling_options_reach_the_job():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    params = to_params(chat(
        messages=[USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "2"}]}],
        tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}}, parallel_tool_calls=False,
        n=3, presence_penalty=0.5, frequency_penalty=-1, logit_bias={"42": 5},
    ), LIMIT)
    assert params.forced_tools() and params.parallel_tool_calls is False and params.n == 3
    assert (params.presence_penalty, params.frequency_penalty, params.logit_bias) == (0.5, -1, {42: 5.0})
    # The template gets a call's arguments as an object, and the tool turn's text.
    assert params.chat_messages()[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert params.chat_messages()[2] == {"role": "tool", "content": "2", "tool_call_id": "call_1"}
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    formats = [
        ({"type": "text"}, None),
        ({"type": "json_object"}, ("json_object", True)),
        ({"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}, ("json", schema)),
        ({"type": "json_schema", "json_schema": {"name": "s"}}, ("json", {"type": "object"})),
    ]
    for response_format, kind in formats:
        constraint = to_params(chat(response_format=response_format), LIMIT).structured_outputs
        assert (constraint.kind() if constraint else None) == kind
    vllm_style = to_params(text(structured_outputs={"choice": ["yes", "no"]}), LIMIT).structured_outputs
    assert vllm_style.kind() == ("choice", ["yes", "no"])
