"""The answers of a finished job: model objects, `chat.completion` / `text_completion` objects, their usage and
finish reason, and Rendering (what a request asks for besides the text: logprobs, echo, usage on every chunk)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llamaq_protocol import ChoiceOutput, FinishReason, Job, JobOutput, ModelCard

from .logprobs import chat_logprobs, text_logprobs
from .requests import CHAT, Kind

OWNED_BY = "llamaq"


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


def finish_reason(reason: FinishReason | None) -> str:
    """OpenAI knows stop, length and tool_calls; a canceled job ends as `stop` with the text it had."""
    if reason in (FinishReason.length, FinishReason.tool_calls):
        return reason.value
    return "stop"


def _choices(job: Job) -> list[ChoiceOutput]:
    """The job's answers (one, or its `n`), each with its own text, reason, logprobs and calls."""
    output = job.output or JobOutput()
    if output.choices:
        return output.choices
    return [ChoiceOutput(index=0, text=output.text, finish_reason=output.finish_reason,
                         completion_tokens=output.usage.completion_tokens, logprobs=output.logprobs,
                         tool_calls=output.tool_calls)]


def finish_reasons(job: Job, n: int = 1) -> list[str]:
    """Each choice's OpenAI finish reason (`n` of them, should the job have ended before all began)."""
    reasons = [finish_reason(choice.finish_reason) for choice in _choices(job)]
    return reasons + [finish_reason(job.output.finish_reason if job.output else None)] * (n - len(reasons))


def usage(job: Job) -> dict[str, int]:
    prompt = job.output.usage.prompt_tokens if job.output else 0
    completion = job.output.usage.completion_tokens if job.output else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _created(job: Job) -> int:
    return int(job.created_at.timestamp())


@dataclass
class Rendering:
    """How a request wants its answer rendered beyond the text: logprobs, echo, usage on every chunk."""

    logprobs: int | None = None  # alternatives per token (chat: top_logprobs; completions: logprobs), or none
    echo: str | None = None  # completions with echo: the prompt's text, put before the answer
    first_prompt_token: str = ""  # the text of the prompt's first token (it has no logprob)
    echo_only: bool = False  # echo with max_tokens 0: the prompt alone, the one generated token left out
    continuous_usage: bool = False
    prompt_tokens: int = 0  # for usage on every chunk
    n: int = 1  # choices
    # Streams with echo: the prompt's logprobs, which the worker sends once for every choice.
    prompt_logprobs: list[dict[str, Any] | None] = field(default_factory=list)


def completion(kind: Kind, job: Job, model: str, rendering: Rendering | None = None) -> dict[str, Any]:
    """The `chat.completion` / `text_completion` object of a terminal job."""
    rendering = rendering or Rendering()
    prompt = (job.output.model_dump().get("prompt_logprobs") or []) if job.output else []
    return {
        "id": completion_id(kind, job.id),
        "object": "chat.completion" if kind == CHAT else "text_completion",
        "created": _created(job),
        "model": model,
        "choices": [_choice(kind, choice, rendering, prompt) for choice in _choices(job)],
        "usage": usage(job),
    }


def _choice(
    kind: Kind, choice: ChoiceOutput, rendering: Rendering, prompt: list[dict[str, Any] | None]
) -> dict[str, Any]:
    text = choice.text
    generated = choice.model_dump().get("logprobs") or []
    if rendering.echo_only:
        text, generated = "", []
    logprobs = None
    if kind == CHAT:
        if rendering.logprobs is not None:
            logprobs = chat_logprobs(generated, rendering.logprobs)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if choice.tool_calls:
            # As OpenAI answers a turn of calls: content null unless the model also wrote text.
            message = {"role": "assistant", "content": text or None,
                       "tool_calls": [call.model_dump() for call in choice.tool_calls]}
        answer = {"index": choice.index, "message": message, "logprobs": logprobs}
    else:
        if rendering.logprobs is not None:
            entries = (prompt if rendering.echo is not None else []) + generated
            logprobs = text_logprobs(entries, rendering.logprobs, first_token=rendering.first_prompt_token)
        if rendering.echo is not None:
            text = rendering.echo + text
        answer = {"index": choice.index, "text": text, "logprobs": logprobs}
    answer["finish_reason"] = finish_reason(choice.finish_reason)
    return answer
