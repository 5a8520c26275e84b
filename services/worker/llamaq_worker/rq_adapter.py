"""The only module of the worker that knows RQ 2.12's internals (rq==2.12.0, pinned exactly in pyproject.toml): an
RQ upgrade checks what is listed here against the new release and changes this file, no other.

Outside it the worker uses RQ's public API only: `Queue` (name, key), `Job` (id, key, origin, func_name, args,
timeout, enqueued_at, started_at, ended_at, failure_ttl, fetch, cancel, set_status), `FailedJobRegistry(...).add`,
`WorkerStatus`, RQ's exceptions and serializers, and `SimpleWorker`'s public hooks that DecodingWorker overrides
(execute_job, set_state, heartbeat, check_for_suspension, run_maintenance_tasks, unsubscribe,
dequeue_job_and_maintain_ttl, request_stop). priority_queues.PriorityQueue overrides `Queue.dequeue_any` and keeps
its contract: `(queues, timeout, connection, job_class, serializer, death_penalty_class)`, `(job, queue)` or None
without a timeout, DequeueTimeout after one.

What this module relies on, none of it RQ's documented API:
- `BaseWorker._stop_requested` (the warm-stop flag work() reads between jobs), `_state` (what get_state() returns
  and the warm stop reads) and `_shutdown()` (the warm stop request_stop calls): `RQWorker` gives them names.
- `BaseWorker._ordered_queues`: the worker's queues in dequeue order (a dequeue strategy may reorder them).
- One execution per worker, `worker.execution` (rq 3.0 passes it explicitly instead): swapped in per job of the
  batch (`RQOps.show_execution`), since `handle_job_success` names the result's execution by it and
  `cleanup_execution` deletes it and sets it to None.
- A job's start, what `prepare_execution` and `prepare_job_execution` write, in one transaction: `Execution.create`,
  `get_heartbeat_ttl`, `set_current_job_id`, `set_current_job_working_time`, `Job.heartbeat`,
  `Job.prepare_for_execution`.
- A job's end: `handle_execution_ended`, `handle_job_success` (it saves `Job._result` and reads `Job._status`, set
  here first), `handle_job_failure`, `cleanup_execution`; a job failed without running: `Result.create_failure`,
  `increment_failed_job_count`, `rq.defaults.DEFAULT_FAILURE_TTL`.
- Heartbeats while a batch runs: `Execution.heartbeat(started_job_registry, ttl, pipeline)`, `Job.heartbeat(...,
  xx=True)`, `Queue.started_job_registry`.
- `Queue.intermediate_queue_key` (where a popped id waits until its claim: RQ's pop and the fair queue's put it
  there), `Queue.DEFAULT_TIMEOUT`, the worker's `queue_class`, `job_class` and `serializer`, and `rq.utils.now`
  (RQ's clock, UTC-aware).

RQ's Redis layout (not its Python) is also known to the job-state Lua scripts (llamaq_protocol.records: an RQ job
hash's `status`, a queue's list, the intermediate list a record's `fq_hold` names), and the gateway has an adapter
of its own (llamaq_gateway.rq_adapter): the gateway's image has no llamaq_worker, and llamaq_protocol stays
pydantic-only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from rq import Queue
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.executions import Execution
from rq.job import Job
from rq.job import JobStatus
from rq.registry import FailedJobRegistry
from rq.results import Result
from rq.utils import now
from rq.worker import BaseWorker, SimpleWorker, WorkerStatus


def rq_now() -> datetime:
    """RQ's clock (what it writes into a job's timestamps)."""
    return now()


def intermediate_key(queue: Queue) -> str:
    """The list a popped job id waits on until its claim."""
    return queue.intermediate_queue_key


class RQWorker(SimpleWorker):
    """RQ's SimpleWorker with the private state the decoding loop reads and writes given names, and RQ's private
    warm-stop hook under a public one (`warm_stop`)."""

    @property
    def stop_requested(self) -> bool:
        """A warm stop was asked for: work() takes no new job after the current one."""
        return self._stop_requested

    @stop_requested.setter
    def stop_requested(self, value: bool) -> None:
        self._stop_requested = value

    def set_local_state(self, state: str) -> None:
        """The worker's state as get_state() (and RQ's warm stop) reads it, without writing it to Redis."""
        self._state = state

    def _shutdown(self):
        return self.warm_stop()

    def warm_stop(self):
        """RQ's warm stop (request_stop calls it on SIGTERM/SIGINT): a busy worker stops after its job, an idle one at
        once (StopRequested)."""
        return super()._shutdown()


class RQOps:
    """What the batch does in RQ on one worker's behalf: pops from its queues, and its jobs' executions started,
    shown in the worker's hash, heartbeaten and ended. Handed to the claimer and the bookkeeping instead of the
    worker."""

    def __init__(self, worker: BaseWorker) -> None:
        self._worker = worker

    @property
    def queues(self) -> Sequence[Queue]:
        """The worker's queues, in the order RQ dequeues from them."""
        return self._worker._ordered_queues

    @property
    def queue_class(self) -> type[Queue]:
        return self._worker.queue_class

    @property
    def default_timeout(self) -> int:
        """A job's timeout when it has none of its own."""
        return self._worker.queue_class.DEFAULT_TIMEOUT

    def pop(self, queues: Sequence[Queue], **extra) -> tuple[Job, Queue] | None:
        """The next job of `queues` (the queue class's dequeue_any), without waiting; `extra`: the class's own
        arguments (PriorityQueue's `tiers`)."""
        worker = self._worker
        return worker.queue_class.dequeue_any(
            queues, None, connection=worker.connection, job_class=worker.job_class, serializer=worker.serializer,
            **extra,
        )

    # ---- a job's execution ------------------------------------------------------------------------------------

    def start_execution(self, job: Job, queue: Queue, pipeline) -> Execution:
        """What RQ's `prepare_execution` and `prepare_job_execution` write, into `pipeline` (one transaction instead
        of two): the job's execution record and place in the started registry, the worker busy on it, the job
        started, and the job off its queue's intermediate list. The execution is the worker's shown one."""
        worker = self._worker
        heartbeat_ttl = worker.get_heartbeat_ttl(job)
        worker.execution = Execution.create(job, heartbeat_ttl, pipeline=pipeline, worker_name=worker.name)
        worker.set_state(WorkerStatus.BUSY, pipeline=pipeline)
        worker.set_current_job_id(job.id, pipeline=pipeline)
        worker.set_current_job_working_time(0, pipeline=pipeline)
        worker.heartbeat(heartbeat_ttl, pipeline=pipeline)
        job.heartbeat(now(), heartbeat_ttl, pipeline=pipeline)
        job.prepare_for_execution(worker.name, pipeline=pipeline)
        pipeline.lrem(queue.intermediate_queue_key, 1, job.id)
        return worker.execution

    def show_execution(self, execution: Execution | None) -> None:
        """The execution RQ's calls that follow act on (the worker has room for one)."""
        self._worker.execution = execution

    def show_current_job(self, job_id: str) -> None:
        """The worker's hash: busy on `job_id`."""
        self._worker.set_state(WorkerStatus.BUSY)
        self._worker.set_current_job_id(job_id)

    def close_execution(self, job: Job) -> None:
        """The shown execution of the job closed (in RQ's started registry and the worker's records)."""
        with self._worker.connection.pipeline() as pipe:
            self._worker.cleanup_execution(job, pipeline=pipe)
            pipe.execute()

    def record_success(self, job: Job, queue: Queue, result) -> None:
        """The job finished with `result` (its return value as RQ stores it): the finished registry, its result."""
        worker = self._worker
        worker.handle_execution_ended(job, queue, job.success_callback_timeout)
        job._result = result
        job._status = "finished"
        worker.handle_job_success(job=job, queue=queue, started_job_registry=queue.started_job_registry)

    def record_failure(self, job: Job, queue: Queue, exc_string: str) -> None:
        """The job failed: the failed registry, its result (`exc_string`)."""
        worker = self._worker
        worker.handle_execution_ended(job, queue, job.failure_callback_timeout)
        worker.handle_job_failure(job=job, queue=queue, started_job_registry=queue.started_job_registry,
                                  exc_string=exc_string)

    def record_cancel(self, job: Job, queue: Queue) -> None:
        """The job was canceled while it ran: the execution closed, the canceled registry."""
        worker = self._worker
        worker.handle_execution_ended(job, queue, job.failure_callback_timeout)
        with worker.connection.pipeline() as pipe:
            worker.cleanup_execution(job, pipeline=pipe)
            job.cancel(pipeline=pipe)
            pipe.execute()

    def fail_without_running(self, job: Job, queue: Queue, reason: str) -> None:
        """A popped job failed before it started: off every intermediate list, into `queue`'s failed registry with
        `reason` as its exc_string (`rq info`, the job's latest result), counted as the worker's failure."""
        worker = self._worker
        with worker.connection.pipeline() as pipe:
            for each in worker._ordered_queues:
                pipe.lrem(each.intermediate_queue_key, 0, job.id)
            job.ended_at = now()
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            FailedJobRegistry(queue=queue).add(job, ttl=job.failure_ttl, exc_string=reason, pipeline=pipe)
            Result.create_failure(job, job.failure_ttl or DEFAULT_FAILURE_TTL, reason, worker_name=worker.name,
                                  pipeline=pipe)
            worker.increment_failed_job_count(pipe)
            pipe.execute()

    def heartbeat(self, running: Iterable[tuple[Job, Queue, Execution]]) -> None:
        """The worker's heartbeat, and each running job's and execution's, in one round trip."""
        worker = self._worker
        with worker.connection.pipeline() as pipe:
            worker.heartbeat(pipeline=pipe)
            for job, queue, execution in running:
                ttl = int(worker.get_heartbeat_ttl(job))
                execution.heartbeat(queue.started_job_registry, ttl, pipeline=pipe)
                job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
            pipe.execute()
