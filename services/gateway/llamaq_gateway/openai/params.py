"""An OpenAI request translated to the job's GenerationParams, or refused with 400 naming the field.

`/v1/chat/completions` maps `messages` onto the job's messages; `/v1/completions` maps a string `prompt` onto a
single user message under the model's chat template, except that a prompt of token ids, or any prompt with
`echo: true`, is continued as raw text (what lm-eval's `local-completions` needs). vLLM's sampling extensions
(top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids, skip_special_tokens,
include_stop_str_in_output) and logprobs are passed to the engine, which honours them; options llamaq does not
offer (best_of, suffix, deprecated function calling) are refused with 400 rather than silently ignored;
`user`, `metadata`, `store` and `service_tier` are accepted and ignored. Tools live in `tools.py`, response formats
in `structured.py`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from llamaq_protocol import GenerationParams, ModelCard

from ..errors import InvalidParameter, ModelNotFound
from ..jobs import check_max_new_tokens
from .requests import ChatCompletionRequest, ChatMessageIn, CompletionRequest, _OpenAIRequest
from .structured import structured_fields
from .tools import message_tool_fields, tool_fields

# OpenAI's `developer` role is its newer name for `system`.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _refuse(param: str, message: str) -> InvalidParameter:
    return InvalidParameter(f"{param}: {message}", param=param)


def _check_supported(req: _OpenAIRequest) -> None:
    """400 for every option llamaq would otherwise have to ignore silently."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise _refuse("top_logprobs", "goes with logprobs: true")
    if isinstance(req, CompletionRequest):
        if req.max_tokens == 0 and not req.echo:
            raise _refuse("max_tokens", "must be at least 1 (0 only with echo: the prompt's logprobs alone)")
        if req.best_of not in (None, 1):
            raise _refuse("best_of", "only best_of=1 is supported")
        if req.suffix:
            raise _refuse("suffix", "is not supported")


def _text_content(content: str | list[dict[str, Any]] | None, where: str) -> str | None:
    """A message's text: a string, or text parts joined with newlines (as vLLM does); None stays None (an
    assistant turn that only made tool calls)."""
    if content is None or isinstance(content, str):
        return content
    if not content:
        raise _refuse(f"{where}.content", "must not be an empty list")
    texts = []
    for i, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _refuse(f"{where}.content.{i}", "only text parts ({'type': 'text', 'text': ...}) are supported")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(messages_in: list[ChatMessageIn]) -> list[dict[str, Any]]:
    """OpenAI messages as the job takes them; InvalidParameter (400) naming what llamaq cannot take."""
    messages = []
    for i, message in enumerate(messages_in):
        where = f"messages.{i}"
        role = ROLES.get(message.role)
        if role is None:
            raise _refuse(f"{where}.role", f"{message.role!r} is not supported; use system, user, assistant or tool")
        content = _text_content(message.content, where)
        if content is None and not (role == "assistant" and message.tool_calls):
            raise _refuse(f"{where}.content", "is required (only an assistant turn with tool_calls may omit it)")
        messages.append({"role": role, "content": content, **message_tool_fields(message, role, where)})
    return messages


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages from `chat_messages` as the chat template renders them (the job's own rendering)."""
    try:
        return GenerationParams.model_validate({"messages": messages}).chat_messages()
    except ValidationError as exc:
        raise _invalid(exc) from exc


def _prompt(req: CompletionRequest) -> dict[str, Any]:
    """The job's prompt fields: a string prompt as one user turn under the chat template, or, given as token ids
    or with `echo`, continued as raw text (vLLM's /v1/completions)."""
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one (lm-eval sends its prompts so)
    if isinstance(prompt, str):
        if not prompt:
            raise _refuse("prompt", "must not be empty")
        if req.echo:
            return {"prompt": prompt, "raw_prompt": True}
        return {"messages": [{"role": "user", "content": prompt}]}
    if prompt and all(isinstance(p, int) for p in prompt):
        return {"prompt_token_ids": prompt}
    if prompt:
        raise _refuse("prompt", "only one prompt per request is supported")
    raise _refuse("prompt", "must not be empty")


# The sampling fields that pass to the job as they are (vLLM's names are the job's).
_SAMPLING_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "stop", "stop_token_ids", "seed",
                    "ignore_eos", "min_tokens", "skip_special_tokens", "include_stop_str_in_output",
                    "presence_penalty", "frequency_penalty", "n")
DEFAULT_MAX_NEW_TOKENS = GenerationParams.model_fields["max_new_tokens"].default
# The job fields the refusals before queueing name by these routes' own fields.
OPENAI_PARAM_NAMES = {"logprobs": "logprobs", "prompt_logprobs": "logprobs", "prompt_token_ids": "prompt",
                      "structured_outputs": "response_format", "json": "response_format.json_schema.schema"}


def param_names(req: _OpenAIRequest) -> dict[str, str]:
    """The request's own field for each job field a refusal may name (a constraint came from response_format or
    from vLLM's structured_outputs)."""
    if req.structured_outputs is None:
        return OPENAI_PARAM_NAMES
    return {**OPENAI_PARAM_NAMES, "structured_outputs": "structured_outputs", "json": "structured_outputs.json"}


def to_params(req: ChatCompletionRequest | CompletionRequest, max_new_tokens_limit: int) -> GenerationParams:
    """The job's parameters, or InvalidParameter (400, OpenAI's invalid_request_error) naming the field."""
    _check_supported(req)
    if isinstance(req, ChatCompletionRequest):
        messages = chat_messages(req.messages)
        limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_new_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        fields: dict[str, Any] = {"messages": messages, **tool_fields(req)}
        if req.logprobs:
            fields["logprobs"] = req.top_logprobs or 0
    else:
        fields = _prompt(req)
        limit_param, max_new_tokens = "max_tokens", req.max_tokens
        if max_new_tokens == 0:  # echo only: one token is generated (as vLLM does) and left out of the answer
            max_new_tokens = 1
        if req.logprobs is not None:
            fields["logprobs"] = req.logprobs
            if req.echo:
                fields["prompt_logprobs"] = req.logprobs
    if max_new_tokens is not None:
        check_max_new_tokens(max_new_tokens, max_new_tokens_limit, limit_param, InvalidParameter)
        fields["max_new_tokens"] = max_new_tokens
    if req.min_tokens and req.min_tokens > fields.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS):
        raise _refuse("min_tokens", f"must be at most {limit_param}")
    if req.top_k is not None:
        fields["top_k"] = max(req.top_k, 0)
    if req.logit_bias:
        try:
            fields["logit_bias"] = {int(token): bias for token, bias in req.logit_bias.items()}
        except ValueError:
            raise _refuse("logit_bias", "keys must be token ids") from None
    fields.update(structured_fields(req))
    for name in _SAMPLING_FIELDS:
        value = getattr(req, name)
        if value is not None:
            fields[name] = value
    try:
        return GenerationParams.model_validate(fields)
    except ValidationError as exc:  # the job's own rules (tools, tool turns, constraints) and a backstop
        raise _invalid(exc) from exc


def _invalid(exc: ValidationError) -> InvalidParameter:
    first = exc.errors()[0]
    message = str(first.get("msg", "")).removeprefix("Value error, ")
    param = ".".join(str(p) for p in first.get("loc", ())) or named_param(message)
    return InvalidParameter(f"{param or 'body'}: {message}", param=param)


def named_param(message: str) -> str | None:
    """The field a whole-request rule of the job names first ("'tool_choice' names ...", "messages.3: ...")."""
    match = re.match(r"'?([a-z_]+(?:\.\d+)?)'?[: ]", message)
    return match.group(1) if match else None


def check_model(requested: str | None, card: ModelCard) -> None:
    """`model` may be left out; when given it must name the served model."""
    if requested and requested != card.name:
        raise ModelNotFound(
            f"The model {requested!r} does not exist here; this server serves {card.name!r} (GET /v1/models)",
            param="model",
        )
