"""The OpenAI-compatible API translated to and from llamaq jobs: same queue, same parameters, same limits.

`/v1/chat/completions` maps `messages` onto the job's messages; `/v1/completions` maps `prompt` onto a single
user message, since the worker always renders the model's chat template (no raw-text continuation).
Options llamaq does not offer (n > 1, tools, logprobs, penalties, ...) are refused with 400 rather than
silently ignored; `user`, `metadata`, `store` and `service_tier` are accepted and ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

import redis.exceptions
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamaq_protocol import FinishReason, GenerationParams, Job, JobStatus, ModelCard
from llamaq_protocol.models import MAX_STOP_SEQUENCES, StopText
from llamaq_protocol.records import EVENT_DONE, EVENT_STATUS, EVENT_TOKEN

from . import streams
from .errors import InvalidParameter, JobFailed, JobNotFound, ModelNotFound, WaitTimeout, error_body
from .jobs import JobService, check_max_new_tokens

if TYPE_CHECKING:
    from .settings import GatewaySettings

logger = logging.getLogger(__name__)

Kind = Literal["chat", "text"]
CHAT: Kind = "chat"
TEXT: Kind = "text"
OWNED_BY = "llamaq"
DONE = "data: [DONE]\n\n"
# OpenAI's `developer` role is its newer name for `system`.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---- requests ------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False


class _OpenAIRequest(BaseModel):
    """Fields both endpoints share. Unknown fields are refused (422), as everywhere in the API."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    # Refused unless neutral (0 / empty).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Accepted and ignored.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # accepted and ignored
    refusal: str | None = None
    # Tool calling is not offered; present only to be refused with a clear message.
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


# ---- translation ---------------------------------------------------------------------------------------------


def _refuse(param: str, message: str) -> InvalidParameter:
    return InvalidParameter(f"{param}: {message}", param=param)


def _check_supported(req: _OpenAIRequest) -> None:
    """400 for every option llamaq would otherwise have to ignore silently."""
    if req.n not in (None, 1):
        raise _refuse("n", "only n=1 is supported (one choice per request)")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0):
            raise _refuse(name, "is not supported; leave it out or set 0 (repetition_penalty is on /v1/jobs)")
    if req.logit_bias:
        raise _refuse("logit_bias", "is not supported")
    if isinstance(req, ChatCompletionRequest):
        if req.tools or req.functions:
            raise _refuse("tools" if req.tools else "functions", "tool and function calling are not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(req, name) not in (None, "none"):
                raise _refuse(name, "tool and function calling are not supported")
        if req.logprobs:
            raise _refuse("logprobs", "log probabilities are not supported")
        if req.top_logprobs not in (None, 0):
            raise _refuse("top_logprobs", "log probabilities are not supported")
        if req.response_format is not None and req.response_format.get("type") != "text":
            raise _refuse("response_format", "only {'type': 'text'} is supported")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None:
            raise _refuse("logprobs", "log probabilities are not supported")
        if req.echo:
            raise _refuse("echo", "is not supported")
        if req.best_of not in (None, 1):
            raise _refuse("best_of", "only best_of=1 is supported")
        if req.suffix:
            raise _refuse("suffix", "is not supported")


def _text_content(content: str | list[dict[str, Any]] | None, where: str) -> str:
    """A message's text: a string, or text parts joined with newlines (as vLLM does)."""
    if isinstance(content, str):
        return content
    if content is None:
        raise _refuse(f"{where}.content", "is required (tool calls are not supported)")
    if not content:
        raise _refuse(f"{where}.content", "must not be an empty list")
    texts = []
    for i, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _refuse(f"{where}.content.{i}", "only text parts ({'type': 'text', 'text': ...}) are supported")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    messages = []
    for i, message in enumerate(req.messages):
        where = f"messages.{i}"
        role = ROLES.get(message.role)
        if role is None:
            raise _refuse(f"{where}.role", f"{message.role!r} is not supported; use system, user or assistant")
        if message.tool_calls or message.tool_call_id or message.function_call:
            raise _refuse(f"{where}.tool_calls", "tool and function calling are not supported")
        messages.append({"role": role, "content": _text_content(message.content, where)})
    return messages


def _prompt(req: CompletionRequest) -> str:
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, str) for p in prompt):
        raise _refuse("prompt", "only one prompt per request is supported")
    raise _refuse("prompt", "must be a string; token-id prompts are not supported")


def to_params(req: ChatCompletionRequest | CompletionRequest, max_new_tokens_limit: int) -> GenerationParams:
    """The job's parameters, or InvalidParameter (400, OpenAI's invalid_request_error) naming the field."""
    _check_supported(req)
    if isinstance(req, ChatCompletionRequest):
        messages = _messages(req)
        limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_new_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    else:
        messages = [{"role": "user", "content": _prompt(req)}]
        limit_param, max_new_tokens = "max_tokens", req.max_tokens
    fields: dict[str, Any] = {"messages": messages}
    if max_new_tokens is not None:
        check_max_new_tokens(max_new_tokens, max_new_tokens_limit, limit_param, InvalidParameter)
        fields["max_new_tokens"] = max_new_tokens
    for name in ("temperature", "top_p", "stop", "seed"):
        value = getattr(req, name)
        if value is not None:
            fields[name] = value
    try:
        return GenerationParams.model_validate(fields)
    except ValidationError as exc:  # the request models mirror these rules; this is the backstop
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise InvalidParameter(f"{param or 'body'}: {first.get('msg')}", param=param) from exc


def check_model(requested: str | None, card: ModelCard) -> None:
    """`model` may be left out; when given it must name the served model."""
    if requested and requested != card.name:
        raise ModelNotFound(
            f"The model {requested!r} does not exist here; this server serves {card.name!r} (GET /v1/models)",
            param="model",
        )


# ---- responses -----------------------------------------------------------------------------------------------


def model_object(card: ModelCard) -> dict[str, Any]:
    return {
        "id": card.name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": OWNED_BY,
        "max_model_len": card.context_length,
    }


def models_list(card: ModelCard) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(card)]}


def completion_id(kind: Kind, job_id: str) -> str:
    """The job id is recoverable: `GET /v1/jobs/{id}` and its events work for an OpenAI request too."""
    return f"chatcmpl-{job_id}" if kind == CHAT else f"cmpl-{job_id}"


def finish_reason(job: Job) -> str:
    """OpenAI knows stop and length; a canceled job ends as `stop` with the text it had."""
    reason = job.output.finish_reason if job.output else None
    return "length" if reason is FinishReason.length else "stop"


def usage(job: Job) -> dict[str, int]:
    prompt = job.output.usage.prompt_tokens if job.output else 0
    completion = job.output.usage.completion_tokens if job.output else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _created(job: Job) -> int:
    return int(job.created_at.timestamp())


def completion(kind: Kind, job: Job, model: str) -> dict[str, Any]:
    """The `chat.completion` / `text_completion` object of a terminal job."""
    text = job.output.text if job.output else ""
    if kind == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
    choice["finish_reason"] = finish_reason(job)
    return {
        "id": completion_id(kind, job.id),
        "object": "chat.completion" if kind == CHAT else "text_completion",
        "created": _created(job),
        "model": model,
        "choices": [choice],
        "usage": usage(job),
    }


class ChunkBuilder:
    """The `chat.completion.chunk` / `text_completion` chunks of one streamed job."""

    def __init__(self, kind: Kind, job: Job, model: str, include_usage: bool):
        self.kind = kind
        self.include_usage = include_usage
        self.base = {
            "id": completion_id(kind, job.id),
            "object": "chat.completion.chunk" if kind == CHAT else "text_completion",
            "created": _created(job),
            "model": model,
        }

    def _chunk(self, choices: list[dict[str, Any]], usage_: dict[str, int] | None = None) -> str:
        chunk = {**self.base, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage_  # null on every chunk but the last, as OpenAI does
        return streams.sse_data(chunk)

    def _choice(self, text: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.kind == CHAT:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

    def opening(self) -> str | None:
        return self._chunk([self._choice(None, None, role=True)]) if self.kind == CHAT else None

    def text(self, text: str) -> str:
        return self._chunk([self._choice(text, None)])

    def closing(self, job: Job) -> list[str]:
        pieces = [self._chunk([self._choice(None, finish_reason(job))])]
        if self.include_usage:
            pieces.append(self._chunk([], usage(job)))
        return pieces


def _stream_error(status_code: int, error_type: str, message: str) -> str:
    return streams.sse_data(error_body(status_code, error_type, message, openai=True))


async def stream_completion(
    kind: Kind,
    jobs: JobService,
    job: Job,
    owner: str,
    model: str,
    include_usage: bool,
    heartbeat_s: float = streams.HEARTBEAT_S,
) -> AsyncIterator[str]:
    """OpenAI's streaming format from the job's event stream; a client going away leaves the job running."""
    chunks = ChunkBuilder(kind, job, model, include_usage)
    opening = chunks.opening()
    if opening:
        yield opening
    sent_text = False
    try:
        async for entry in streams.read_events(jobs.aio, job.id, heartbeat_s=heartbeat_s):
            if entry is None:
                yield streams.PING
            elif entry.event == EVENT_TOKEN:
                text = entry.payload().get("text", "")
                if text:
                    sent_text = True
                    yield chunks.text(text)
            elif entry.event == EVENT_STATUS and entry.payload().get("requeued"):
                # Its worker was lost and the job starts over. Text already sent cannot be taken back.
                if sent_text:
                    yield _stream_error(
                        503, "worker_lost",
                        f"the worker running job {job.id} was lost mid-answer; the job was queued again and "
                        f"GET /v1/jobs/{job.id} will have its result",
                    )
                    yield DONE
                    return
            elif entry.event == EVENT_DONE:
                final = await jobs.get(job.id, owner)
                if final.status is JobStatus.failed:
                    failed = JobFailed.of(final)
                    yield _stream_error(failed.status_code, failed.error_type, failed.message)
                else:
                    for piece in chunks.closing(final):
                        yield piece
                yield DONE
                return
    except (redis.exceptions.RedisError, JobNotFound) as exc:
        logger.warning("completion stream of job %s ended early: %s", job.id, exc)
        yield _stream_error(503, "unavailable", f"lost the event stream of job {job.id}; GET /v1/jobs/{job.id}")
        yield DONE
        return
    yield _stream_error(500, "internal_error", f"the event stream of job {job.id} ended without its result")
    yield DONE


async def respond(
    kind: Kind,
    req: ChatCompletionRequest | CompletionRequest,
    jobs: JobService,
    owner: str,
    request_id: str | None,
    settings: GatewaySettings,
) -> Response:
    """Submit through the queue; then stream the job, or wait for it and answer the completion object."""
    params = to_params(req, settings.max_new_tokens_limit)
    card = await jobs.served_model()
    check_model(req.model, card)
    if req.stream:
        job = await jobs.submit(params, owner, request_id, card=card)
        return streams.sse_response(stream_completion(kind, jobs, job, owner, card.name, req.include_usage()))
    job = await jobs.submit_and_wait(params, owner, request_id, settings.max_generate_wait_s, card=card)
    if job.status is JobStatus.failed:
        raise JobFailed.of(job)
    if not job.status.is_terminal():
        raise WaitTimeout(
            f"job {job.id} is still {job.status.value} after {settings.max_generate_wait_s:g} s; it runs on and "
            f"GET /v1/jobs/{job.id} returns its result (use stream: true for long generations)"
        )
    return JSONResponse(completion(kind, job, card.name))
