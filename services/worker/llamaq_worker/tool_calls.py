"""Tool calls parsed out of a job's text, on the worker, with vLLM's own tool parsers and tool-call schemas.

Parsing lives here rather than in the gateway because it needs the model's tokenizer and vLLM (the gateway has
neither, by design: no torch there), and because the job record then holds the calls, so the job API, the Batch
API and every OpenAI route read the same result. How a call is found depends on `tool_choice`, as in vLLM's server:

- "auto": the model chooses; the configured parser (TOOL_CALL_PARSER, vLLM's `--tool-call-parser`, e.g.
  `llama3_json` for Llama 3.x) reads the text as it streams, and once more whole at the end;
- "required": a grammar (vLLM's JSON schema of a list of `{"name", "parameters"}` objects) makes the model write
  calls, read as that list at the end;
- a named function: a grammar makes the text that function's arguments object, streamed as its arguments.

Each step's text becomes (content, tool call deltas in OpenAI's streaming shape); `calls` holds the final calls.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from functools import cached_property
from typing import Any

from llamaq_protocol import GenerationParams

logger = logging.getLogger(__name__)

AUTO, REQUIRED, NAMED = "auto", "required", "named"
# One call of a "required" list, up to where its arguments begin: `{"name": "<name>", "parameters": `.
_REQUIRED_ITEM = re.compile(r'\{\s*"name"\s*:\s*"([A-Za-z0-9_.-]{1,64})"\s*,\s*"parameters"\s*:\s*')
_DECODER = json.JSONDecoder()


def make_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def load_tool_parser(name: str, tokenizer) -> type | None:
    """vLLM's tool parser class called `name`, checked against this tokenizer; None (with the reason logged) when
    there is none to be had: then the worker does not offer tool calling (the gateway refuses `tools` with 400)."""
    if not name:
        return None
    try:
        from vllm.tool_parsers import ToolParserManager

        parser_cls = ToolParserManager.get_tool_parser(name)
    except Exception as exc:  # vLLM missing, or no parser of that name
        logger.warning("no tool calling: tool parser %r unavailable (%s)", name, exc)
        return None
    marker = getattr(parser_cls, "bot_token", None)
    if marker and marker not in tokenizer.get_vocab():
        # A tokenizer without the parser's marker token (SmolLM2, the tests' model, has no <|python_tag|>): the
        # marker only ever prefixes the calls, which the parser reads from the text alone.
        parser_cls = type(parser_cls.__name__, (parser_cls,), {"vocab": cached_property(
            lambda self: {**self.model_tokenizer.get_vocab(), marker: -1})})
    try:
        parser_cls(tokenizer, [])
    except Exception as exc:
        logger.warning("no tool calling: tool parser %r does not fit this tokenizer (%s)", name, exc)
        return None
    logger.info("tool calling on, parser %s", name)
    return parser_cls


def _vllm_request(params: GenerationParams):
    """The request as vLLM's parsers and schema helpers read it (only tools and tool_choice matter to them)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    choice = params.effective_tool_choice()
    return ChatCompletionRequest.model_validate({
        "model": "llamaq", "messages": [{"role": "user", "content": ""}],
        "tools": params.template_tools(),
        "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
        "parallel_tool_calls": params.parallel_tool_calls,
    })


def forced_tool_schema(params: GenerationParams) -> dict[str, Any] | None:
    """The JSON schema a grammar enforces for a "required" or named tool_choice (vLLM's, from its tool
    definitions); None for "auto" and "none"."""
    if not params.forced_tools():
        return None
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    request = _vllm_request(params)
    schema = get_json_schema_from_tools(request.tool_choice, request.tools, request.parallel_tool_calls)
    return json.loads(schema) if isinstance(schema, str) else schema


class ToolCallStream:
    """One job's tool calls, read from its text as it comes; `feed` gives what to send, `calls` the final calls."""

    def __init__(self, params: GenerationParams, parser_cls: type | None, tokenizer) -> None:
        choice = params.effective_tool_choice()
        self.mode = AUTO if choice == "auto" else REQUIRED if choice == "required" else NAMED
        self.function_name = None if self.mode != NAMED else choice.function.name
        self.text = ""  # everything the model wrote
        self.content = ""  # what went out as content
        self.sent: list[dict[str, Any]] = []  # per call: {"id", "name", "arguments"} sent so far
        self.calls: list[dict[str, Any]] = []
        self._request = None
        self._parser = None
        if self.mode == AUTO:
            if parser_cls is None:
                raise ValueError("tool calling is not available on this worker (no TOOL_CALL_PARSER)")
            self._request = _vllm_request(params)
            self._parser = parser_cls(tokenizer, self._request.tools)

    def feed(self, delta: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """One step's new text: (content to send, tool call deltas to send). With `final`, also the rest: whatever
        the whole text's parse has that the stream has not sent yet."""
        previous, self.text = self.text, self.text + delta
        content, deltas = "", []
        if self.mode == AUTO and delta:
            message = self._parser.extract_tool_calls_streaming(
                previous, self.text, delta, [], [], [], self._request)
            if message is not None:
                content = message.content or ""
                deltas = [self._take_delta(d.model_dump(exclude_none=True)) for d in message.tool_calls]
        elif self.mode == NAMED and delta:
            deltas = [self._take_delta({"index": 0, "function": {"arguments": delta}})]
        elif self.mode == REQUIRED and delta:
            deltas = self._required_deltas()
        self.content += content
        if final:
            more_content, more_deltas = self._finish()
            content += more_content
            deltas += more_deltas
        return content, [d for d in deltas if d]

    def _take_delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        """Record one call delta as sent (a new call gets its id here if the parser gave none) and return it."""
        index = delta["index"]
        function = delta.get("function") or {}
        while len(self.sent) <= index:
            self.sent.append({"id": None, "name": None, "arguments": ""})
        call = self.sent[index]
        if call["id"] is None:
            call["id"] = delta.get("id") or make_call_id()
            call["name"] = function.get("name") or self.function_name
            delta = {"index": index, "id": call["id"], "type": "function",
                     "function": {"name": call["name"], "arguments": function.get("arguments", "")}}
        call["arguments"] += function.get("arguments") or ""
        return delta

    def _finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The final calls from the whole text, and what of them and of the content the stream has not sent."""
        content = ""
        if self.mode == AUTO:
            found = self._parser.extract_tool_calls(self.text, self._request)
            final = [(c.function.name, c.function.arguments) for c in found.tool_calls] if found.tools_called else []
            if not final and not self.sent:
                content = self.text[len(self.content):] if self.text.startswith(self.content) else ""
        elif self.mode == REQUIRED:
            final = self._required_calls()
            if not final:
                content = self.text
        else:
            final = [(self.function_name, self.text)]
        self.content += content
        deltas = []
        for index, (name, arguments) in enumerate(final):
            if index >= len(self.sent):
                deltas.append(self._take_delta({"index": index, "function": {"name": name, "arguments": arguments}}))
            else:
                streamed = self.sent[index]["arguments"]
                if arguments.startswith(streamed) and arguments != streamed:
                    more = arguments[len(streamed):]
                    deltas.append(self._take_delta({"index": index, "function": {"arguments": more}}))
                else:
                    self.sent[index]["arguments"] = arguments if arguments.startswith(streamed) else streamed
        self.calls = [{"id": call["id"], "type": "function",
                       "function": {"name": call["name"], "arguments": call["arguments"]}}
                      for call in self.sent[:len(final)] if call["name"]]
        return content, deltas

    def _required_items(self) -> list[tuple[str, str, bool]]:
        """The calls a "required" grammar has made the model write so far, in its list of {"name", "parameters"}
        objects (vLLM's schema: the name first): each call's name, its arguments' text as written so far, and
        whether that text is complete. Only the last may be incomplete, so a list cut short (max_tokens; a small
        model may repeat calls until then) keeps its complete calls."""
        items = []
        for match in _REQUIRED_ITEM.finditer(self.text):
            start = match.end()
            try:
                _, end = _DECODER.raw_decode(self.text, start)
            except ValueError:
                items.append((match.group(1), self.text[start:], False))  # still being written
                break
            items.append((match.group(1), self.text[start:end], True))
        return items

    def _required_deltas(self) -> list[dict[str, Any]]:
        """The call deltas of the text so far: a call's id and name once its name is written, then its arguments
        as they come (the text of its "parameters" object, which is what the call's arguments are)."""
        deltas = []
        for index, (name, arguments, _) in enumerate(self._required_items()):
            sent = self.sent[index]["arguments"] if index < len(self.sent) else None
            if sent is None:
                deltas.append(self._take_delta({"index": index, "function": {"name": name, "arguments": arguments}}))
            elif len(arguments) > len(sent):
                deltas.append(self._take_delta({"index": index, "function": {"arguments": arguments[len(sent):]}}))
        return deltas

    def _required_calls(self) -> list[tuple[str, str]]:
        return [(name, arguments) for name, arguments, complete in self._required_items() if complete]

    @property
    def called(self) -> bool:
        return bool(self.calls)
