"""An RQ worker that runs many jobs in one continuous batch.

RQ pops one job id at a time, so batching lives here: `execute_job` admits the popped job, then keeps
claiming more with non-blocking dequeues between decoding steps while the engine has free slots. Each job
still goes through RQ's own bookkeeping (execution, started/finished/failed/canceled registries, results),
so `rq info` shows the truth; RQ 2.x keeps one `worker.execution`, which is swapped in per job.

Redis may go away (a restart, a failover) while a batch runs: every write the batch needs is retried until
Redis answers again, for up to REDIS_OUTAGE_TOLERANCE_S, with decoding paused meanwhile, so no token is
dropped and no job event or state is written twice (the job-state scripts are idempotent; RQ's own bookkeeping,
retried the same way, is not, and may record a result twice after a lost reply). Past that the worker exits non-zero;
its supervisor restarts it and the lost-worker sweep re-queues the jobs.

SIGTERM (RQ's warm shutdown) stops claiming; the running jobs finish within DRAIN_TIMEOUT_S, and those still
running then are handed back to the queue (their attempt not counted) for another worker.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis.exceptions
from pydantic import ValidationError
from rq import Queue
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from llamaq_protocol import FinishReason, JobError, JobOutput, JobPayload, JobStatus, Usage, utc_now
from llamaq_protocol import keys
from llamaq_protocol.records import (
    CLAIM_SCRIPT,
    FINISH_SCRIPT,
    RECLAIM_SCRIPT,
    TOKENS_SCRIPT,
    end_keys,
    event_data,
    reclaim_keys,
)

from .metrics import WorkerMetrics, seconds_since
from .sequences import SamplingParams, StepOutput
from .settings import WorkerSettings

if TYPE_CHECKING:
    from .echo_engine import EchoEngine
    from .engine import Engine

logger = logging.getLogger(__name__)

# Partial output in the job record is refreshed at most this often; the event stream gets every token.
PARTIAL_OUTPUT_EVERY_S = 0.25
# What a Redis restart or a dropped connection raises (redis-py has already retried a few times by then).
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# Longest pause between two tries while Redis is away.
REDIS_RETRY_MAX_S = 1.0


@dataclass
class Ending:
    """How a job ended on this worker, fixed once so that every try of its finish sends the same arguments."""

    status: JobStatus
    output: JobOutput | None = None
    error: JobError | None = None
    finished_at: str = field(default_factory=lambda: utc_now().isoformat())


class RedisOutageTooLong(Exception):
    """Redis stayed away longer than REDIS_OUTAGE_TOLERANCE_S: exit, and let the sweep re-queue the jobs."""


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
    partial_written_at: float = 0.0
    cancel_sent: bool = False
    timed_out: bool = False
    # The job was taken from this worker (re-queued or ended by someone else): generation stops, nothing is written.
    lost: bool = False

    def output(self, finish_reason: FinishReason | None = None) -> JobOutput:
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        return JobOutput(text=self.text, finish_reason=finish_reason, usage=usage)


class BatchWorker(SimpleWorker):
    # RQ's idle loop retries a lost Redis with growing pauses up to this (its default, 60 s, would leave a worker
    # idle for up to a minute after Redis is back).
    max_connection_wait_time = 5.0
    # What set_state last wrote, and when the last plain heartbeat went out (class attributes: RQ's __init__
    # already calls both).
    _state_written: str | None = None
    _plain_heartbeat_at = float("-inf")

    def __init__(
        self, queues, *, engine: Engine | EchoEngine, settings: WorkerSettings, metrics: WorkerMetrics, **kwargs
    ):
        super().__init__(queues, **kwargs)
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.slots: dict[str, Slot] = {}
        self._claim = self.connection.register_script(CLAIM_SCRIPT)
        self._finish = self.connection.register_script(FINISH_SCRIPT)
        self._reclaim = self.connection.register_script(RECLAIM_SCRIPT)
        self._tokens = self.connection.register_script(TOKENS_SCRIPT)
        self._rq_heartbeat_at = 0.0
        self._outage_since: float | None = None
        self._in_batch = False
        self._drain_deadline = float("inf")
        # Set by SIGTERM/SIGINT; the process exits 0 only after such a stop, with no job abandoned.
        self.shutdown_signalled = False
        self.gave_up = False

    # ---- the batch loop --------------------------------------------------------------------------------------

    def execute_job(self, job: RQJob, queue: Queue):
        if job.func_name != keys.GENERATE_FUNC:
            return super().execute_job(job, queue)
        self._in_batch = True
        try:
            self._admit(job, queue)
            while self.slots:
                if self._stop_requested and time.monotonic() >= self._drain_deadline:
                    self._hand_back_all()
                    break
                self._claim_more()
                self._apply_cancels_and_timeouts()
                self.metrics.batch_size.observe(len(self.slots))
                self.metrics.jobs_in_batch.set(len(self.slots))
                outputs = self.engine.step()
                self._publish(outputs)
                self._maintain_rq_heartbeats()
        except RedisOutageTooLong:
            self.gave_up = True
            raise
        finally:
            self._in_batch = False
            self.metrics.jobs_in_batch.set(len(self.slots))
        self.set_state(WorkerStatus.IDLE)

    def _claim_more(self) -> None:
        while self.engine.free_slots > 0 and not self._stop_requested:
            try:
                popped = Queue.dequeue_any(
                    self._ordered_queues, None, connection=self.connection, job_class=self.job_class,
                    serializer=self.serializer,
                )
            except REDIS_DOWN:
                return  # nothing popped; the publishing below waits for Redis
            if popped is None:
                return
            job, queue = popped
            if job.id in self.slots:
                # Re-queued while its earlier attempt, taken from this worker, is still leaving the engine: put it
                # back at the front and claim it after the next step.
                self._until_redis("returning a job", self._push_back, job, queue)
                return
            if job.func_name != keys.GENERATE_FUNC:
                # Not ours to batch: run it now, in line, as a plain SimpleWorker would.
                super().execute_job(job, queue)
                continue
            self._admit(job, queue)

    def _push_back(self, job: RQJob, queue: Queue) -> None:
        with self.connection.pipeline() as pipe:
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            queue.push_job_id(job.id, pipeline=pipe, at_front=True)
            pipe.execute()

    # ---- admitting a job -------------------------------------------------------------------------------------

    def _admit(self, job: RQJob, queue: Queue) -> None:
        # The job is popped: from here on Redis is waited for rather than the job dropped.
        claimed = self._until_redis(
            "claiming a job", self._claim,
            keys=[keys.job(job.id), keys.events(job.id), keys.RUNNING],
            args=[utc_now().isoformat(), self.name, job.id],
        )
        if claimed != b"claimed":
            # Canceled while queued (or its record expired): close the RQ job without running it.
            logger.info("skipping job %s: record is %s", job.id, claimed.decode())

            def close() -> None:
                with self.connection.pipeline() as pipe:
                    pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                    job.cancel(pipeline=pipe)
                    pipe.execute()

            self._until_redis("closing a skipped job", close)
            return

        self._until_redis("starting a job", self._start_in_rq, job, queue)
        job.started_at = now()
        timeout = job.timeout if job.timeout and job.timeout > 0 else self.queue_class.DEFAULT_TIMEOUT
        slot = Slot(
            rq_job=job, queue=queue, execution=self.execution, request_id=None, prompt_tokens=0,
            max_new_tokens=0, deadline=time.monotonic() + timeout, waited_s=seconds_since(job.enqueued_at),
        )
        self.slots[job.id] = slot
        if slot.waited_s is not None:
            self.metrics.queue_wait.observe(slot.waited_s)
        try:
            payload = JobPayload.model_validate(job.args[0] if job.args else None)
            slot.request_id = payload.request_id
            params = payload.params
            if self.settings.log_prompts:
                logger.info("job %s prompt", job.id, extra={"job_id": job.id, "request_id": slot.request_id,
                                                            "messages": json.dumps(params.chat_messages())})
            prompt_ids = self.engine.encode_chat(params.chat_messages())
            slot.prompt_tokens = len(prompt_ids)
            self.metrics.prompt_tokens.inc(len(prompt_ids))
            slot.max_new_tokens = params.max_new_tokens
            if len(prompt_ids) + params.max_new_tokens > self.engine.context_length:
                raise _JobRefused(
                    "prompt_too_long",
                    f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                    f"the model's context of {self.engine.context_length}",
                )
            self.engine.add(job.id, prompt_ids, self._sampling(params))
        except ValidationError as exc:
            self._end(job.id, Ending(JobStatus.failed, error=JobError(type="invalid_payload", message=str(exc))))
            return
        except _JobRefused as exc:
            self._end(job.id, Ending(JobStatus.failed, error=JobError(type=exc.error_type, message=exc.message)))
            return
        except Exception as exc:  # a bad job must never take the worker down
            logger.exception("job %s could not start", job.id)
            self._end(job.id, Ending(JobStatus.failed, error=JobError(type="internal_error", message=str(exc))))
            return
        logger.info("job %s admitted (%d prompt tokens, batch %d)", job.id, slot.prompt_tokens, len(self.slots),
                    extra={"job_id": job.id, "request_id": slot.request_id})

    def _start_in_rq(self, job: RQJob, queue: Queue) -> None:
        """What RQ's `prepare_execution` and `prepare_job_execution` write (rq 2.x), in one transaction instead of
        two, before the job's first step: its execution record and place in the started registry, the worker busy
        on it, the job started, and the job out of the intermediate queue."""
        heartbeat_ttl = self.get_heartbeat_ttl(job)
        with self.connection.pipeline() as pipe:
            self.execution = Execution.create(job, heartbeat_ttl, pipeline=pipe, worker_name=self.name)
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self.set_current_job_id(job.id, pipeline=pipe)
            self.set_current_job_working_time(0, pipeline=pipe)
            self.heartbeat(heartbeat_ttl, pipeline=pipe)
            job.heartbeat(now(), heartbeat_ttl, pipeline=pipe)
            job.prepare_for_execution(self.name, pipeline=pipe)
            if len(self.queues) == 1:
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.execute()

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
        try:
            flagged = self.connection.smismember(keys.CANCEL_REQUESTS, ids)
        except REDIS_DOWN:
            flagged = [0] * len(ids)  # nobody can ask for a cancel while Redis is away; timeouts still apply
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
        for out in outputs:
            slot = self.slots.get(out.seq_id)
            if slot is None:
                continue
            if out.completion_tokens > slot.completion_tokens:
                if slot.completion_tokens == 0 and slot.waited_s is not None:
                    self.metrics.first_token.observe(slot.waited_s + time.monotonic() - slot.admitted_at)
                self.metrics.generated_tokens.inc(out.completion_tokens - slot.completion_tokens)
            slot.completion_tokens = out.completion_tokens
            if out.text and not slot.lost:
                slot.text += out.text
                slot.unpublished.append(event_data({"index": slot.token_events, "text": out.text}))
                slot.token_events += 1
            if out.finish_reason or out.error:
                finished.append(out)
        endings = {out.seq_id: self._ending(self.slots[out.seq_id], out) for out in finished}
        # While Redis is away decoding waits here, holding the tokens, rather than running on and dropping them.
        outcomes = self._until_redis("publishing tokens", self._write_tokens, endings)
        for job_id, ending in endings.items():
            self._end(job_id, ending, outcome=outcomes[job_id])

    def _write_tokens(self, endings: dict[str, Ending]) -> dict[str, bytes]:
        """Every slot's unpublished token events, then the finish of every job that ended in this step, in one round
        trip (so a waiting client wakes once); returns each finish's outcome. TOKENS_SCRIPT skips events already
        written and FINISH_SCRIPT recognises a finish already done, so a retry after a lost reply is harmless."""
        pending = [(job_id, slot) for job_id, slot in self.slots.items() if slot.unpublished and not slot.lost]
        if not pending and not endings:
            return {}
        current = time.monotonic()
        partial = {
            job_id: slot.output().model_dump_json()
            for job_id, slot in pending
            if job_id not in endings and current - slot.partial_written_at >= PARTIAL_OUTPUT_EVERY_S
        }

        def send() -> list:
            with self.connection.pipeline(transaction=False) as pipe:
                for job_id, slot in pending:
                    pipe.evalsha(
                        self._tokens.sha, 2, keys.job(job_id), keys.events(job_id),
                        self.name, slot.token_events - len(slot.unpublished), slot.max_new_tokens + 16,
                        partial.get(job_id, ""), *slot.unpublished,
                    )
                for job_id, ending in endings.items():
                    pipe.evalsha(self._finish.sha, len(end_keys(job_id)), *end_keys(job_id),
                                 *self._finish_args(job_id, ending))
                return pipe.execute()

        try:
            replies = send()
        except redis.exceptions.NoScriptError:
            # A restarted Redis has an empty script cache.
            self.connection.script_load(TOKENS_SCRIPT)
            self.connection.script_load(FINISH_SCRIPT)
            replies = send()
        written, finished = replies[:len(pending)], replies[len(pending):]
        for (job_id, slot), count in zip(pending, written):
            if count < 0:
                self._drop_lost(job_id, slot)
                continue
            slot.unpublished.clear()
            if job_id in partial:
                slot.partial_written_at = current
        return dict(zip(endings, finished))

    def _drop_lost(self, job_id: str, slot: Slot) -> None:
        """The job is no longer this worker's (the sweep re-queued it while this worker was cut off): stop it."""
        logger.warning("job %s was taken from this worker; stopping it", job_id, extra={"job_id": job_id})
        slot.lost = True
        slot.unpublished.clear()
        if not slot.cancel_sent:
            slot.cancel_sent = True
            self.engine.cancel(job_id)

    @staticmethod
    def _ending(slot: Slot, out: StepOutput) -> Ending:
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

    # ---- ending a job ----------------------------------------------------------------------------------------

    def _finish_args(self, job_id: str, ending: Ending) -> list:
        return [
            ending.status.value,
            ending.finished_at,
            ending.output.model_dump_json() if ending.output else "",
            ending.error.model_dump_json() if ending.error else "",
            self.settings.result_ttl_s,
            job_id,
            self.name,
        ]

    def _end(self, job_id: str, ending: Ending, outcome: bytes | None = None):
        """Close a job that ended: its record (unless `outcome` says the finish script already ran), RQ's
        registries, the metrics and the log."""
        slot = self.slots.pop(job_id)
        status, output, error = ending.status, ending.output, ending.error
        if outcome is None:
            # The same arguments on every try (one finished_at): a finish retried after a lost reply is recognised.
            outcome = self._until_redis("finishing a job", self._finish, keys=end_keys(job_id),
                                        args=self._finish_args(job_id, ending))
        job, queue = slot.rq_job, slot.queue
        self.execution = slot.execution
        if outcome != b"finished":
            # This worker stalled and the job was taken back (re-queued or failed) meanwhile: RQ's registries
            # already follow the record, so only this worker's execution is closed.
            logger.warning("job %s was taken from this worker (%s); dropping its result", job_id, outcome.decode())
            self._until_redis("closing a job", self._close_execution, job)
        else:
            self._until_redis("closing a job", self._record_in_rq, job, queue, status, output, error)
        self._point_worker_at_running_job()
        self.metrics.run_time.observe(time.monotonic() - slot.admitted_at)
        logger.info("job %s %s (%d tokens)", job_id, status.value, slot.completion_tokens,
                    extra={"job_id": job_id, "request_id": slot.request_id, "status": status.value,
                           "completion_tokens": slot.completion_tokens})

    def _close_execution(self, job: RQJob) -> None:
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe)
            pipe.execute()

    def _record_in_rq(
        self, job: RQJob, queue: Queue, status: JobStatus, output: JobOutput | None, error: JobError | None
    ) -> None:
        """RQ's registries and result for a job this worker finished."""
        if status is JobStatus.succeeded:
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

    def _point_worker_at_running_job(self) -> None:
        """RQ's worker hash has one current job; while others still run, show one of them."""
        if self.slots:
            self.execution = next(iter(self.slots.values())).execution
            self.set_state(WorkerStatus.BUSY)
            try:
                self.set_current_job_id(next(iter(self.slots)))
            except REDIS_DOWN:
                pass  # display only
        else:
            self.execution = None

    def _maintain_rq_heartbeats(self) -> None:
        current = time.monotonic()
        if current - self._rq_heartbeat_at < self.settings.rq_heartbeat_s or not self.slots:
            return
        self._rq_heartbeat_at = current
        try:
            with self.connection.pipeline() as pipe:
                self.heartbeat(pipeline=pipe)
                for slot in self.slots.values():
                    ttl = int(self.get_heartbeat_ttl(slot.rq_job))
                    slot.execution.heartbeat(slot.queue.started_job_registry, ttl, pipeline=pipe)
                    slot.rq_job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
                pipe.execute()
        except REDIS_DOWN:
            # Their TTLs (job_timeout + 60 s) outlast an outage the worker survives; try again next round.
            self._rq_heartbeat_at = current - self.settings.rq_heartbeat_s + 1.0

    # ---- Redis outages ---------------------------------------------------------------------------------------

    def _until_redis(self, what: str, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, tried again while Redis is unreachable; after REDIS_OUTAGE_TOLERANCE_S of one
        outage, RedisOutageTooLong. `fn` must be safe to repeat (the job-state scripts are)."""
        pause = 0.05
        while True:
            try:
                result = fn(*args, **kwargs)
            except REDIS_DOWN as exc:
                current = time.monotonic()
                tolerance = self.settings.redis_outage_tolerance_s
                if self._outage_since is None:
                    self._outage_since = current
                    logger.warning("Redis unreachable while %s (%s); holding %d running job(s), decoding paused, "
                                   "retrying for up to %.0f s", what, exc, len(self.slots), tolerance)
                elif current - self._outage_since > tolerance:
                    logger.error("Redis unreachable for %.0f s (over REDIS_OUTAGE_TOLERANCE_S); exiting so the "
                                 "jobs are re-queued", current - self._outage_since)
                    raise RedisOutageTooLong(f"Redis unreachable for over {tolerance:.0f} s") from exc
                time.sleep(pause)
                pause = min(pause * 2, REDIS_RETRY_MAX_S)
                continue
            if self._outage_since is not None:
                logger.warning("Redis is back after %.1f s; resuming %d job(s)",
                               time.monotonic() - self._outage_since, len(self.slots))
                self._outage_since = None
            return result

    # RQ's own loop (idle, between batches) survives Redis outages by itself only while it waits in its dequeue;
    # these make the calls around that wait tolerate them too, instead of ending work() ("unhandled exception").
    # RQ also writes the worker's state and heartbeat several times around every job, each its own round trip on
    # the job's critical path: a state write that changes nothing is skipped, and plain heartbeats (they only push
    # back a TTL of minutes) are kept to one a second.

    def set_state(self, state: str, pipeline=None):
        if pipeline is not None:
            self._state_written = state
            return super().set_state(state, pipeline=pipeline)
        if state == self._state_written:
            self._state = state
            return
        try:
            super().set_state(state)
            self._state_written = state
        except REDIS_DOWN:
            self._state = state  # display only in Redis; the local state is what RQ's shutdown reads

    def heartbeat(self, timeout: int | None = None, pipeline=None):
        if pipeline is not None:
            return super().heartbeat(timeout, pipeline=pipeline)
        if timeout is None and time.monotonic() - self._plain_heartbeat_at < 1.0:
            return
        try:
            super().heartbeat(timeout)
            self._plain_heartbeat_at = time.monotonic()
        except REDIS_DOWN as exc:
            logger.debug("RQ worker heartbeat skipped: %s", exc)

    def check_for_suspension(self, burst: bool):
        try:
            super().check_for_suspension(burst)
        except REDIS_DOWN:
            pass  # the dequeue that follows waits for Redis

    def run_maintenance_tasks(self):
        try:
            super().run_maintenance_tasks()
        except REDIS_DOWN as exc:
            logger.warning("RQ maintenance skipped, Redis unreachable: %s", exc)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        # RQ retries ConnectionError here itself, but ends work() on a TimeoutError.
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except redis.exceptions.TimeoutError as exc:
                logger.warning("Redis timed out while idle (%s); retrying", exc)
                time.sleep(REDIS_RETRY_MAX_S)

    # ---- SIGTERM: drain, then hand back ----------------------------------------------------------------------

    def request_stop(self, signum, frame):
        self.shutdown_signalled = True
        super().request_stop(signum, frame)

    def _shutdown(self):
        """Warm shutdown. RQ raises StopRequested at once when the worker is not BUSY, which would break a batch
        that is between two jobs' bookkeeping; inside a batch, stop claiming and let the batch drain instead."""
        if not self._in_batch:
            return super()._shutdown()
        self._stop_requested = True
        self._drain_deadline = time.monotonic() + self.settings.drain_timeout_s
        logger.warning("stop requested: claiming no more jobs; %d running job(s) get %.0f s to finish, then go "
                       "back to the queue", len(self.slots), self.settings.drain_timeout_s)

    def _hand_back_all(self) -> None:
        """The drain time is over: put every running job back on the queue, its attempt not counted."""
        for job_id in list(self.slots):
            slot = self.slots.pop(job_id)
            self.engine.cancel(job_id)
            # RQ's execution closed first, so a worker that takes the job back at once is not disturbed by it.
            self.execution = slot.execution
            self._until_redis("handing a job back", self._close_execution, slot.rq_job)
            outcome = self._until_redis(
                "handing a job back", self._reclaim,
                keys=reclaim_keys(job_id, slot.queue.key, slot.rq_job.key),
                args=[self.name, 0, utc_now().isoformat(), "", self.settings.result_ttl_s, job_id, "handback"],
            )
            outcome = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
            if outcome == "canceled":
                self._until_redis("handing a job back", slot.rq_job.cancel)
            logger.warning("job %s handed back (%s) after %d tokens: not finished within DRAIN_TIMEOUT_S", job_id,
                           outcome, slot.completion_tokens, extra={"job_id": job_id, "request_id": slot.request_id})
        self.execution = None

    def _close_execution(self, job: RQJob) -> None:
        """RQ's side of a hand-back: this worker's execution of the job closed (the script re-queues the job)."""
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe)
            pipe.execute()


class _JobRefused(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
