"""Tool calling, structured outputs, `n`, penalties and logit_bias through the real stack (nginx, gunicorn, Redis, a
worker with the small model), with the transformers engine here and vLLM's in test_vllm_stack.py, which runs these same
functions against its own stack.

The small model's own template ignores `tools`, so the worker runs with CHAT_TEMPLATE set to a ChatML template
that renders them in Llama 3.1's JSON format (tests/clients/chatml_tools.jinja), as vLLM is run with
--chat-template, and with vLLM's llama3_json parser. A 135M model does not reliably choose to call a tool, so the
"auto" cases hold it to a call's format with a grammar and prove that the parser reads what it wrote.
"""

from __future__ import annotations

import json
import re
import jsonschema
import pytest
from openai import OpenAI

from helpers import wait_until

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"], "additionalProperties": False}
GREEDY = {"temperature": 0, "max_tokens": 60}


@pytest.fixture(scope="module")
def stack(tool_stack):
    return tool_stack


def chat(client, **body) -> dict:
    reply = client.post("/v1/chat/completions", json={"messages": ASK, **GREEDY, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def calls_of(answer: dict) -> list[tuple[str, dict]]:
    message = answer["choices"][0]["message"]
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []]


def test_required_tool_choice_makes_a_valid_call(client):
    answer = chat(client, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls", answer
    (name, arguments), = calls_of(answer)  # parallel_tool_calls false: exactly one
    assert name in ("get_weather", "get_time")
    jsonschema.validate(arguments, (WEATHER if name == "get_weather" else TIME)["function"]["parameters"])
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")


def test_required_with_parallel_calls_keeps_every_complete_call(client):
    answer = chat(client, tools=[WEATHER, TIME], tool_choice="required", max_tokens=80)
    calls = calls_of(answer)
    assert calls and all(name in ("get_weather", "get_time") for name, _ in calls), answer
    ids = [call["id"] for call in answer["choices"][0]["message"]["tool_calls"]]
    assert len(set(ids)) == len(ids)


def test_named_tool_choice_calls_that_function(client):
    answer = chat(client, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert calls_of(answer)[0][0] == "get_time"
    jsonschema.validate(calls_of(answer)[0][1], TIME["function"]["parameters"])
    assert answer["choices"][0]["finish_reason"] == "stop"  # as OpenAI ends a forced function call


def test_auto_parses_the_models_own_calls_parallel_ones_too(client):
    # The grammar holds the small model to Llama 3.1's format (two calls, "; " apart); the parser reads them.
    pattern = (r'\{"name": "get_weather", "parameters": \{"city": "[A-Z][a-z]{2,9}"\}\}; '
               r'\{"name": "get_time", "parameters": \{"city": "[A-Z][a-z]{2,9}"\}\}')
    answer = chat(client, tools=[WEATHER, TIME], tool_choice="auto", structured_outputs={"regex": pattern})
    assert [name for name, _ in calls_of(answer)] == ["get_weather", "get_time"], answer
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    assert answer["choices"][0]["message"]["content"] is None
    # Without tools in play the same text is an ordinary answer.
    plain = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=12)
    assert plain["choices"][0]["message"].get("tool_calls") is None
    assert plain["choices"][0]["finish_reason"] in ("stop", "length")


def test_streamed_tool_call_adds_up_to_the_unstreamed_one(client, oai, model):
    body = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    whole = calls_of(chat(client, **body))
    assert len(whole) == 1 and whole[0][0] == "get_weather"
    stream = oai.chat.completions.create(messages=ASK, model=model, stream=True, **GREEDY, **body)
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": None})
                call["id"] = call["id"] or delta.id
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == whole
    assert all(c["id"] for c in calls.values()) and reasons[-1] == "tool_calls"


def test_named_call_streams_its_arguments_in_pieces(oai, model):
    stream = oai.chat.completions.create(
        messages=ASK, model=model, stream=True, **GREEDY, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    pieces = [d.function.arguments for c in stream for ch in c.choices for d in ch.delta.tool_calls or ()
              if d.function and d.function.arguments]
    assert len(pieces) > 1
    jsonschema.validate(json.loads("".join(pieces)), WEATHER["function"]["parameters"])


def test_second_turn_answers_from_the_tool_result_and_counts_tools_as_the_worker(client, oai, model):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees Celsius."}]
    # continuous usage: the first chunk carries the gateway's count, the last the worker's.
    stream = oai.chat.completions.create(
        messages=messages, model=model, stream=True, tools=[WEATHER], **GREEDY,
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text.strip() and not any(ch.delta.tool_calls for c in chunks for ch in c.choices)
    assert chunks[0].usage.prompt_tokens == chunks[-1].usage.prompt_tokens
    without_tools = chat(client, messages=messages, max_tokens=1)["usage"]["prompt_tokens"]
    assert chunks[-1].usage.prompt_tokens > without_tools  # the tools are in the prompt


def test_tools_are_counted_against_the_context(client):
    huge = {"type": "function", "function": {"name": "big", "description": "word " * 3000,
                                             "parameters": {"type": "object"}}}
    reply = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [huge], "max_tokens": 8})
    assert reply.status_code == 400 and "tokens" in reply.json()["error"]["message"], reply.text


def test_json_object_and_json_schema_answers_parse_and_validate(client):
    asked = [{"role": "user", "content": "Which city is the capital of France? Reply in JSON."}]
    loose = chat(client, messages=asked, response_format={"type": "json_object"})
    assert isinstance(json.loads(loose["choices"][0]["message"]["content"]), dict)
    schema = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CITY, "strict": True}}
    strict = chat(client, messages=asked, response_format=schema)
    parsed = json.loads(strict["choices"][0]["message"]["content"])
    jsonschema.validate(parsed, CITY)
    assert strict["choices"][0]["finish_reason"] == "stop"
    completion = client.post("/v1/completions", json={"prompt": asked[0]["content"], **GREEDY,
                                                      "response_format": schema}).json()
    jsonschema.validate(json.loads(completion["choices"][0]["text"]), CITY)


def test_job_api_takes_the_same_constraints_and_tools(client):
    choice = client.post("/v1/generate", json={"prompt": "Is Paris in France?", "max_new_tokens": 8,
                                               "temperature": 0, "structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.json()["output"]["text"] in ("yes", "no"), choice.text
    phone = client.post("/v1/generate", json={"prompt": "Make up a phone number.", "max_new_tokens": 12,
                                              "temperature": 0, "structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", phone.json()["output"]["text"]), phone.text
    tool_job = client.post("/v1/generate", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "required",
                                                 "parallel_tool_calls": False, "max_new_tokens": 60,
                                                 "temperature": 0}).json()
    assert tool_job["output"]["finish_reason"] == "tool_calls", tool_job
    assert tool_job["output"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_logit_bias_and_penalties_change_the_output_as_they_should(client):
    base = {"messages": [{"role": "user", "content": "Say hello hello hello hello hello."}], "temperature": 0,
            "max_tokens": 12}
    plain = chat(client, **base)["choices"][0]["message"]["content"]
    tokens = client.post("/tokenize", json={"prompt": "!", "add_special_tokens": False}).json()["tokens"]
    forced = chat(client, **base, logit_bias={str(tokens[0]): 100})["choices"][0]["message"]["content"]
    assert forced == "!" * 12, forced
    banned_first = client.post("/tokenize", json={"prompt": plain, "add_special_tokens": False}).json()["tokens"][0]
    other = chat(client, **base, logit_bias={str(banned_first): -100})["choices"][0]["message"]["content"]
    assert other != plain
    repeat = {"messages": [{"role": "user", "content": "Write the word hello 20 times, separated by spaces."}],
              "temperature": 0, "max_tokens": 40}
    unpenalized = chat(client, **repeat)["choices"][0]["message"]["content"]
    penalized = chat(client, **repeat, frequency_penalty=2.0)["choices"][0]["message"]["content"]
    assert penalized.lower().count("hello") < unpenalized.lower().count("hello"), (unpenalized, penalized)
    present = chat(client, **repeat, presence_penalty=2.0)["choices"][0]["message"]["content"]
    assert present != unpenalized


def test_n_choices_sample_apart_reproducibly_and_stream_by_index(client, oai, model):
    # n = 3 on a worker of MAX_BATCH 2: the third choice starts once a slot frees.
    body = {"messages": [{"role": "user", "content": "Write a short poem about the sea."}], "n": 3,
            "temperature": 1.0, "seed": 7, "max_tokens": 16}
    answer = chat(client, **body)
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    texts = [c["message"]["content"] for c in choices]
    assert len(set(texts)) > 1 and all(texts)
    assert all(c["finish_reason"] in ("stop", "length") for c in choices)
    assert chat(client, **body)["choices"] == choices  # seed, seed + 1, seed + 2
    job = client.get(f"/v1/jobs/{answer['id'].removeprefix('chatcmpl-')}").json()
    assert sum(c["completion_tokens"] for c in job["output"]["choices"]) == answer["usage"]["completion_tokens"]
    streamed: dict[int, str] = {}
    finished = {}
    for chunk in oai.chat.completions.create(model=model, stream=True, **body):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(3)] == texts
    assert finished == {i: c["finish_reason"] for i, c in enumerate(choices)}
    generated = client.post("/v1/generate", json={"prompt": "Name a colour.", "n": 2, "temperature": 1.0, "seed": 3,
                                                  "max_new_tokens": 8}).json()
    assert [c["index"] for c in generated["output"]["choices"]] == [0, 1]
    assert generated["output"]["text"] == generated["output"]["choices"][0]["text"]


def test_batch_api_lines_take_the_same_options(stack):
    sdk = OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    bodies = {
        "schema": {"messages": [{"role": "user", "content": "Which city is the capital of France? Reply in JSON."}],
                   "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}},
        "tool": {"messages": ASK, "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False},
        "two": {"messages": ASK, "n": 2, "temperature": 1.0, "seed": 5, "logit_bias": {"0": -100}},
    }
    lines = "\n".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                  "body": {**GREEDY, **body}}) for cid, body in bodies.items())
    uploaded = sdk.files.create(file=("options.jsonl", lines.encode()), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait_until(lambda b: b.status in ("completed", "failed", "cancelled", "expired"), 120, "the batch",
                       observe=lambda: sdk.batches.retrieve(batch.id), interval_s=0.5)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    answers = {line["custom_id"]: line["response"]["body"]
               for line in map(json.loads, sdk.files.content(batch.output_file_id).text.splitlines())}
    jsonschema.validate(json.loads(answers["schema"]["choices"][0]["message"]["content"]), CITY)
    assert calls_of(answers["tool"])[0][0] == "get_weather"
    assert [c["index"] for c in answers["two"]["choices"]] == [0, 1]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format.json_schema.schema"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
         "tools.0.function.parameters"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "1"}]}, "messages.1"),
        ({"n": 99}, "n"),  # over MAX_N
    ],
)
def test_bad_tools_and_constraints_are_refused_and_nothing_is_queued(client, body, param):
    before = client.get("/v1/jobs", params={"limit": 1}).json()["data"]
    reply = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.json()
    assert client.get("/v1/jobs", params={"limit": 1}).json()["data"] == before
