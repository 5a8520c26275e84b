"""Tool calls read from a job's text (tool_calls.py) with vLLM's real llama3_json parser and the small model's
tokenizer: what streams out (content and OpenAI call deltas) adds up to the final calls, in every tool_choice mode."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llamaq_protocol import GenerationParams
from llamaq_worker.tool_calls import ToolCallStream, forced_tool_schema, load_tool_parser

MODEL = os.environ.get("LLAMAQ_TEST_MODEL", "/tmp/smol")
# Tiers (the root conftest.py): the small model's tokenizer.
pytestmark = pytest.mark.model
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tokenizer():
    if not Path(MODEL).is_dir():
        pytest.skip(f"test model not found at {MODEL}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def parser(tokenizer):
    parser_cls = load_tool_parser("llama3_json", tokenizer)
    assert parser_cls is not None  # SmolLM2 has no <|python_tag|>; the parser still loads
    return parser_cls


def params(tool_choice=None, **kw) -> GenerationParams:
    return GenerationParams(prompt="What is the weather in Paris?", tools=[WEATHER, TIME], tool_choice=tool_choice,
                            **kw)


def run(stream: ToolCallStream, pieces: list[str]) -> tuple[str, list[dict]]:
    """Feed the pieces as steps; the content sent and the calls rebuilt from the deltas, as a client would."""
    content, calls = "", {}
    for i, piece in enumerate(pieces):
        text, deltas = stream.feed(piece, final=i == len(pieces) - 1)
        content += text
        for delta in deltas:
            call = calls.setdefault(delta["index"], {"id": None, "name": "", "arguments": ""})
            if "id" in delta:
                assert call["id"] is None, "a call's id is sent once"
                call["id"] = delta["id"]
            function = delta.get("function", {})
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)]


def chunks(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_auto_streams_a_json_call_in_pieces_that_add_up(parser, tokenizer):
    stream = ToolCallStream(params(), parser, tokenizer)
    content, calls = run(stream, chunks('{"name": "get_weather", "parameters": {"city": "Paris"}}'))
    assert content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert stream.calls == [{"id": calls[0]["id"], "type": "function",
                             "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]


def test_auto_plain_text_is_content_and_no_call(parser, tokenizer):
    stream = ToolCallStream(params(), parser, tokenizer)
    content, calls = run(stream, chunks("It is sunny in Paris today."))
    assert content == "It is sunny in Paris today." and calls == [] and stream.calls == []


def test_auto_text_that_looks_like_json_but_is_none_comes_out_as_content(parser, tokenizer):
    stream = ToolCallStream(params(), parser, tokenizer)
    content, calls = run(stream, chunks('{"answer": 4'))
    assert calls == [] and stream.calls == []
    assert content == '{"answer": 4'


def test_required_streams_each_call_of_the_grammar_list_as_it_is_written(parser, tokenizer):
    stream = ToolCallStream(params("required"), parser, tokenizer)
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    _, early = stream.feed(text[:text.index("Pa") + 2], final=False)  # a name, and the start of its arguments
    assert early == [{"index": 0, "id": early[0]["id"], "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Pa'}}]
    stream = ToolCallStream(params("required"), parser, tokenizer)
    content, calls = run(stream, chunks(text))
    assert content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                        ("get_time", {})]
    assert len({c["id"] for c in calls}) == 2


def test_required_list_cut_short_keeps_its_complete_calls(parser, tokenizer):
    stream = ToolCallStream(params("required"), parser, tokenizer)
    text = '[\n{"name": "get_weather", "parameters": {"city": "Paris"}},\n{"name": "get_weather", "parame'
    content, calls = run(stream, chunks(text))
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert content == ""


def test_named_streams_the_arguments_as_they_come(parser, tokenizer):
    stream = ToolCallStream(params({"type": "function", "function": {"name": "get_weather"}}), parser, tokenizer)
    first_text, first = stream.feed('{"city": ', final=False)
    assert first_text == "" and first[0]["function"] == {"name": "get_weather", "arguments": '{"city": '}
    rest_text, rest = stream.feed('"Paris"}', final=True)
    assert rest_text == "" and rest == [{"index": 0, "function": {"arguments": '"Paris"}'}}]
    assert stream.calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_forced_schemas_are_vllms(parser):
    required = forced_tool_schema(params("required", parallel_tool_calls=False))
    assert required["type"] == "array" and required["minItems"] == 1 and required["maxItems"] == 1
    named = forced_tool_schema(params({"type": "function", "function": {"name": "get_weather"}}))
    assert named == WEATHER["function"]["parameters"]
    assert forced_tool_schema(params("auto")) is None and forced_tool_schema(params("none")) is None


def test_no_parser_no_tool_calling(tokenizer):
    assert load_tool_parser("", tokenizer) is None
    assert load_tool_parser("no_such_parser", tokenizer) is None
    with pytest.raises(ValueError, match="not available"):
        ToolCallStream(params(), None, tokenizer)
