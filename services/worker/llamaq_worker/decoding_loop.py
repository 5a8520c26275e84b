"""The worker's decoding loop: an RQ worker that runs many jobs in one continuous batch.

RQ pops one job id at a time, so batching lives here: `execute_job` admits the popped job, then keeps claiming
more with non-blocking dequeues between decoding steps while the engine has free slots. Between steps it applies
cancels and timeouts, runs one `engine.step()`, publishes what it made and keeps RQ's heartbeats. The engine is
any `engines.base.Engine`; the rest lives beside this module:

Interactive first, in the engine too: batch-tier jobs (batch, and work over its key's limits) are claimed only while
fewer than MAX_BATCH sequences run and the engine has room (few sequences waiting in it, its KV cache below
BATCH_CLAIM_MAX_KV), so queued batch work waits in the fair queue, fair-shared and cancelable, not in the engine;
at most BATCH_CLAIM_PER_STEP of them start per engine step, so a backlog's refill never makes one long prefill step
that an arriving interactive job must wait out.
Interactive jobs may also take the engine's INTERACTIVE_HEADROOM beyond MAX_BATCH, in place of the batch work it
holds: one is claimed at once even while batch work fills the batch, and the engine runs it first (it preempts a batch
sequence, or vLLM schedules it at its next step).

- `claiming`: where a job is claimed and admitted (its record, RQ's start, payload, prompt, sampling parameters);
- `publishing`: where tokens are written (token events, finishes, lost jobs) and Redis outages waited out;
- `slots`: a running job (`Slot`) and how it ended (`Ending`);
- `rq_bookkeeping`: RQ's registries, results and heartbeats, so `rq info` shows the truth;
- `rq_adapter`: the only module that knows RQ's internals (`RQWorker`, this class's base, names RQ's private worker
  state; `RQOps` does what the batch does in RQ on the worker's behalf).

Redis may go away while a batch runs: every write the batch needs is retried until Redis answers again, for up
to REDIS_OUTAGE_TOLERANCE_S, with decoding paused meanwhile (the job-state scripts are idempotent; RQ's own
bookkeeping, retried the same way, is not, and may record a result twice after a lost reply). Past that the
worker exits non-zero; its supervisor restarts it and the lost-worker sweep re-queues the jobs.

An engine that dies (`step` raises EngineDead) takes the worker with it: every running job goes back on the queue
at once, its attempt counted as a lost worker's is (past JOB_RETRIES it fails as worker_lost), and the worker
exits non-zero for its supervisor to restart it.

SIGTERM (RQ's warm shutdown) stops claiming; the running jobs finish within DRAIN_TIMEOUT_S, and those still
running then are handed back to the queue (their attempt not counted) for another worker.
"""

from __future__ import annotations

import logging
import threading
import time

import redis.exceptions
from rq import Queue
from rq.job import Job as RQJob
from rq.worker import WorkerStatus

from llamaq_protocol import JobError, keys, utc_now
from llamaq_protocol.records import RECLAIM_SCRIPT, reclaim_keys

from .claiming import Claimer
from .engines.base import PRIORITY_BATCH, PRIORITY_INTERACTIVE, Engine, EngineDead
from .metrics import WorkerMetrics
from .publishing import REDIS_DOWN, REDIS_RETRY_MAX_S, Publisher, RedisOutageTooLong, RedisRetry
from .rq_adapter import RQOps, RQWorker
from .rq_bookkeeping import RQBookkeeping
from .settings import WorkerSettings
from .slots import Ending, Slot

logger = logging.getLogger(__name__)


def _func_name(job: RQJob) -> str:
    """The job's function's dotted path, or what made it unreadable (its data did not deserialize)."""
    try:
        return str(job.func_name)
    except Exception as exc:  # anything Redis held under the job's key
        return f"<unreadable: {type(exc).__name__}>"


def _runs_generate(job: RQJob) -> bool:
    """Whether the job runs llamaq's job function, the only one this worker runs."""
    return _func_name(job) == keys.GENERATE_FUNC


# Most time RQ's pubsub teardown may take when the worker stops (see DecodingWorker.unsubscribe).
UNSUBSCRIBE_WAIT_S = 5.0


class DecodingWorker(RQWorker):
    # RQ's idle loop retries a lost Redis with growing pauses up to this (its default, 60 s, would leave a worker
    # idle for up to a minute after Redis is back).
    max_connection_wait_time = 5.0
    # What set_state last wrote, and when the last plain heartbeat went out (class attributes: RQ's __init__
    # already calls both).
    _state_written: str | None = None
    _plain_heartbeat_at = float("-inf")
    # Monotonic time the decoding loop last started a step: the heartbeat stops once it is STEP_STALL_S old while the
    # loop holds jobs (presence.batch_stall_s).
    progress_at = float("inf")

    def __init__(self, queues, *, engine: Engine, settings: WorkerSettings, metrics: WorkerMetrics,
                 tool_parser: type | None = None, **kwargs):
        super().__init__(queues, **kwargs)
        self.engine = engine
        # vLLM's tool parser class for tool_choice "auto" (tool_calls.load_tool_parser); None: no tool calling.
        self.tool_parser = tool_parser
        self.settings = settings
        self.metrics = metrics
        self.slots: dict[str, Slot] = {}
        self.until_redis = RedisRetry(settings.redis_outage_tolerance_s, lambda: len(self.slots))
        # What the batch does in RQ on this worker's behalf (rq_adapter): claiming and the bookkeeping get this, not
        # the worker.
        self.rq = RQOps(self)
        self.claimer = Claimer(
            self.connection, self.name, self.rq, engine=engine, settings=settings, metrics=metrics,
            until_redis=self.until_redis, tool_parser=tool_parser, stop_generating=self.stop_generating,
        )
        self.publisher = Publisher(
            self.connection, self.name, self.slots, settings=settings, metrics=metrics, until_redis=self.until_redis,
            stop_generating=self.stop_generating,
        )
        self.bookkeeping = RQBookkeeping(self.rq, self.slots, settings=settings, until_redis=self.until_redis)
        self._reclaim = self.connection.register_script(RECLAIM_SCRIPT)
        self._decoding = False
        # Engine steps (the engine's count, else this loop's) and the batch-tier jobs started at the latest one.
        self._loop_steps = 0
        self._claims_step, self._batch_claimed = -1, 0
        self._drain_deadline = float("inf")
        # Set by SIGTERM/SIGINT; the process exits 0 only after such a stop, with no job abandoned.
        self.shutdown_signalled = False
        # Set when the worker must exit non-zero (Redis away too long, the engine dead).
        self.gave_up = False

    # ---- the decoding loop --------------------------------------------------------------------------------------

    def execute_job(self, job: RQJob, queue: Queue):
        if not _runs_generate(job):
            return self._refuse(job, queue)
        self._decoding = True
        self.progress_at = time.monotonic()
        try:
            self._admit(job, queue)
            while self.slots:
                self.progress_at = time.monotonic()
                if self.stop_requested and time.monotonic() >= self._drain_deadline:
                    self._give_back_all(engine_dead=None)
                    break
                self._start_waiting_choices()
                self._claim_more()
                self._apply_cancels_and_timeouts()
                self.metrics.batch_size.observe(len(self.slots))
                self.metrics.jobs_running.set(len(self.slots))
                self._loop_steps += 1
                outputs = self.engine.step()
                for job_id, (ending, outcome) in self.publisher.publish(outputs).items():
                    self._end(job_id, ending, outcome)
                self.bookkeeping.maintain_heartbeats()
        except RedisOutageTooLong:
            self.gave_up = True
            raise
        except EngineDead as exc:
            self.gave_up = True
            logger.error("the engine died (%s): %d running job(s) go back on the queue, their attempt counted; "
                         "exiting", exc, len(self.slots))
            self._give_back_all(engine_dead=exc)
            raise
        finally:
            self._decoding = False
            self.metrics.jobs_running.set(len(self.slots))
        self.set_state(WorkerStatus.IDLE)

    def _start_waiting_choices(self) -> None:
        """The later choices of running jobs (`n` > 1) that found no free slot at admission, while there is room for
        their priority: they go before any new job of it, interactive jobs' first."""
        for job_id, slot in sorted(self.slots.items(), key=lambda item: item[1].priority):
            while slot.waiting and self.engine.free_slots_for(slot.priority) > 0:
                self.claimer.start_choice(job_id, slot, *slot.waiting.pop(0))

    def _claim_more(self) -> None:
        # Choices still waiting for a slot go first: no job of their priority (or lower) is claimed before they start.
        waiting = min((slot.priority for slot in self.slots.values() if slot.waiting), default=None)
        if waiting is not None and waiting <= PRIORITY_INTERACTIVE:
            return
        while not self.stop_requested:
            room = self._room(batch=waiting is None and self._batch_claims_left() > 0)
            if room is None:
                return
            popped = self.claimer.pop(interactive_only=not room)
            if popped is None:
                return
            job, queue = popped
            if job.id in self.slots:
                # Re-queued while its earlier attempt, taken from this worker, is still leaving the engine: put it
                # back at the front and claim it after the next step.
                self.until_redis("returning a job", self.claimer.push_back, job, queue)
                return
            if not _runs_generate(job):
                self._refuse(job, queue)
                continue
            slot = self._admit(job, queue)
            if slot is not None and slot.priority > PRIORITY_INTERACTIVE:
                self._batch_claimed += 1

    def _batch_claims_left(self) -> int:
        """Batch-tier jobs that may still start at the engine's current step. Jobs started together prefill together:
        a backlog's refill handed over at once makes one long prefill step, and an interactive job that arrives then
        waits for it (vLLM steps apart from this loop, and cannot cut a step short), so at most BATCH_CLAIM_PER_STEP
        start per engine step. Interactive jobs are not counted."""
        stats = self.engine.stats
        step = stats.steps if stats is not None else self._loop_steps
        if step != self._claims_step:
            self._claims_step, self._batch_claimed = step, 0
        return self.settings.batch_claims_per_step - self._batch_claimed

    def _room(self, batch: bool = True) -> bool | None:
        """What the engine has room for now: any job (True), interactive jobs only (False), or none (None). A
        batch-tier job needs one of the MAX_BATCH slots and an engine with room (it says so in its stats: few
        sequences waiting in it, its KV cache below BATCH_CLAIM_MAX_KV); an interactive job may also take the
        headroom. (`batch`: False while choices of a batch-tier job wait for slots.)"""
        engine, settings = self.engine, self.settings
        if batch and engine.free_slots_for(PRIORITY_BATCH) > 0:
            stats = engine.stats
            if stats is None or (stats.waiting <= settings.batch_claim_max_waiting
                                 and stats.kv_cache_usage < settings.batch_claim_max_kv):
                return True
        if engine.free_slots_for(PRIORITY_INTERACTIVE) > 0:
            return False
        return None

    def _refuse(self, job: RQJob, queue: Queue) -> None:
        """A popped job whose function is not llamaq's (GENERATE_FUNC) fails without running: whoever can write to
        Redis must not be able to run code here. Off its intermediate list, into RQ's failed registry of `queue`
        with the reason as its exc_string (`rq info`, the job's latest result)."""
        func = _func_name(job)
        reason = (f"refused without running: this worker runs only {keys.GENERATE_FUNC}, and this job's function is "
                  f"{func!r}")
        logger.error("job %s refused without running it: its function %r is not llamaq's %s (queued by someone "
                     "who can write to Redis?)", job.id, func, keys.GENERATE_FUNC, extra={"job_id": job.id})
        self.until_redis("failing a refused job", self.rq.fail_without_running, job, queue, reason)

    def _admit(self, job: RQJob, queue: Queue) -> Slot | None:
        """The popped job claimed and handed to the engine; its slot, or None when it did not reach the engine (its
        record said not to run it, or it failed at admission)."""
        slot = self.claimer.claim(job, queue)
        if slot is None:
            return None
        self.slots[job.id] = slot
        ending = self.claimer.admit(job, slot)
        if ending is not None:
            self._end(job.id, ending)
            return None
        logger.info("job %s admitted (%d prompt tokens, batch %d)", job.id, slot.prompt_tokens, len(self.slots),
                    extra={"job_id": job.id, "request_id": slot.request_id})
        return slot

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
                self.stop_generating(job_id, slot)

    def stop_generating(self, job_id: str, slot: Slot) -> None:
        """The job's sequences canceled in the engine (once); their last outputs come with a later step. Choices
        still waiting for a slot never start."""
        if not slot.cancel_sent:
            slot.cancel_sent = True
            for index, _, _ in slot.waiting:
                slot.choices[index].finish_reason = "canceled"
            slot.waiting.clear()
            for sequence in slot.running_sequences(job_id):
                self.engine.cancel(sequence)

    def _end(self, job_id: str, ending: Ending, outcome: bytes | None = None) -> None:
        """Close a job that ended: its record (unless `outcome` says the finish script already ran), RQ's
        registries, the metrics and the log."""
        slot = self.slots.pop(job_id)
        for sequence in slot.running_sequences(job_id):  # another choice failed: the job is over
            self.engine.cancel(sequence)
        if outcome is None:
            outcome = self.publisher.finish(job_id, ending)
        self.bookkeeping.record_end(job_id, slot, ending, outcome)
        self.metrics.run_time.observe(time.monotonic() - slot.admitted_at)
        status = ending.status.value
        logger.info("job %s %s (%d tokens)", job_id, status, slot.completion_tokens,
                    extra={"job_id": job_id, "request_id": slot.request_id, "status": status,
                           "completion_tokens": slot.completion_tokens})

    # ---- RQ's idle loop ---------------------------------------------------------------------------------------

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
            self.set_local_state(state)
            return
        try:
            super().set_state(state)
            self._state_written = state
        except REDIS_DOWN:
            self.set_local_state(state)  # display only in Redis; the local state is what RQ's warm stop reads

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

    def unsubscribe(self):
        """RQ's, bounded: closing its pubsub connection was seen to wait a whole minute on the listener thread's
        blocked read after a SIGTERM drain (past compose's stop grace period), and the process is leaving anyway."""
        closer = threading.Thread(target=super().unsubscribe, name="llamaq-rq-unsubscribe", daemon=True)
        closer.start()
        closer.join(UNSUBSCRIBE_WAIT_S)
        if closer.is_alive():
            logger.warning("RQ's pubsub did not close within %.0f s; leaving it to the process exit",
                           UNSUBSCRIBE_WAIT_S)

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

    def warm_stop(self):
        """Warm shutdown. RQ raises StopRequested at once when the worker is not BUSY, which would break a batch
        that is between two jobs' bookkeeping; inside a batch, stop claiming and let the batch drain instead."""
        if not self._decoding:
            return super().warm_stop()
        self.stop_requested = True
        self._drain_deadline = time.monotonic() + self.settings.drain_timeout_s
        logger.warning("stop requested: claiming no more jobs; %d running job(s) get %.0f s to finish, then go "
                       "back to the queue", len(self.slots), self.settings.drain_timeout_s)

    def _give_back_all(self, engine_dead: EngineDead | None) -> None:
        """Every running job back on the queue. After SIGTERM's drain time (`engine_dead` None) each attempt is not
        counted, so the job always goes back; after the engine died each attempt counts, as a lost worker's does
        for the sweeper, so a job that kills engines fails as worker_lost after JOB_RETRIES re-queues."""
        retries = self.settings.job_retries
        if engine_dead is None:
            max_attempts, error, mode, why = 0, "", ["handback"], "not finished within DRAIN_TIMEOUT_S"
        else:
            message = f"the engine of the worker running this job died ({engine_dead}), {retries + 1} time(s)"
            max_attempts, mode, why = retries + 1, [], "the engine died"
            error = JobError(type="worker_lost", message=message).model_dump_json()
        for job_id in list(self.slots):
            slot = self.slots.pop(job_id)
            if engine_dead is None:
                for sequence in slot.running_sequences(job_id):
                    self.engine.cancel(sequence)
            # RQ's execution closed first, so a worker that takes the job back at once is not disturbed by it.
            self.rq.show_execution(slot.rq_execution)
            self.until_redis("handing a job back", self.bookkeeping.close_execution, slot.rq_job)
            outcome = self.until_redis(
                "handing a job back", self._reclaim,
                keys=reclaim_keys(job_id, slot.queue.key, slot.rq_job.key),
                args=[self.name, max_attempts, utc_now().isoformat(), error, self.settings.result_ttl_s, job_id,
                      *mode],
            )
            outcome = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
            if outcome in ("canceled", "failed"):
                self.until_redis("handing a job back", self.bookkeeping.end_reclaimed, slot.rq_job, slot.queue, outcome,
                           "worker_lost: the engine died")
            logger.warning("job %s handed back (%s) after %d tokens: %s", job_id, outcome, slot.completion_tokens,
                           why, extra={"job_id": job_id, "request_id": slot.request_id})
        self.rq.show_execution(None)
