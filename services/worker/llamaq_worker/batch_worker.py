"""An RQ worker that runs many jobs in one continuous batch.

RQ pops one job id at a time, so batching lives here: `execute_job` admits the popped job, then keeps
claiming more with non-blocking dequeues between decoding steps while the engine has free slots. Each job
still goes through RQ's own bookkeeping (execution, started/finished/failed/canceled registries, results),
so `rq info` shows the truth; RQ 2.x keeps one `worker.execution`, which is swapped in per job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError
from rq import Queue
from rq.job import Job as RQJob
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from llamaq_protocol import FinishReason, JobError, JobOutput, JobPayload, JobStatus, Usage, utc_now
from llamaq_protocol import keys
from llamaq_protocol.records import CLAIM_SCRIPT, EVENT_TOKEN, FINISH_SCRIPT, event_data

from .sequences import SamplingParams, StepOutput
from .settings import WorkerSettings

if TYPE_CHECKING:
    from .echo_engine import EchoEngine
    from .engine import Engine

logger = logging.getLogger(__name__)

# Partial output in the job record is refreshed at most this often; the event stream gets every token.
PARTIAL_OUTPUT_EVERY_S = 0.25


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
    text: str = ""
    completion_tokens: int = 0
    token_events: int = 0
    partial_written_at: float = 0.0
    cancel_sent: bool = False
    timed_out: bool = False

    def output(self, finish_reason: FinishReason | None = None) -> JobOutput:
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        return JobOutput(text=self.text, finish_reason=finish_reason, usage=usage)


class BatchWorker(SimpleWorker):
    def __init__(self, queues, *, engine: Engine | EchoEngine, settings: WorkerSettings, **kwargs):
        super().__init__(queues, **kwargs)
        self.engine = engine
        self.settings = settings
        self.slots: dict[str, Slot] = {}
        self._claim = self.connection.register_script(CLAIM_SCRIPT)
        self._finish = self.connection.register_script(FINISH_SCRIPT)
        self._rq_heartbeat_at = 0.0

    # ---- the batch loop --------------------------------------------------------------------------------------

    def execute_job(self, job: RQJob, queue: Queue):
        if job.func_name != keys.GENERATE_FUNC:
            return super().execute_job(job, queue)
        self._admit(job, queue)
        while self.slots:
            self._claim_more()
            self._apply_cancels_and_timeouts()
            outputs = self.engine.step()
            self._publish(outputs)
            self._maintain_rq_heartbeats()
        self.set_state(WorkerStatus.IDLE)

    def _claim_more(self) -> None:
        while self.engine.free_slots > 0 and not self._stop_requested:
            popped = Queue.dequeue_any(
                self._ordered_queues, None, connection=self.connection, job_class=self.job_class,
                serializer=self.serializer,
            )
            if popped is None:
                return
            job, queue = popped
            if job.func_name != keys.GENERATE_FUNC:
                # Not ours to batch: run it now, in line, as a plain SimpleWorker would.
                super().execute_job(job, queue)
                continue
            self._admit(job, queue)

    # ---- admitting a job -------------------------------------------------------------------------------------

    def _admit(self, job: RQJob, queue: Queue) -> None:
        claimed = self._claim(
            keys=[keys.job(job.id), keys.events(job.id), keys.RUNNING],
            args=[utc_now().isoformat(), self.name, job.id],
        )
        if claimed != b"claimed":
            # Canceled while queued (or its record expired): close the RQ job without running it.
            logger.info("skipping job %s: record is %s", job.id, claimed.decode())
            with self.connection.pipeline() as pipe:
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                job.cancel(pipeline=pipe)
                pipe.execute()
            return

        self.prepare_execution(job)
        self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
        job.started_at = now()
        timeout = job.timeout if job.timeout and job.timeout > 0 else self.queue_class.DEFAULT_TIMEOUT
        slot = Slot(
            rq_job=job, queue=queue, execution=self.execution, request_id=None, prompt_tokens=0,
            max_new_tokens=0, deadline=time.monotonic() + timeout,
        )
        self.slots[job.id] = slot
        try:
            payload = JobPayload.model_validate(job.args[0] if job.args else None)
            slot.request_id = payload.request_id
            params = payload.params
            prompt_ids = self.engine.encode_chat(params.chat_messages())
            slot.prompt_tokens = len(prompt_ids)
            slot.max_new_tokens = params.max_new_tokens
            if len(prompt_ids) + params.max_new_tokens > self.engine.context_length:
                raise _JobRefused(
                    "prompt_too_long",
                    f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                    f"the model's context of {self.engine.context_length}",
                )
            self.engine.add(job.id, prompt_ids, self._sampling(params))
        except ValidationError as exc:
            self._end(job.id, JobStatus.failed, error=JobError(type="invalid_payload", message=str(exc)))
            return
        except _JobRefused as exc:
            self._end(job.id, JobStatus.failed, error=JobError(type=exc.error_type, message=exc.message))
            return
        except Exception as exc:  # a bad job must never take the worker down
            logger.exception("job %s could not start", job.id)
            self._end(job.id, JobStatus.failed, error=JobError(type="internal_error", message=str(exc)))
            return
        logger.info("job %s admitted (%d prompt tokens, batch %d)", job.id, slot.prompt_tokens, len(self.slots),
                    extra={"job_id": job.id, "request_id": slot.request_id})

    def _sampling(self, params) -> SamplingParams:
        defaults = self.engine.defaults

        def pick(name):
            value = getattr(params, name)
            return defaults[name] if value is None else value

        return SamplingParams(
            max_new_tokens=params.max_new_tokens,
            temperature=float(pick("temperature")),
            top_p=float(pick("top_p")),
            top_k=int(pick("top_k")),
            repetition_penalty=float(pick("repetition_penalty")),
            stop=tuple(params.stop or ()),
            seed=params.seed,
        )

    # ---- between decoding steps ------------------------------------------------------------------------------

    def _apply_cancels_and_timeouts(self) -> None:
        ids = list(self.slots)
        if not ids:
            return
        flagged = self.connection.smismember(keys.CANCEL_REQUESTS, ids)
        current = time.monotonic()
        for job_id, cancel_requested in zip(ids, flagged):
            slot = self.slots[job_id]
            if slot.cancel_sent:
                continue
            if current > slot.deadline:
                slot.timed_out = True
            if cancel_requested or slot.timed_out:
                slot.cancel_sent = True
                self.engine.cancel(job_id)

    def _publish(self, outputs: list[StepOutput]) -> None:
        finished: list[StepOutput] = []
        current = time.monotonic()
        with self.connection.pipeline(transaction=False) as pipe:
            for out in outputs:
                slot = self.slots.get(out.seq_id)
                if slot is None:
                    continue
                slot.completion_tokens = out.completion_tokens
                if out.text:
                    slot.text += out.text
                    pipe.xadd(
                        keys.events(out.seq_id),
                        {"event": EVENT_TOKEN, "data": event_data({"index": slot.token_events, "text": out.text})},
                        maxlen=slot.max_new_tokens + 16,
                        approximate=True,
                    )
                    slot.token_events += 1
                if out.finish_reason or out.error:
                    finished.append(out)
                elif out.text and current - slot.partial_written_at >= PARTIAL_OUTPUT_EVERY_S:
                    slot.partial_written_at = current
                    pipe.hset(keys.job(out.seq_id), "output", slot.output().model_dump_json())
            pipe.execute()
        for out in finished:
            self._finish_output(out)

    def _finish_output(self, out: StepOutput) -> None:
        slot = self.slots[out.seq_id]
        if out.error:
            error_type, _, message = out.error.partition(": ")
            self._end(out.seq_id, JobStatus.failed, error=JobError(type=error_type, message=message or out.error))
        elif slot.timed_out:
            message = f"job ran past its timeout of {slot.rq_job.timeout} s"
            self._end(out.seq_id, JobStatus.failed, output=slot.output(FinishReason.canceled),
                      error=JobError(type="timeout", message=message))
        elif out.finish_reason == FinishReason.canceled.value:
            self._end(out.seq_id, JobStatus.canceled, output=slot.output(FinishReason.canceled))
        else:
            self._end(out.seq_id, JobStatus.succeeded, output=slot.output(FinishReason(out.finish_reason)))

    # ---- ending a job ----------------------------------------------------------------------------------------

    def _end(self, job_id: str, status: JobStatus, output: JobOutput | None = None, error: JobError | None = None):
        slot = self.slots.pop(job_id)
        outcome = self._finish(
            keys=[keys.job(job_id), keys.events(job_id), keys.CANCEL_REQUESTS, keys.RUNNING],
            args=[
                status.value,
                utc_now().isoformat(),
                output.model_dump_json() if output else "",
                error.model_dump_json() if error else "",
                self.settings.result_ttl_s,
                job_id,
                self.name,
            ],
        )
        job, queue = slot.rq_job, slot.queue
        self.execution = slot.execution
        if outcome != b"finished":
            # This worker stalled and the job was taken back (re-queued or failed) meanwhile: RQ's registries
            # already follow the record, so only this worker's execution is closed.
            logger.warning("job %s was taken from this worker (%s); dropping its result", job_id, outcome.decode())
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe)
                pipe.execute()
        elif status is JobStatus.succeeded:
            self.handle_execution_ended(job, queue, job.success_callback_timeout)
            job._result = output.model_dump(mode="json") if output else None
            job._status = "finished"
            self.handle_job_success(job=job, queue=queue, started_job_registry=queue.started_job_registry)
        elif status is JobStatus.failed:
            self.handle_execution_ended(job, queue, job.failure_callback_timeout)
            self.handle_job_failure(
                job=job, queue=queue, started_job_registry=queue.started_job_registry,
                exc_string=f"{error.type}: {error.message}" if error else "failed",
            )
        else:
            self.handle_execution_ended(job, queue, job.failure_callback_timeout)
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe)
                job.cancel(pipeline=pipe)
                pipe.execute()
        self._point_worker_at_running_job()
        logger.info("job %s %s (%d tokens)", job_id, status.value, slot.completion_tokens,
                    extra={"job_id": job_id, "request_id": slot.request_id})

    def _point_worker_at_running_job(self) -> None:
        """RQ's worker hash has one current job; while others still run, show one of them."""
        if self.slots:
            self.execution = next(iter(self.slots.values())).execution
            self.set_current_job_id(next(iter(self.slots)))
            self.set_state(WorkerStatus.BUSY)
        else:
            self.execution = None

    def _maintain_rq_heartbeats(self) -> None:
        current = time.monotonic()
        if current - self._rq_heartbeat_at < self.settings.rq_heartbeat_s or not self.slots:
            return
        self._rq_heartbeat_at = current
        with self.connection.pipeline() as pipe:
            self.heartbeat(pipeline=pipe)
            for slot in self.slots.values():
                ttl = int(self.get_heartbeat_ttl(slot.rq_job))
                slot.execution.heartbeat(slot.queue.started_job_registry, ttl, pipeline=pipe)
                slot.rq_job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
            pipe.execute()


class _JobRefused(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
