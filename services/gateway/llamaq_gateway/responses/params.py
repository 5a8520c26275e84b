"""A Responses request as the job's GenerationParams: its `input` items (messages, `function_call` and
`function_call_output` items) as a conversation after the previous response's, `instructions` as the system turn,
function tools, `tool_choice` and `text.format` as the chat routes take them. What llamaq cannot honour (built-in
tools, reasoning options, images and files, ...) is a 400 naming the `param`."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError

from llamaq_protocol import GenerationParams, Priority

from ..errors import InvalidParameter
from ..jobs import check_max_new_tokens
from ..openai.params import named_param
from .requests import ResponsesRequest

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
TEXT_PARTS = ("input_text", "output_text", "text")


def _refuse(param: str, message: str) -> InvalidParameter:
    return InvalidParameter(f"{param}: {message}", param=param)


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as items, each with an id (what `GET /v1/responses/{id}/input_items` lists)."""
    if isinstance(req.input, str):
        return [{"id": item_id("msg"), "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": req.input}]}]
    items = []
    for i, raw in enumerate(req.input):
        where = f"input.{i}"
        kind = raw.get("type", "message" if "role" in raw else None)
        if kind == "message":
            items.append(_message_item(raw, where))
        elif kind == "function_call":
            for field in ("call_id", "name", "arguments"):
                if not isinstance(raw.get(field), str) or not raw[field]:
                    raise _refuse(f"{where}.{field}", "is required (a string)")
            items.append({"id": raw.get("id") or item_id("fc"), "type": "function_call", "status": "completed",
                          "call_id": raw["call_id"], "name": raw["name"], "arguments": raw["arguments"]})
        elif kind == "function_call_output":
            if not isinstance(raw.get("call_id"), str) or not raw["call_id"]:
                raise _refuse(f"{where}.call_id", "is required (a string)")
            items.append({"id": raw.get("id") or item_id("fco"), "type": "function_call_output",
                          "status": "completed", "call_id": raw["call_id"],
                          "output": _text(raw.get("output"), f"{where}.output")})
        else:
            raise _refuse(f"{where}.type", f"{kind!r} items are not supported; llamaq takes message, function_call "
                                           "and function_call_output items")
    return items


def _message_item(raw: dict[str, Any], where: str) -> dict[str, Any]:
    role = raw.get("role")
    if role not in ROLES:
        raise _refuse(f"{where}.role", f"{role!r} is not one of user, system, developer, assistant")
    content = raw.get("content")
    if isinstance(content, str):
        parts = [{"type": "output_text" if role == "assistant" else "input_text", "text": content}]
    elif isinstance(content, list) and content:
        parts = []
        for j, part in enumerate(content):
            if (not isinstance(part, dict) or part.get("type") not in TEXT_PARTS
                    or not isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _refuse(f"{where}.content.{j}", f"{kind!r} parts are not supported; only text")
            parts.append({"type": part["type"], "text": part["text"]})
    else:
        raise _refuse(f"{where}.content", "must be text or a non-empty list of text parts")
    return {"id": raw.get("id") or item_id("msg"), "type": "message", "role": role,
            "status": "completed", "content": parts}


def _text(value: Any, param: str) -> str:
    """A function_call_output's output: text, or a list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "\n".join(p["text"] for p in value)
    raise _refuse(param, "must be text or a list of text parts")


def messages_of(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as the job's chat messages: consecutive function calls become one assistant turn's tool_calls,
    each output a tool turn."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "message":
            messages.append({"role": ROLES[item["role"]],
                             "content": "\n".join(part["text"] for part in item["content"])})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def _tools(req: ResponsesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if req.tools:
        tools = []
        for i, tool in enumerate(req.tools):
            if tool.get("type") != "function":
                raise _refuse(f"tools.{i}.type", f"{tool.get('type')!r} tools are not offered here; only function "
                                                 "tools (built-in tools such as web search need OpenAI's servers)")
            function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
            tools.append({"type": "function", "function": function})
        fields["tools"] = tools
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _refuse("tool_choice", "takes none, auto, required or {\"type\": \"function\", \"name\": ...}")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        fields["tool_choice"] = choice
    if req.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = req.parallel_tool_calls
    return fields


def _text_format(req: ResponsesRequest) -> dict[str, Any]:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.get("type") == "text":
        return {}
    if fmt.get("type") == "json_object":
        return {"structured_outputs": {"json_object": True}}
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema", {}), dict):
            raise _refuse("text.format", "a json_schema format needs a name and a schema object")
        return {"structured_outputs": {"json": fmt.get("schema") or {"type": "object"}}}
    raise _refuse("text.format.type", f"{fmt.get('type')!r} is not one of text, json_object, json_schema")


def _check_supported(req: ResponsesRequest) -> None:
    if req.reasoning and any(value is not None for value in req.reasoning.values()):
        raise _refuse("reasoning", "the served model does not reason; leave reasoning out")
    for name in ("prompt", "conversation"):
        if getattr(req, name) is not None:
            raise _refuse(name, "is not supported: send the input itself (previous_response_id carries a conversation)")
    if req.include:
        raise _refuse("include", f"{req.include[0]!r} does not apply here (no reasoning, images, files or search)")
    if req.truncation == "auto":
        raise _refuse("truncation", "only 'disabled': an input too long for the context is refused, never cut")
    if req.max_tool_calls is not None:
        raise _refuse("max_tool_calls", "is not supported")
    if req.top_logprobs:
        raise _refuse("top_logprobs", "is not supported on /v1/responses; /v1/chat/completions has logprobs")
    if req.background and req.store is False:
        raise _refuse("background", "a background response is stored: it needs store true")


def to_params(req: ResponsesRequest, history: list[dict[str, Any]], items: list[dict[str, Any]],
              max_new_tokens_limit: int) -> tuple[GenerationParams, Priority]:
    """The job's parameters (the conversation: instructions, the previous responses' turns, this input) and its
    priority (`service_tier: flex` runs at batch priority)."""
    _check_supported(req)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + history + \
        messages_of(items)
    fields: dict[str, Any] = {"messages": messages, **_tools(req), **_text_format(req)}
    if req.max_output_tokens is not None:
        check_max_new_tokens(req.max_output_tokens, max_new_tokens_limit, "max_output_tokens", InvalidParameter)
        fields["max_new_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "seed"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    try:
        params = GenerationParams.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first.get("msg", "")).removeprefix("Value error, ")
        param = ".".join(str(p) for p in first.get("loc", ())) or named_param(message)
        if param and param.startswith("messages"):  # the conversation is this input after the earlier turns
            param = "input"
        raise InvalidParameter(f"{param or 'body'}: {message}", param=param) from exc
    return params, Priority.batch if req.service_tier == "flex" else Priority.interactive
