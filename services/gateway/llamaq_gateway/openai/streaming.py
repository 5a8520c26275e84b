"""`stream: true`: a job's event stream as OpenAI's server-sent chunks, ending with `data: [DONE]`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.exceptions

from llamaq_protocol import Job, JobStatus
from llamaq_protocol.records import EVENT_DONE, EVENT_STATUS, EVENT_TOKEN

from .. import streams
from ..errors import JobFailed, JobNotFound, error_body
from ..event_hub import SubscriberTooSlow
from ..jobs import JobService
from ..sse import sse_data
from .logprobs import chat_logprobs, text_logprobs
from .render import Rendering, _created, completion_id, finish_reasons, usage
from .requests import CHAT, Kind

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


class ChunkBuilder:
    """The `chat.completion.chunk` / `text_completion` chunks of one streamed job."""

    def __init__(self, kind: Kind, job: Job, model: str, include_usage: bool, rendering: Rendering | None = None):
        self.kind = kind
        self.include_usage = include_usage
        self.rendering = rendering or Rendering()
        n = self.rendering.n
        # The choices whose prompt (echo) is still to be sent, each before its first text.
        self.echo_pending = set(range(n)) if self.rendering.echo is not None else set()
        self.text_offset = [0] * n  # completions logprobs: where each choice's next token starts in its text
        self.opened = {0}  # chat: the choices whose role went out (the first's in its own opening chunk)
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
        return sse_data(chunk)

    def keepalive(self) -> str:
        """What a silence of HEARTBEAT_S sends (a job still queued, say): a chunk with no choices, as the usage chunk
        is, which every OpenAI client skips. Not an SSE comment: `vllm bench serve` strips each network read and
        then glues a comment to the next event, losing the whole stream's text."""
        chunk = {**self.base, "choices": []}
        if self.include_usage:
            chunk["usage"] = None
        return sse_data(chunk)

    def _choice(
        self, text: str | None, reason: str | None, role: bool = False, logprobs: dict[str, Any] | None = None,
        tool_calls: list[dict[str, Any]] | None = None, index: int = 0,
    ) -> dict[str, Any]:
        if self.kind == CHAT:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if index not in self.opened:  # a later choice's first delta carries its role
                self.opened.add(index)
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if tool_calls:  # OpenAI's call deltas: id, type and name first, then the arguments in pieces
                delta["tool_calls"] = tool_calls
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}

    def opening(self) -> str | None:
        return self._chunk([self._choice(None, None, role=True)]) if self.kind == CHAT else None

    def text(self, text: str, index: int = 0) -> str:
        return self._chunk([self._choice(text, None, index=index)])

    def token_event(self, payload: dict[str, Any]) -> str | None:
        """The chunk of one `token` event (its text and logprobs; with echo, the prompt first), or None when it
        has nothing to send."""
        rendering = self.rendering
        index = payload.get("choice", 0)
        # (with n > 1 a token event's count is its choice's; usage on every chunk shows the latest one's)
        self.completion_tokens = payload.get("completion_tokens", self.completion_tokens)
        text = payload.get("text", "")
        generated = payload.get("logprobs") or []
        prompt: list[dict[str, Any] | None] = []
        if rendering.echo_only:
            text, generated = "", []
        if index in self.echo_pending:
            self.echo_pending.discard(index)
            text = (rendering.echo or "") + text
            prompt = payload.get("prompt_logprobs") or rendering.prompt_logprobs
            rendering.prompt_logprobs = prompt  # the worker sends them once, for every choice
        calls = payload.get("tool_calls") if self.kind == CHAT else None
        if calls and (rendering.logprobs is None or not generated):
            return self._chunk([self._choice(text or None, None, tool_calls=calls, index=index)])
        if rendering.logprobs is None or not (prompt or generated):
            return self.text(text, index) if text else None
        if self.kind == CHAT:
            logprobs = chat_logprobs(generated, rendering.logprobs)
        else:
            logprobs = text_logprobs(prompt + generated, rendering.logprobs, self.text_offset[index],
                                     rendering.first_prompt_token)
            if logprobs["tokens"]:
                self.text_offset[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return self._chunk([self._choice(text, None, logprobs=logprobs, tool_calls=calls, index=index)])

    def closing(self, job: Job) -> list[str]:
        pieces = []
        for index in sorted(self.echo_pending):  # no token event came: the prompt alone
            pieces.append(self.text(self.rendering.echo or "", index))
        self.echo_pending.clear()
        self.completion_tokens = usage(job)["completion_tokens"]
        for index, reason in enumerate(finish_reasons(job, self.rendering.n)):
            pieces.append(self._chunk([self._choice(None, reason, index=index)]))
        if self.include_usage:
            pieces.append(self._chunk([], usage(job)))
        return pieces


def _stream_error(status_code: int, error_type: str, message: str) -> str:
    return sse_data(error_body(status_code, error_type, message, openai=True))


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
    """OpenAI's streaming format from the job's event stream; a client going away only stops this reader (`respond`
    cancels the job then, where disconnect.applies)."""
    chunks = ChunkBuilder(kind, job, model, include_usage, rendering)
    # The role chunk goes out with the first answer, not while the job is queued: vLLM sends it with the first
    # token, and benchmark clients take the first chunk as the time to first token.
    opening = chunks.opening()
    sent_text = False
    try:
        async for entry in streams.read_events(jobs.hub, job.id, heartbeat_s=heartbeat_s):
            if entry is None:
                yield chunks.keepalive()
            elif entry.event == EVENT_TOKEN:
                chunk = chunks.token_event(entry.payload())
                if chunk:
                    if opening:
                        yield opening
                        opening = None
                    sent_text = True
                    yield chunk
            elif entry.event == EVENT_STATUS and entry.payload().get("requeued"):
                # Its worker was lost. With `resumed` another worker continues from the tokens sent (the stream
                # carries on); else the job starts over, and text already sent cannot be taken back.
                if sent_text and not entry.payload().get("resumed"):
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
    except SubscriberTooSlow as exc:
        # Its events grew faster than the client read them: an end, not a buffer that grows without bound.
        logger.warning("completion stream of job %s ended early: %s", job.id, exc)
        yield _stream_error(503, "stream_too_slow",
                            f"the client read the stream of job {job.id} too slowly; GET /v1/jobs/{job.id} has its "
                            f"result, and GET /v1/jobs/{job.id}/events its events")
        yield DONE
        return
    except (redis.exceptions.RedisError, JobNotFound) as exc:
        logger.warning("completion stream of job %s ended early: %s", job.id, exc)
        yield _stream_error(503, "unavailable", f"lost the event stream of job {job.id}; GET /v1/jobs/{job.id}")
        yield DONE
        return
    yield _stream_error(500, "internal_error", f"the event stream of job {job.id} ended without its result")
    yield DONE
