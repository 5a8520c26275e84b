"""RQ's own records of the batch's jobs, so that `rq info` and RQ's registries tell the truth: the registries and
result at a job's end, the job and execution heartbeats while it runs, and the worker hash pointed at a job that
still runs (it has room for one). RQ 2.x keeps one `worker.execution`: it is swapped in per job."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from rq import Queue
from rq.job import Job as RQJob
from rq.registry import FailedJobRegistry
from rq.utils import now
from rq.worker import WorkerStatus

from llamaq_protocol import JobStatus

from .publishing import REDIS_DOWN
from .slots import Ending, Slot

if TYPE_CHECKING:
    from .decoding_loop import DecodingWorker

logger = logging.getLogger(__name__)


class RQBookkeeping:
    def __init__(self, worker: DecodingWorker) -> None:
        self.worker = worker
        self._heartbeat_at = 0.0

    def record_end(self, job_id: str, slot: Slot, ending: Ending, outcome: bytes) -> None:
        """RQ's side of a job that left the batch with `ending`; `outcome` is what its finish script said."""
        worker = self.worker
        job, queue = slot.rq_job, slot.queue
        worker.execution = slot.execution
        if outcome != b"finished":
            # This worker stalled and the job was taken back (re-queued or failed) meanwhile: RQ's registries
            # already follow the record, so only this worker's execution is closed.
            logger.warning("job %s was taken from this worker (%s); dropping its result", job_id, outcome.decode())
            worker.until_redis("closing a job", self.close_execution, job)
        else:
            worker.until_redis("closing a job", self._record, job, queue, ending)
        self.point_worker_at_running_job()

    def close_execution(self, job: RQJob) -> None:
        """This worker's execution of the job closed (in RQ's started registry and the worker's records)."""
        with self.worker.connection.pipeline() as pipe:
            self.worker.cleanup_execution(job, pipeline=pipe)
            pipe.execute()

    def end_reclaimed(self, job: RQJob, queue: Queue, outcome: str, exc_string: str) -> None:
        """RQ's records of a job RECLAIM_SCRIPT ended instead of re-queueing ("canceled" or "failed"), told the same
        story as its record (a re-queue has written RQ's side already)."""
        if outcome == "canceled":
            job.cancel()
        elif outcome == "failed":
            job.set_status("failed")
            FailedJobRegistry(queue=queue).add(job, ttl=self.worker.settings.result_ttl_s, exc_string=exc_string)

    def _record(self, job: RQJob, queue: Queue, ending: Ending) -> None:
        """RQ's registries and result for a job this worker finished."""
        worker, status, output, error = self.worker, ending.status, ending.output, ending.error
        if status is JobStatus.succeeded:
            worker.handle_execution_ended(job, queue, job.success_callback_timeout)
            job._result = output.model_dump(mode="json") if output else None
            job._status = "finished"
            worker.handle_job_success(job=job, queue=queue, started_job_registry=queue.started_job_registry)
        elif status is JobStatus.failed:
            worker.handle_execution_ended(job, queue, job.failure_callback_timeout)
            worker.handle_job_failure(
                job=job, queue=queue, started_job_registry=queue.started_job_registry,
                exc_string=f"{error.type}: {error.message}" if error else "failed",
            )
        else:
            worker.handle_execution_ended(job, queue, job.failure_callback_timeout)
            with worker.connection.pipeline() as pipe:
                worker.cleanup_execution(job, pipeline=pipe)
                job.cancel(pipeline=pipe)
                pipe.execute()

    def point_worker_at_running_job(self) -> None:
        """RQ's worker hash has one current job; while others still run, show one of them."""
        worker = self.worker
        if worker.slots:
            worker.execution = next(iter(worker.slots.values())).execution
            worker.set_state(WorkerStatus.BUSY)
            try:
                worker.set_current_job_id(next(iter(worker.slots)))
            except REDIS_DOWN:
                pass  # display only
        else:
            worker.execution = None

    def maintain_heartbeats(self) -> None:
        """The worker's, and every running job's and execution's, RQ heartbeat, every RQ_HEARTBEAT_S."""
        worker = self.worker
        current = time.monotonic()
        if current - self._heartbeat_at < worker.settings.rq_heartbeat_s or not worker.slots:
            return
        self._heartbeat_at = current
        try:
            with worker.connection.pipeline() as pipe:
                worker.heartbeat(pipeline=pipe)
                for slot in worker.slots.values():
                    ttl = int(worker.get_heartbeat_ttl(slot.rq_job))
                    slot.execution.heartbeat(slot.queue.started_job_registry, ttl, pipeline=pipe)
                    slot.rq_job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
                pipe.execute()
        except REDIS_DOWN:
            # Their TTLs (job_timeout + 60 s) outlast an outage the worker survives; try again next round.
            self._heartbeat_at = current - worker.settings.rq_heartbeat_s + 1.0
