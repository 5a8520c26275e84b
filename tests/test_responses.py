"""OpenAI's Responses API through the real stack, driven by the official `openai` SDK: plain, streamed and background
responses, a stream dropped and resumed with `starting_after`, `previous_response_id` across turns, a function tool
round trip, a json_schema text format, input items, cancel and delete; bad input refused with nothing queued; and a
background response that completes across a kill -9 of its worker and a restart of the gateway processes."""

from __future__ import annotations

import json
import signal

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from conftest import running_stack, tool_environment
from helpers import wait_until

CITY = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
GREEDY = {"temperature": 0, "max_output_tokens": 40}
# Long enough to be caught running (the model would stop sooner: the grammar holds it to digits and newlines).
LONG = {"input": "Count from 1 to 500, one number per line.", "temperature": 0, "max_output_tokens": 300,
        "text": {"format": {"type": "json_schema", "name": "count",
                            "schema": {"type": "object", "properties": {"numbers": {
                                "type": "array", "items": {"type": "integer"}, "minItems": 300}}}}}}


@pytest.fixture(scope="module")
def stack(tool_stack):
    return tool_stack


def test_create_plain_then_retrieve(oai, model, client):
    response = oai.responses.create(model=model, input="What is the capital of France?", metadata={"case": "plain"},
                                    user="tester", **GREEDY)
    assert response.status == "completed" and response.object == "response"
    assert response.metadata == {"case": "plain"} and response.user == "tester" and response.max_output_tokens == 40
    assert "Paris" in response.output_text
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 40
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    again = oai.responses.retrieve(response.id)
    assert again.output_text == response.output_text and again.status == "completed"
    # A response is a job: the job API sees it too.
    assert client.get(f"/v1/jobs/{response.id}").json()["output"]["text"] == response.output_text


def test_stream_sends_openais_events_in_order(oai, model):
    events = list(oai.responses.create(model=model, input="What is the capital of France?", stream=True, **GREEDY))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.queued", "response.in_progress",
                         "response.output_item.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == events[-1].response.output_text and "Paris" in text


def test_background_response_is_retrieved_until_done_and_another_cancelled(oai, model):
    queued = oai.responses.create(model=model, input="Name three colours.", background=True, **GREEDY)
    assert queued.status in ("queued", "in_progress") and queued.background is True
    done = wait_until(lambda r: r.status in ("completed", "incomplete"), 120, "the background response",
                      observe=lambda: oai.responses.retrieve(queued.id), interval_s=0.2)
    assert done.output_text
    if done.status == "incomplete":  # cut by max_output_tokens
        assert done.incomplete_details.reason == "max_output_tokens" and done.usage.output_tokens == 40
    long = oai.responses.create(model=model, background=True, **LONG)
    wait_until(lambda r: r.status == "in_progress", 60, "the long response to run",
               observe=lambda: oai.responses.retrieve(long.id), interval_s=0.1)
    cancelled = oai.responses.cancel(long.id)
    assert cancelled.status == "cancelled", cancelled
    assert oai.responses.retrieve(long.id).status == "cancelled"


def test_dropped_stream_resumes_after_its_last_sequence_number(oai, model):
    created = oai.responses.create(model=model, input="Write a sentence about the sea.", background=True,
                                   stream=True, **GREEDY)
    seen = []
    for event in created:
        seen.append(event)
        if len(seen) == 6:
            break  # the connection is dropped here
    created.close()
    response_id = seen[0].response.id
    rest = list(oai.responses.retrieve(response_id, stream=True, starting_after=seen[-1].sequence_number))
    whole = list(oai.responses.retrieve(response_id, stream=True))
    assert [e.sequence_number for e in seen + rest] == list(range(len(whole)))
    assert [e.model_dump() for e in seen + rest][6:] == [e.model_dump() for e in whole][6:]
    assert rest[-1].type in ("response.completed", "response.incomplete")


def test_previous_response_id_carries_the_conversation_across_three_turns(oai, model, client):
    turns = ["My name is Ada. Say hello to me.", "What is 2 + 2?", "What is my name?"]
    first = oai.responses.create(model=model, input=turns[0], instructions="Be brief.", **GREEDY)
    second = oai.responses.create(model=model, input=turns[1], previous_response_id=first.id, **GREEDY)
    third = oai.responses.create(model=model, input=turns[2], previous_response_id=second.id, **GREEDY)
    assert third.previous_response_id == second.id and third.status in ("completed", "incomplete")
    # The third prompt is exactly the conversation so far: every turn and answer, and not the first turn's
    # instructions (OpenAI does not carry them), as /tokenize counts it through the same template.
    conversation = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": turns[1]}, {"role": "assistant", "content": second.output_text},
                    {"role": "user", "content": turns[2]}]
    assert third.usage.input_tokens == client.post("/tokenize", json={"messages": conversation}).json()["count"]
    assert first.usage.input_tokens < second.usage.input_tokens < third.usage.input_tokens


def test_function_tool_round_trip(oai, model):
    call_turn = oai.responses.create(model=model, input="What is the weather like in Paris?", tools=[WEATHER],
                                     tool_choice="required", parallel_tool_calls=False, **GREEDY)
    calls = [item for item in call_turn.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["get_weather"], call_turn.output
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    answer = oai.responses.create(
        model=model, previous_response_id=call_turn.id, tools=[WEATHER], **GREEDY,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 24 C."}])
    assert answer.status == "completed" and answer.output_text
    assert not [item for item in answer.output if item.type == "function_call"]


def test_streamed_function_call_arguments_add_up(oai, model):
    events = list(oai.responses.create(model=model, input="What is the weather like in Paris?", tools=[WEATHER],
                                       tool_choice={"type": "function", "name": "get_weather"}, stream=True,
                                       **GREEDY))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == deltas
    jsonschema.validate(json.loads(deltas), WEATHER["parameters"])
    final = events[-1].response
    assert final.output[-1].type == "function_call" and final.output[-1].arguments == deltas


def test_json_schema_text_format(oai, model):
    response = oai.responses.create(model=model, input="Which city is the capital of France? Reply in JSON.",
                                    text={"format": {"type": "json_schema", "name": "capital", "schema": CITY,
                                                     "strict": True}}, **GREEDY)
    jsonschema.validate(json.loads(response.output_text), CITY)
    assert response.text.format.type == "json_schema"


def test_input_items_are_listed_and_paged_and_a_deleted_response_is_gone(oai, model):
    items = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a fruit."}]
    response = oai.responses.create(model=model, input=items, **GREEDY)
    listed = oai.responses.input_items.list(response.id, order="asc")
    assert [item.role for item in listed.data] == ["system", "user", "assistant", "user"]
    page = oai.responses.input_items.list(response.id, limit=2)  # newest first, as OpenAI lists them
    assert [item.role for item in page.data] == ["user", "assistant"] and page.has_more
    rest = oai.responses.input_items.list(response.id, limit=2, after=page.data[-1].id)
    assert [item.role for item in rest.data] == ["user", "system"] and not rest.has_more
    deleted = oai.responses.delete(response.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model=model, input="Again?", previous_response_id=response.id)


def test_flex_service_tier_runs_at_batch_priority(oai, model, client):
    response = oai.responses.create(model=model, input="Hi!", service_tier="flex", background=True, **GREEDY)
    assert client.get(f"/v1/jobs/{response.id}").json()["priority"] == "batch"
    assert response.service_tier == "flex"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"previous_response_id": "resp_0123456789abcdef0123456789abcdef"}, 404, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
        ({"reasoning": {"effort": "high"}}, 400, "reasoning"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
         "input.0.content.0"),
        ({"include": ["reasoning.encrypted_content"]}, 400, "include"),
        ({"background": True, "store": False}, 400, "background"),
        ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "1"}]}, 400, "input"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, 400,
         "text.format.schema"),
        ({"tool_choice": {"type": "function", "name": "missing"}, "tools": [WEATHER]}, 400, "tool_choice"),
        ({"webhook": "https://example.invalid/hook"}, 400, "webhook"),  # this stack has no WEBHOOK_SECRET
        ({"truncation": "auto"}, 400, "truncation"),
    ],
)
def test_bad_requests_are_refused_naming_the_param_and_nothing_is_queued(client, body, status, param):
    before = client.get("/v1/jobs", params={"limit": 1}).json()["data"]
    reply = client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 4, **body})
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param, reply.json()
    assert client.get("/v1/jobs", params={"limit": 1}).json()["data"] == before


# ---- durability: a stack of its own, with keys --------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_stack():
    with running_stack("llamaq-responses-", tool_environment(API_KEYS="key-a,key-b", JOB_RETRIES="1"),
                       redis_aof=True) as running:
        yield running


def test_background_response_survives_a_killed_worker_and_restarted_gateways(keyed_stack):
    oai = OpenAI(base_url=keyed_stack.url + "/v1", api_key="key-a", max_retries=2, timeout=180)
    other = httpx.Client(base_url=keyed_stack.url, headers={"Authorization": "Bearer key-b"}, timeout=60)
    model = oai.models.list().data[0].id
    response = oai.responses.create(model=model, input="Write two sentences about the sea.", background=True,
                                    temperature=0, max_output_tokens=60)
    # Another key sees nothing of it, and cannot continue it.
    assert other.get(f"/v1/responses/{response.id}").status_code == 404
    refused = other.post("/v1/responses", json={"input": "Hi", "previous_response_id": response.id})
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "previous_response_id"
    wait_until(lambda r: r.status == "in_progress", 60, "the response to run",
               observe=lambda: oai.responses.retrieve(response.id), interval_s=0.05)
    keyed_stack.stop_process("worker", signal.SIGKILL)
    keyed_stack.stop_process("gateway", signal.SIGTERM)
    keyed_stack.start_gateway()
    keyed_stack.start_worker()
    done = wait_until(lambda r: r.status in ("completed", "incomplete"), 180, "the response after the faults",
                      observe=lambda: oai.responses.retrieve(response.id), interval_s=0.5)
    assert done.output_text and done.usage.output_tokens > 0
    # Answered once: the replayed stream ends in one completion, and the answer is the one that completed.
    events = list(oai.responses.retrieve(response.id, stream=True))
    endings = [e.type for e in events if e.type in ("response.completed", "response.incomplete")]
    assert endings == [f"response.{done.status}"]
    assert events[-1].response.output_text == done.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
