"""Structured outputs on the way in: OpenAI's `response_format` (`text`, `json_object`, `json_schema` with its
`schema` and `strict`) and vLLM's own `structured_outputs` field, as the job's one constraint."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidParameter
from .requests import _OpenAIRequest


def _refuse(param: str, message: str) -> InvalidParameter:
    return InvalidParameter(f"{param}: {message}", param=param)


def structured_fields(req: _OpenAIRequest) -> dict[str, Any]:
    """The job's `structured_outputs` from the request, or nothing."""
    response_format = req.response_format
    if response_format is not None and req.structured_outputs is not None and response_format.get("type") != "text":
        raise _refuse("structured_outputs", "give response_format or structured_outputs, not both")
    if req.structured_outputs is not None:
        return {"structured_outputs": req.structured_outputs}
    if response_format is None:
        return {}
    kind = response_format.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"structured_outputs": {"json_object": True}}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _refuse("response_format.json_schema", "must be an object with a name and a schema")
        schema = spec.get("schema")
        if schema is None:
            schema = {"type": "object"}  # OpenAI lets it be left out: any object
        # `strict` changes nothing here: a grammar always holds the output to the schema.
        return {"structured_outputs": {"json": schema}}
    raise _refuse("response_format.type", f"{kind!r} is not one of text, json_object, json_schema")
