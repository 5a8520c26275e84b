"""A running job on this worker (`Slot`) and its answers (`Choice`: one engine sequence each, `n` of them), how it
ended (`Ending`), and how its choices' last outputs read as its ending."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rq import Queue
from rq.job import Job as RQJob

from llamaq_protocol import ChoiceOutput, FinishReason, JobError, JobOutput, JobStatus, Usage, utc_now

from .engines.base import PRIORITY_INTERACTIVE, SamplingParams, StepOutput
from .tool_calls import NAMED, ToolCallStream


@dataclass
class Ending:
    """How a job ended on this worker, fixed once so that every try of its finish sends the same arguments."""

    status: JobStatus
    output: JobOutput | None = None
    error: JobError | None = None
    finished_at: str = field(default_factory=lambda: utc_now().isoformat())


def seq_id(job_id: str, index: int) -> str:
    """The engine sequence of a job's choice: the job's id for the first (a job of one choice is one sequence of
    its own id), `<job id>/<index>` for the others (job ids never hold a slash)."""
    return job_id if index == 0 else f"{job_id}/{index}"


def job_and_choice(sequence: str) -> tuple[str, int]:
    job_id, _, index = sequence.partition("/")
    return job_id, int(index or 0)


@dataclass
class Choice:
    """One of a job's answers: what its engine sequence has produced."""

    index: int
    text: str = ""
    completion_tokens: int = 0
    # Tokens an earlier attempt made (a generation resumed on this worker): the engine counts from 0 after them.
    offset: int = 0
    # The job asked for logprobs: what the engine reported so far (else None).
    logprobs: list[dict[str, Any]] | None = None
    # The job has tools: its text is read for tool calls as it comes (content and call deltas go out apart).
    tool_calls: ToolCallStream | None = None
    started: bool = False  # handed to the engine (a job's later choices wait for free slots)
    finish_reason: str | None = None  # the engine's, once its sequence ended
    error: str | None = None

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def reason(self, override: FinishReason | None = None) -> FinishReason | None:
        """Its finish reason as the job reports it: a turn of calls ends with tool_calls (OpenAI's; a named
        tool_choice ends with "stop", as OpenAI's does); `override` for a choice cut short by a cancel or timeout."""
        if override is not None and self.finish_reason in (None, FinishReason.canceled.value):
            return override
        if self.finish_reason is None:
            return override
        reason = FinishReason(self.finish_reason)
        calls = self.tool_calls
        if reason is FinishReason.stop and calls is not None and calls.calls and calls.mode != NAMED:
            return FinishReason.tool_calls
        return reason

    def calls(self) -> list[dict[str, Any]] | None:
        return (self.tool_calls.calls or None) if self.tool_calls is not None else None


@dataclass
class Slot:
    """One running job: its RQ objects and what its choices have produced so far."""

    rq_job: RQJob
    queue: Queue
    # RQ's record of this run of the job (rq_adapter.RQOps.start_execution), shown in the worker's as RQ acts on it.
    rq_execution: object
    request_id: str | None
    prompt_tokens: int
    max_new_tokens: int
    deadline: float
    admitted_at: float = field(default_factory=time.monotonic)
    # Seconds the job had waited since its enqueue when it was admitted (None if RQ did not record it).
    waited_s: float | None = None
    # Its record had token events of an earlier attempt (CLAIM_SCRIPT said "resumed"): continue from them.
    resumed: bool = False
    # Its sequences' priority in the engine (engines.base.PRIORITY_*: its fair-queue tier's).
    priority: int = PRIORITY_INTERACTIVE
    choices: list[Choice] = field(default_factory=lambda: [Choice(0)])
    # The sequences of later choices not yet handed to the engine (it had no free slot): (choice, prompt, params).
    waiting: list[tuple[int, list[int], SamplingParams]] = field(default_factory=list)
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
    # The job asked for prompt_logprobs: what the engine reported (else None), once for all choices.
    prompt_logprobs: list[dict[str, Any] | None] | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)

    @property
    def ended(self) -> bool:
        """Every choice's sequence has ended (or one failed, which ends the job)."""
        return any(c.error for c in self.choices) or all(c.ended for c in self.choices)

    def running_sequences(self, job_id: str) -> list[str]:
        """The engine sequences of its choices still running."""
        return [seq_id(job_id, c.index) for c in self.choices if c.started and not c.ended]

    def take_token_event(self, out: StepOutput, choice: Choice) -> dict[str, Any] | None:
        """The `token` event of one choice's output (its text, the tool call deltas read from it, the log
        probabilities it carries), all kept for the job's output too; None when it has nothing to send."""
        text, calls = out.text, None
        if choice.tool_calls is not None:
            text, calls = choice.tool_calls.feed(out.text, final=out.finish_reason is not None or out.error is not None)
        choice.text += text
        if not (text or calls or out.logprobs or out.prompt_logprobs is not None or out.token_ids):
            return None
        event: dict[str, Any] = {"index": self.token_events, "text": text,
                                 "completion_tokens": out.completion_tokens}
        if out.token_ids:
            event["token_ids"] = out.token_ids  # what another worker would continue from
        if len(self.choices) > 1:
            event["choice"] = choice.index
        if calls:
            event["tool_calls"] = calls
        if out.logprobs:
            event["logprobs"] = out.logprobs
            if choice.logprobs is None:
                choice.logprobs = []
            choice.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            event["prompt_logprobs"] = self.prompt_logprobs = out.prompt_logprobs
        return event

    def output(self, override: FinishReason | None = None) -> JobOutput:
        """What the job has produced; `override`: the reason of every choice a cancel or timeout cut short."""
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        first = self.choices[0]
        choices = None
        if len(self.choices) > 1:
            choices = [ChoiceOutput(index=c.index, text=c.text, finish_reason=c.reason(override),
                                    completion_tokens=c.completion_tokens, logprobs=c.logprobs,
                                    tool_calls=c.calls()) for c in self.choices]
        return JobOutput(text=first.text, finish_reason=first.reason(override), usage=usage,
                         logprobs=first.logprobs, prompt_logprobs=self.prompt_logprobs, tool_calls=first.calls(),
                         choices=choices)


def ending_of(slot: Slot) -> Ending:
    """The ending of a job whose choices have all ended (or one of which failed), after `slot` took their text."""
    failed = next((c.error for c in slot.choices if c.error), None)
    if failed:
        error_type, _, message = failed.partition(": ")
        return Ending(JobStatus.failed, error=JobError(type=error_type, message=message or failed))
    if slot.timed_out:
        message = f"job ran past its timeout of {slot.rq_job.timeout} s"
        return Ending(JobStatus.failed, output=slot.output(FinishReason.canceled),
                      error=JobError(type="timeout", message=message))
    if any(c.finish_reason == FinishReason.canceled.value for c in slot.choices):
        return Ending(JobStatus.canceled, output=slot.output(FinishReason.canceled))
    return Ending(JobStatus.succeeded, output=slot.output())
