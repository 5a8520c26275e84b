"""The OpenAI-compatible API translated to and from llamaq jobs: same queue, same parameters, same limits.

`/v1/chat/completions` maps `messages` onto the job's messages; `/v1/completions` maps a string `prompt` onto a
single user message under the model's chat template, except that a prompt of token ids, or any prompt with
`echo: true`, is continued as raw text (what lm-eval's `local-completions` needs). vLLM's sampling extensions
(top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids, skip_special_tokens,
include_stop_str_in_output) and logprobs are passed to the engine, which honours them; options llamaq does not
offer (n > 1, tools, penalties, ...) are refused with 400 rather than silently ignored; `user`, `metadata`,
`store` and `service_tier` are accepted and ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import redis.exceptions
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamaq_protocol import FinishReason, GenerationParams, Job, JobStatus, ModelCard
from llamaq_protocol.models import MAX_LOGPROBS, MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS, StopText, TokenId
from llamaq_protocol.records import EVENT_DONE, EVENT_STATUS, EVENT_TOKEN

from . import streams
from .errors import InvalidParameter, JobFailed, JobNotFound, ModelNotFound, WaitTimeout, error_body
from .jobs import JobService, check_capabilities, check_max_new_tokens, check_token_ids

if TYPE_CHECKING:
    from .limits import StreamSlots
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
    continuous_usage_stats: bool | None = False  # vLLM's: usage on every chunk (with include_usage)


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
    # vLLM's sampling extensions, with its meaning and ranges (top_k -1 is "off", as 0).
    top_k: int | None = Field(default=None, ge=-1, le=100_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
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

    def continuous_usage(self) -> bool:
        """Usage on every chunk: vLLM's `continuous_usage_stats`, which goes with `include_usage`."""
        return self.include_usage() and bool(self.stream_options.continuous_usage_stats)


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
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 only with echo (the prompt's logprobs alone, as vLLM and lm-eval use it)
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
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
        if req.top_logprobs and not req.logprobs:
            raise _refuse("top_logprobs", "goes with logprobs: true")
        if req.response_format is not None and req.response_format.get("type") != "text":
            raise _refuse("response_format", "only {'type': 'text'} is supported")
    if isinstance(req, CompletionRequest):
        if req.max_tokens == 0 and not req.echo:
            raise _refuse("max_tokens", "must be at least 1 (0 only with echo: the prompt's logprobs alone)")
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


def chat_messages(messages_in: list[ChatMessageIn]) -> list[dict[str, str]]:
    """OpenAI messages as the chat template takes them; InvalidParameter (400) naming what llamaq cannot take."""
    messages = []
    for i, message in enumerate(messages_in):
        where = f"messages.{i}"
        role = ROLES.get(message.role)
        if role is None:
            raise _refuse(f"{where}.role", f"{message.role!r} is not supported; use system, user or assistant")
        if message.tool_calls or message.tool_call_id or message.function_call:
            raise _refuse(f"{where}.tool_calls", "tool and function calling are not supported")
        messages.append({"role": role, "content": _text_content(message.content, where)})
    return messages


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
                    "ignore_eos", "min_tokens", "skip_special_tokens", "include_stop_str_in_output")
DEFAULT_MAX_NEW_TOKENS = GenerationParams.model_fields["max_new_tokens"].default
# The job fields the refusals before queueing name by these routes' own fields.
OPENAI_PARAM_NAMES = {"logprobs": "logprobs", "prompt_logprobs": "logprobs", "prompt_token_ids": "prompt"}


def to_params(req: ChatCompletionRequest | CompletionRequest, max_new_tokens_limit: int) -> GenerationParams:
    """The job's parameters, or InvalidParameter (400, OpenAI's invalid_request_error) naming the field."""
    _check_supported(req)
    if isinstance(req, ChatCompletionRequest):
        messages = chat_messages(req.messages)
        limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_new_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        fields: dict[str, Any] = {"messages": messages}
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
    for name in _SAMPLING_FIELDS:
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
        # As vLLM lists a model: root is what it was loaded from (llamaq publishes only the served name).
        "root": card.name,
        "parent": None,
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


# ---- log probabilities and echo -------------------------------------------------------------------------------

# JSON has no -inf: OpenAI and vLLM report at least this.
MIN_LOGPROB = -9999.0


@dataclass
class Rendering:
    """How a request wants its answer rendered beyond the text: logprobs, echo, usage on every chunk."""

    logprobs: int | None = None  # alternatives per token (chat: top_logprobs; completions: logprobs), or none
    echo: str | None = None  # completions with echo: the prompt's text, put before the answer
    first_prompt_token: str = ""  # the text of the prompt's first token (it has no logprob)
    echo_only: bool = False  # echo with max_tokens 0: the prompt alone, the one generated token left out
    continuous_usage: bool = False
    prompt_tokens: int = 0  # for usage on every chunk


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: each token with its `top` most likely alternatives (by rank)."""
    return {"content": [
        {"token": e["token"], "logprob": _logprob(e["logprob"]), "bytes": _bytes(e["token"]),
         "top_logprobs": [{"token": t["token"], "logprob": _logprob(t["logprob"]), "bytes": _bytes(t["token"])}
                          for t in e["top"][:top]]}
        for e in entries
    ]}


def text_logprobs(
    entries: list[dict[str, Any] | None], top: int, offset: int = 0, first_token: str = ""
) -> dict[str, Any]:
    """The completions API's `logprobs` (vLLM's shape): tokens, their logprobs, up to `top` + 1 alternatives each
    (the chosen token first, then by rank), and each token's offset in the text from `offset`; a None entry (the
    prompt's first token) is `first_token` with null logprobs."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for e in entries:
        if e is None:
            token, logprob, alternatives = first_token, None, None
        else:
            token, logprob, alternatives = e["token"], _logprob(e["logprob"]), {}
            for alt in [e, *e["top"][:top]]:
                alternatives.setdefault(alt["token"], _logprob(alt["logprob"]))
        tokens.append(token)
        token_logprobs.append(logprob)
        top_logprobs.append(alternatives)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _output_logprobs(job: Job) -> tuple[list[dict[str, Any]], list[dict[str, Any] | None]]:
    if job.output is None:
        return [], []
    dumped = job.output.model_dump()
    return dumped.get("logprobs") or [], dumped.get("prompt_logprobs") or []


def completion(kind: Kind, job: Job, model: str, rendering: Rendering | None = None) -> dict[str, Any]:
    """The `chat.completion` / `text_completion` object of a terminal job."""
    rendering = rendering or Rendering()
    text = job.output.text if job.output else ""
    generated, prompt = _output_logprobs(job)
    if rendering.echo_only:
        text, generated = "", []
    logprobs = None
    if kind == CHAT:
        if rendering.logprobs is not None:
            logprobs = chat_logprobs(generated, rendering.logprobs)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs}
    else:
        if rendering.logprobs is not None:
            entries = (prompt if rendering.echo is not None else []) + generated
            logprobs = text_logprobs(entries, rendering.logprobs, first_token=rendering.first_prompt_token)
        if rendering.echo is not None:
            text = rendering.echo + text
        choice = {"index": 0, "text": text, "logprobs": logprobs}
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

    def __init__(self, kind: Kind, job: Job, model: str, include_usage: bool, rendering: Rendering | None = None):
        self.kind = kind
        self.include_usage = include_usage
        self.rendering = rendering or Rendering()
        self.echo_pending = self.rendering.echo is not None
        self.text_offset = 0  # completions logprobs: where the next token starts in the streamed text
        self.completion_tokens = 0
        self.base = {
            "id": completion_id(kind, job.id),
            "object": "chat.completion.chunk" if kind == CHAT else "text_completion",
            "created": _created(job),
            "model": model,
        }

    def _chunk(self, choices: list[dict[str, Any]], usage_: dict[str, int] | None = None) -> str:
        chunk = {**self.base, "choices": choices}
        if self.rendering.continuous_usage and usage_ is None:  # vLLM's continuous_usage_stats: on every chunk
            prompt = self.rendering.prompt_tokens
            usage_ = {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                      "total_tokens": prompt + self.completion_tokens}
        if self.include_usage:
            chunk["usage"] = usage_  # null on every chunk but the last, as OpenAI does
        return streams.sse_data(chunk)

    def _choice(
        self, text: str | None, reason: str | None, role: bool = False, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if self.kind == CHAT:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": reason}

    def opening(self) -> str | None:
        return self._chunk([self._choice(None, None, role=True)]) if self.kind == CHAT else None

    def text(self, text: str) -> str:
        return self._chunk([self._choice(text, None)])

    def token_event(self, payload: dict[str, Any]) -> str | None:
        """The chunk of one `token` event (its text and logprobs; with echo, the prompt first), or None when it
        has nothing to send."""
        rendering = self.rendering
        self.completion_tokens = payload.get("completion_tokens", self.completion_tokens)
        text = payload.get("text", "")
        generated = payload.get("logprobs") or []
        prompt: list[dict[str, Any] | None] = []
        if rendering.echo_only:
            text, generated = "", []
        if self.echo_pending:
            self.echo_pending = False
            text = (rendering.echo or "") + text
            prompt = payload.get("prompt_logprobs") or []
        if rendering.logprobs is None or not (prompt or generated):
            return self.text(text) if text else None
        if self.kind == CHAT:
            logprobs = chat_logprobs(generated, rendering.logprobs)
        else:
            logprobs = text_logprobs(prompt + generated, rendering.logprobs, self.text_offset,
                                     rendering.first_prompt_token)
            if logprobs["tokens"]:
                self.text_offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return self._chunk([self._choice(text, None, logprobs=logprobs)])

    def closing(self, job: Job) -> list[str]:
        pieces = []
        if self.echo_pending:  # no token event came: the prompt alone
            self.echo_pending = False
            pieces.append(self.text(self.rendering.echo or ""))
        self.completion_tokens = usage(job)["completion_tokens"]
        pieces.append(self._chunk([self._choice(None, finish_reason(job))]))
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
    rendering: Rendering | None = None,
) -> AsyncIterator[str]:
    """OpenAI's streaming format from the job's event stream; a client going away leaves the job running."""
    chunks = ChunkBuilder(kind, job, model, include_usage, rendering)
    # The role chunk goes out with the first answer, not while the job is queued: vLLM sends it with the first
    # token, and benchmark clients take the first chunk as the time to first token.
    opening = chunks.opening()
    sent_text = False
    try:
        async for entry in streams.read_events(jobs.hub, job.id, heartbeat_s=heartbeat_s):
            if entry is None:
                yield streams.PING
            elif entry.event == EVENT_TOKEN:
                chunk = chunks.token_event(entry.payload())
                if chunk:
                    if opening:
                        yield opening
                        opening = None
                    sent_text = True
                    yield chunk
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
                final = await jobs.ended(job.id, owner)
                if final.status is JobStatus.failed:
                    failed = JobFailed.of(final)
                    yield _stream_error(failed.status_code, failed.error_type, failed.message)
                else:
                    if opening:  # no token came (canceled while queued, say): the role still opens the answer
                        yield opening
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
    slots: StreamSlots,
) -> Response:
    """Submit through the queue; then stream the job, or wait for it and answer the completion object. Either
    counts against the client's cap on open streams and waits (checked before anything is queued)."""
    params, card, rendering = await prepare(req, jobs, settings)
    if req.stream:
        release = slots.take()
        try:
            job = await jobs.submit(params, owner, request_id, card=card)
        except BaseException:
            release()
            raise
        return streams.sse_response(
            stream_completion(kind, jobs, job, owner, card.name, req.include_usage(), rendering=rendering),
            release=release,
        )
    with slots.hold():
        job = await jobs.submit_and_wait(params, owner, request_id, settings.max_generate_wait_s, card=card)
    if job.status is JobStatus.failed:
        raise JobFailed.of(job)
    if not job.status.is_terminal():
        raise WaitTimeout(
            f"job {job.id} is still {job.status.value} after {settings.max_generate_wait_s:g} s; it runs on and "
            f"GET /v1/jobs/{job.id} returns its result (use stream: true for long generations)"
        )
    return JSONResponse(completion(kind, job, card.name, rendering))


async def prepare(
    req: ChatCompletionRequest | CompletionRequest, jobs: JobService, settings: GatewaySettings
) -> tuple[GenerationParams, ModelCard, Rendering]:
    """A request's job parameters, the served model's card and how its answer is to be rendered, or the error
    (LlamaqError) that refuses it before anything is queued: what `respond` and each Batch API line share."""
    params = to_params(req, settings.max_new_tokens_limit)
    card = await jobs.served_model()
    check_model(req.model, card)
    check_capabilities(params, card, OPENAI_PARAM_NAMES)
    return params, card, await _rendering(req, params, jobs, card)


async def _rendering(
    req: ChatCompletionRequest | CompletionRequest, params: GenerationParams, jobs: JobService, card: ModelCard
) -> Rendering:
    """What the answer needs besides the job's output: the echoed prompt's text (decoded from its ids for a
    token-id prompt) and its first token, and the prompt's token count for usage on every chunk."""
    rendering = Rendering(logprobs=params.logprobs, continuous_usage=bool(req.stream) and req.continuous_usage())
    if params.prompt_token_ids is not None:
        check_token_ids(params, (await jobs.prompt_counter(card)).vocab_size, OPENAI_PARAM_NAMES)
    if rendering.continuous_usage:
        rendering.prompt_tokens = await jobs.check_params(params, card)
    if isinstance(req, CompletionRequest) and req.echo:
        counter = await jobs.prompt_counter(card)
        ids = params.prompt_token_ids or counter.encode(params.prompt or "", True)
        rendering.echo = params.prompt if params.prompt is not None else counter.decode(ids)
        rendering.first_prompt_token = counter.decode(ids[:1])
        rendering.echo_only = req.max_tokens == 0
    return rendering
