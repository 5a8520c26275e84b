"""A running job on this worker (`Slot`), how it ended (`Ending`), and how an engine's last output for it reads as
its ending."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rq import Queue
from rq.job import Job as RQJob

from llamaq_protocol import FinishReason, JobError, JobOutput, JobStatus, Usage, utc_now

from .engines.base import StepOutput
from .tool_calls import NAMED, ToolCallStream


@dataclass
class Ending:
    """How a job ended on this worker, fixed once so that every try of its finish sends the same arguments."""

    status: JobStatus
    output: JobOutput | None = None
    error: JobError | None = None
    finished_at: str = field(default_factory=lambda: utc_now().isoformat())


@dataclass
class Slot:
    """One running job: its RQ objects and what it has produced so far."""

    rq_job: RQJob
    queue: Queue
    execution: object
    request_id: str | None
    prompt_tokens: int
    max_new_tokens: int
    deadline: float
    admitted_at: float = field(default_factory=time.monotonic)
    # Seconds the job had waited since its enqueue when it was admitted (None if RQ did not record it).
    waited_s: float | None = None
    text: str = ""
    completion_tokens: int = 0
    token_events: int = 0
    # Token event data generated but not yet written to Redis (it was away); the first has index
    # token_events - len(unpublished).
    unpublished: list[str] = field(default_factory=list)
    # When the partial output in the job record is refreshed next (time.monotonic()).
    partial_due_at: float = 0.0
    cancel_sent: bool = False
    timed_out: bool = False
    # The job was taken from this worker (re-queued or ended by someone else): generation stops, nothing is written.
    lost: bool = False
    # The job asked for logprobs / prompt_logprobs: what the engine reported so far (else None).
    logprobs: list[dict[str, Any]] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    # The job has tools: its text is read for tool calls as it comes (content and call deltas go out apart).
    tool_calls: ToolCallStream | None = None

    def take_token_event(self, out: StepOutput) -> dict[str, Any] | None:
        """The `token` event of an output (its text, the tool call deltas read from it, the log probabilities it
        carries), all kept for the job's output too; None when it has nothing to send."""
        text, calls = out.text, None
        if self.tool_calls is not None:
            text, calls = self.tool_calls.feed(out.text, final=out.finish_reason is not None or out.error is not None)
        self.text += text
        if not (text or calls or out.logprobs or out.prompt_logprobs is not None):
            return None
        event: dict[str, Any] = {"index": self.token_events, "text": text,
                                 "completion_tokens": out.completion_tokens}
        if calls:
            event["tool_calls"] = calls
        if out.logprobs:
            event["logprobs"] = out.logprobs
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            event["prompt_logprobs"] = self.prompt_logprobs = out.prompt_logprobs
        return event

    def output(self, finish_reason: FinishReason | None = None) -> JobOutput:
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        calls = self.tool_calls.calls if self.tool_calls is not None else None
        if calls and finish_reason is FinishReason.stop and self.tool_calls.mode != NAMED:
            # OpenAI's reason for a turn that ended in calls; a named tool_choice ends with "stop", as OpenAI's does.
            finish_reason = FinishReason.tool_calls
        return JobOutput(text=self.text, finish_reason=finish_reason, usage=usage, logprobs=self.logprobs,
                         prompt_logprobs=self.prompt_logprobs, tool_calls=calls or None)


def ending_of(slot: Slot, out: StepOutput) -> Ending:
    """The ending of a job whose sequence finished (or failed) with `out`, after `slot` took `out`'s text."""
    if out.error:
        error_type, _, message = out.error.partition(": ")
        return Ending(JobStatus.failed, error=JobError(type=error_type, message=message or out.error))
    if slot.timed_out:
        message = f"job ran past its timeout of {slot.rq_job.timeout} s"
        return Ending(JobStatus.failed, output=slot.output(FinishReason.canceled),
                      error=JobError(type="timeout", message=message))
    if out.finish_reason == FinishReason.canceled.value:
        return Ending(JobStatus.canceled, output=slot.output(FinishReason.canceled))
    return Ending(JobStatus.succeeded, output=slot.output(FinishReason(out.finish_reason)))
