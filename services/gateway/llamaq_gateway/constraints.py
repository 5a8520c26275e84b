"""Tools and structured outputs checked before anything is queued: the serving worker must offer them (its model
card says so), and every JSON schema, regular expression and choice list must be one the worker can compile.

The grammar library itself (xgrammar) needs torch, which the gateway never imports, so schemas are checked
against the JSON Schema meta-schema and patterns with Python's `re` (the syntax xgrammar's regexes share); what
slips through (an EBNF grammar is only checked on the worker) fails its job as `invalid_request`, answered 400 by
the routes that wait.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import jsonschema.exceptions

from llamaq_protocol import GenerationParams, ModelCard
from llamaq_protocol.models import CAPABILITY_STRUCTURED_OUTPUTS, CAPABILITY_TOOLS

from .errors import InvalidRequest


def check_constraints(params: GenerationParams, card: ModelCard, names: dict[str, str] | None = None) -> None:
    """InvalidRequest (400) naming the parameter for tools or structured outputs the worker cannot honour; `names`
    maps the job's fields to the request's own (the OpenAI routes': `response_format`)."""
    names = names or {}
    tools_param = names.get("tools", "tools")
    structured_param = names.get("structured_outputs", "structured_outputs")
    if params.tools and params.effective_tool_choice() == "auto" and CAPABILITY_TOOLS not in card.capabilities:
        raise InvalidRequest(f"{tools_param}: the worker serving {card.name} has no tool call parser "
                             "(TOOL_CALL_PARSER); use tool_choice \"required\" or a named function", param=tools_param)
    if (params.structured_outputs or params.forced_tools()) and CAPABILITY_STRUCTURED_OUTPUTS not in card.capabilities:
        param = structured_param if params.structured_outputs else names.get("tool_choice", "tool_choice")
        raise InvalidRequest(f"{param}: the {card.engine or 'serving'} engine of model {card.name} cannot constrain "
                             "its output", param=param)
    for i, tool in enumerate(params.tools or ()):
        if tool.function.parameters is not None:
            _check_schema(tool.function.parameters, f"{tools_param}.{i}.function.parameters")
    if params.structured_outputs is not None:
        kind, value = params.structured_outputs.kind()
        if kind == "json":
            _check_schema(value, names.get("json", f"{structured_param}.json"))
        elif kind == "regex":
            try:
                re.compile(value)
            except re.error as exc:
                param = f"{structured_param}.regex"
                raise InvalidRequest(f"{param}: not a regular expression: {exc}", param=param) from exc


def _check_schema(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param}: a JSON schema must be an object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise InvalidRequest(f"{param}: not a valid JSON schema{f' at {where}' if where else ''}: {exc.message}",
                             param=param) from exc
