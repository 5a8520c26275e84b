"""OpenAI's tool calling on the way in: `tools`, `tool_choice`, `parallel_tool_calls`, an assistant turn's
`tool_calls` and a `tool` turn's `tool_call_id`, checked and handed to the job as they are (the job's protocol
models validate their shapes; the worker renders them with the chat template and parses the calls out)."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidParameter
from .requests import ChatCompletionRequest, ChatMessageIn


def _refuse(param: str, message: str) -> InvalidParameter:
    return InvalidParameter(f"{param}: {message}", param=param)


def tool_fields(req: ChatCompletionRequest) -> dict[str, Any]:
    """The job's tool fields of a chat request."""
    if req.functions is not None or req.function_call is not None:
        name = "functions" if req.functions is not None else "function_call"
        raise _refuse(name, "OpenAI's deprecated function calling is not supported; use tools and tool_choice")
    fields: dict[str, Any] = {}
    for i, tool in enumerate(req.tools or ()):
        if tool.get("type", "function") != "function":
            raise _refuse(f"tools.{i}.type", f"{tool.get('type')!r} tools are not supported; only functions")
    # The job's own rules (a tool_choice naming a given tool, distinct names, ...) judge the rest.
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    return fields


def message_tool_fields(message: ChatMessageIn, role: str, where: str) -> dict[str, Any]:
    """An assistant turn's calls or a tool turn's call id, as the job's message carries them."""
    if message.function_call is not None:
        raise _refuse(f"{where}.function_call", "deprecated function calling is not supported; use tool_calls")
    fields: dict[str, Any] = {}
    if message.tool_calls:
        if role != "assistant":
            raise _refuse(f"{where}.tool_calls", "only assistant messages carry tool_calls")
        fields["tool_calls"] = message.tool_calls
    if role == "tool":
        if not message.tool_call_id:
            raise _refuse(f"{where}.tool_call_id", "a tool message answers a call: its tool_call_id is required")
        fields["tool_call_id"] = message.tool_call_id
    elif message.tool_call_id is not None:
        raise _refuse(f"{where}.tool_call_id", "only tool messages have one")
    return fields
