"""Where a job is claimed and admitted: popped from the fair queue (priority_queues), claimed in its record
(CLAIM_SCRIPT), started in RQ's bookkeeping, its payload validated again, its prompt encoded and checked against the
context, and handed to the engine with its sampling parameters (a job's own, else the model's defaults) and its
priority (its fair-queue tier's: interactive, batch, or over its key's limits)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import redis
from pydantic import ValidationError
from rq import Queue
from rq.job import Job as RQJob

from llamaq_protocol import FinishReason, GenerationParams, JobError, JobPayload, JobStatus, utc_now
from llamaq_protocol import keys
from llamaq_protocol.records import CLAIM_SCRIPT, RETURN_SCRIPT, claim_keys

from .engines.base import (
    PRIORITIES,
    PRIORITY_BATCH,
    PRIORITY_INTERACTIVE,
    PRIORITY_NAMES,
    Engine,
    EngineDead,
    SamplingParams,
    StructuredOutputs,
    text_token_ids,
)
from .metrics import WorkerMetrics, seconds_since
from .priority_queues import PriorityQueue
from .publishing import REDIS_DOWN, RedisRetry
from .rq_adapter import RQOps, intermediate_key, rq_now
from .settings import WorkerSettings
from .slots import Choice, Ending, Slot, seq_id
from .tool_calls import ToolCallStream, forced_tool_schema

logger = logging.getLogger(__name__)


class JobRefused(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def sampling_params(params: GenerationParams, defaults: dict) -> SamplingParams:
    """The engine's parameters for a job: each one the job leaves unset takes the model's default."""

    def pick(name):
        value = getattr(params, name)
        return defaults[name] if value is None else value

    return SamplingParams(
        max_new_tokens=params.max_new_tokens,
        temperature=float(pick("temperature")),
        top_p=float(pick("top_p")),
        top_k=int(pick("top_k")),
        min_p=float(defaults.get("min_p", 0.0) if params.min_p is None else params.min_p),
        repetition_penalty=float(pick("repetition_penalty")),
        stop=tuple(params.stop or ()),
        stop_token_ids=tuple(params.stop_token_ids or ()),
        include_stop_str_in_output=params.include_stop_str_in_output,
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
        skip_special_tokens=params.skip_special_tokens,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        seed=params.seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logit_bias=tuple(sorted((params.logit_bias or {}).items())),
        structured_outputs=structured_outputs(params),
    )


def choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s settings: the job's, its seed (if any) moved on by the index."""
    return sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + index)


def structured_outputs(params: GenerationParams) -> StructuredOutputs | None:
    """The job's constraint for the engine: a required or named tool_choice's schema, or its own."""
    schema = forced_tool_schema(params)
    if schema is not None:
        return StructuredOutputs("json", json.dumps(schema))
    if params.structured_outputs is None:
        return None
    kind, value = params.structured_outputs.kind()
    if kind == "json":
        return StructuredOutputs(kind, json.dumps(value))
    if kind == "choice":
        return StructuredOutputs(kind, tuple(value))
    return StructuredOutputs(kind, "" if kind == "json_object" else value)


def prompt_token_ids(engine, params: GenerationParams) -> list[int]:
    """The job's prompt as token ids: its own ids, its raw text tokenized, or its conversation rendered with the
    model's chat template."""
    if params.prompt_token_ids is not None:
        return list(params.prompt_token_ids)
    if not params.templated:
        return text_token_ids(engine.tokenizer, params.prompt or "")
    return engine.encode_chat(params.chat_messages(), params.template_tools())


def job_priority(tier: bytes | str | None, queue: Queue) -> int:
    """A claimed job's engine priority: its fair-queue tier's (the record's `fq_tier`, a tier's key prefix), or, for
    a job queued on RQ's own lists (no tier), its RQ queue's."""
    if tier:
        name = (tier.decode() if isinstance(tier, bytes) else tier).rsplit(":", 1)[-1]
        if name in PRIORITIES:
            return PRIORITIES[name]
    return PRIORITY_BATCH if queue.name.endswith(keys.BATCH_QUEUE_SUFFIX) else PRIORITY_INTERACTIVE


class Claimer:
    """Claims and admits jobs for one worker. `connection` and `worker_name`: the worker's; `rq`: RQ's operations on
    its behalf (its queues, their pop, a job's start in RQ); `until_redis`: its retry of Redis calls through an
    outage; `tool_parser`: vLLM's tool parser class for tool_choice "auto" (None: no tool calling);
    `stop_generating(job_id, slot)`: the decoding loop's cancel of a running job's sequences."""

    def __init__(self, connection: redis.Redis, worker_name: str, rq: RQOps, *, engine: Engine,
                 settings: WorkerSettings, metrics: WorkerMetrics, until_redis: RedisRetry,
                 tool_parser: type | None, stop_generating: Callable[[str, Slot], None]) -> None:
        self.connection = connection
        self.worker_name = worker_name
        self.rq = rq
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.until_redis = until_redis
        self.tool_parser = tool_parser
        self.stop_generating = stop_generating
        self._claim = connection.register_script(CLAIM_SCRIPT)
        self._return = connection.register_script(RETURN_SCRIPT)

    def pop(self, interactive_only: bool = False) -> tuple[RQJob, Queue] | None:
        """The next queued job, without waiting; None when there is none (or Redis is away: the publishing that
        follows waits for it). `interactive_only`: from the interactive tier alone (the engine has room for nothing
        else)."""
        queues, only = self.rq.queues, {}
        if interactive_only:
            if issubclass(self.rq.queue_class, PriorityQueue):
                only = {"tiers": ("interactive",)}
            else:  # RQ's own lists (no fair queue): the interactive queue's
                queues = [q for q in queues if not q.name.endswith(keys.BATCH_QUEUE_SUFFIX)]
        try:
            return self.rq.pop(queues, **only)
        except REDIS_DOWN:
            return None

    def push_back(self, job: RQJob, queue: Queue) -> None:
        """A popped job back at the front of its client's list, for a later claim."""
        self._return(keys=[intermediate_key(queue), keys.job(job.id)], args=[job.id])

    def claim(self, job: RQJob, queue: Queue) -> Slot | None:
        """The popped job made this worker's, in its record and RQ's, as a new Slot; None if its record says it is
        not to run (canceled while queued, or expired): then its RQ job is closed without running."""
        # The job is popped: from here on Redis is waited for rather than the job dropped.
        claimed = self.until_redis(
            "claiming a job", self._claim,
            keys=claim_keys(job.id),
            args=[utc_now().isoformat(), self.worker_name, job.id],
        )
        if claimed not in (b"claimed", b"resumed"):
            logger.info("skipping job %s: record is %s", job.id, claimed.decode())

            def close() -> None:
                with self.connection.pipeline() as pipe:
                    pipe.lrem(intermediate_key(queue), 1, job.id)
                    job.cancel(pipeline=pipe)
                    pipe.execute()

            self.until_redis("closing a skipped job", close)
            return None

        execution, tier = self.until_redis("starting a job", self._start_in_rq, job, queue)
        job.started_at = rq_now()
        timeout = job.timeout if job.timeout and job.timeout > 0 else self.rq.default_timeout
        slot = Slot(
            rq_job=job, queue=queue, rq_execution=execution, request_id=None, prompt_tokens=0,
            max_new_tokens=0, deadline=time.monotonic() + timeout, waited_s=seconds_since(job.enqueued_at),
            resumed=claimed == b"resumed", priority=job_priority(tier, queue),
        )
        if slot.waited_s is not None:
            self.metrics.queue_wait.labels(priority=PRIORITY_NAMES[slot.priority]).observe(slot.waited_s)
        return slot

    def _start_in_rq(self, job: RQJob, queue: Queue) -> tuple[object, bytes | None]:
        """The job started in RQ before its first step (rq_adapter.RQOps.start_execution: what RQ's own start
        writes, in one transaction, the job off its intermediate list too). Returns its execution, and its fair-queue
        tier (its record's `fq_tier`, read in the same round trip), None for a job queued on RQ's own lists."""
        with self.connection.pipeline() as pipe:
            # Every pop moves the id onto its queue's intermediate list (priority_queues, or RQ with one queue).
            execution = self.rq.start_execution(job, queue, pipe)
            pipe.hget(keys.job(job.id), "fq_tier")
            return execution, pipe.execute()[-1]

    def admit(self, job: RQJob, slot: Slot) -> Ending | None:
        """The claimed job's payload validated, its prompt encoded and checked, and its sequence added to the
        engine; or, when it cannot run, the Ending it fails with (a bad job never takes the worker down)."""
        engine = self.engine
        try:
            payload = JobPayload.model_validate(job.args[0] if job.args else None)
            slot.request_id = payload.request_id
            params = payload.params
            if self.settings.log_prompts:
                prompt = params.chat_messages() if params.templated else params.prompt or params.prompt_token_ids
                logger.info("job %s prompt", job.id, extra={"job_id": job.id, "request_id": slot.request_id,
                                                            "messages": json.dumps(prompt)})
            prompt_ids = prompt_token_ids(engine, params)
            slot.prompt_tokens = len(prompt_ids)
            self.metrics.prompt_tokens.inc(len(prompt_ids))
            slot.max_new_tokens = params.max_new_tokens
            if len(prompt_ids) + params.max_new_tokens > engine.context_length:
                raise JobRefused(
                    "prompt_too_long",
                    f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                    f"the model's context of {engine.context_length}",
                )
            sampling = sampling_params(params, engine.defaults)
            slot.choices = [Choice(i) for i in range(params.n)]
            for choice in slot.choices:
                if params.logprobs is not None:
                    choice.logprobs = []
                if params.tools and params.effective_tool_choice() != "none":
                    choice.tool_calls = ToolCallStream(params, self.tool_parser, engine.tokenizer)
            if slot.resumed and params.resumable():
                made = self.resume(job.id, slot)
                left = params.max_new_tokens - slot.choices[0].completion_tokens
                if left <= 0:  # every token was made; only the finish was lost
                    slot.choices[0].finish_reason = FinishReason.length.value
                    return Ending(JobStatus.succeeded, output=slot.output())
                prompt_ids = prompt_ids + made
                sampling = replace(sampling, max_new_tokens=left,
                                   min_tokens=max(0, sampling.min_tokens - slot.choices[0].completion_tokens))
            # The first choice starts now (its refusal is the job's); the others as the engine has room. With a seed,
            # choice i samples with seed + i, so the choices differ and the job is reproducible.
            engine.add(job.id, prompt_ids, sampling, priority=slot.priority)
            slot.choices[0].started = True
            slot.waiting = [(i, prompt_ids, choice_sampling(sampling, i))
                            for i in range(1, params.n)]
            while slot.waiting and engine.free_slots_for(slot.priority) > 0:
                self.start_choice(job.id, slot, *slot.waiting.pop(0))
        except ValidationError as exc:
            return Ending(JobStatus.failed, error=JobError(type="invalid_payload", message=str(exc)))
        except JobRefused as exc:
            return Ending(JobStatus.failed, error=JobError(type=exc.error_type, message=exc.message))
        except EngineDead:
            raise  # not the job's fault: it goes back on the queue with the others
        except ValueError as exc:  # the engine refused the request (a grammar that does not compile, say)
            logger.warning("job %s refused by the engine: %s", job.id, exc, extra={"job_id": job.id})
            return Ending(JobStatus.failed, error=JobError(type="invalid_request", message=str(exc)))
        except Exception as exc:
            logger.exception("job %s could not start", job.id)
            return Ending(JobStatus.failed, error=JobError(type="internal_error", message=str(exc)))
        return None

    def resume(self, job_id: str, slot: Slot) -> list[int]:
        """A generation an earlier attempt began (its worker lost, its tokens kept: records.RECLAIM_SCRIPT) taken up
        where its token events end: its text, tokens and logprobs so far in the slot's one choice, the next event
        numbered after them; returns the ids of the tokens made, which follow the prompt as the engine's."""
        def read() -> tuple[list, bytes | None]:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.xrange(keys.events(job_id))
                pipe.hget(keys.job(job_id), "token_events")
                return pipe.execute()

        events, written = self.until_redis("resuming a job", read)
        # The next event is numbered after those written (TOKENS_SCRIPT counts them in the record).
        slot.token_events = int(written or 0)
        choice, made = slot.choices[0], []
        for _, fields in events:
            if fields.get(b"event") != b"token":
                continue
            token = json.loads(fields[b"data"])
            choice.text += token.get("text") or ""
            made += token.get("token_ids") or []
            choice.completion_tokens = max(choice.completion_tokens, int(token.get("completion_tokens") or 0))
            if choice.logprobs is not None and token.get("logprobs"):
                choice.logprobs.extend(token["logprobs"])
        choice.offset = choice.completion_tokens = max(choice.completion_tokens, len(made))
        logger.info("job %s resumed after %d tokens", job_id, choice.completion_tokens, extra={"job_id": job_id})
        return made

    def start_choice(self, job_id: str, slot: Slot, index: int, prompt_ids: list[int],
                     sampling: SamplingParams) -> None:
        """One of the job's later choices handed to the engine. Should the engine refuse it, the choice fails and
        the job is stopped: it then ends failed with that error."""
        choice = slot.choices[index]
        try:
            self.engine.add(seq_id(job_id, index), prompt_ids, sampling, priority=slot.priority)
            choice.started = True
        except EngineDead:
            raise
        except Exception as exc:
            logger.exception("choice %d of job %s could not start", index, job_id)
            choice.error = f"{'invalid_request' if isinstance(exc, ValueError) else 'internal_error'}: {exc}"
            self.stop_generating(job_id, slot)
