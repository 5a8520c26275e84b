"""RQ's own records of the batch's jobs, so that `rq info` and RQ's registries tell the truth: the registries and
result at a job's end, the job and execution heartbeats while it runs, and the worker hash pointed at a job that
still runs (it has room for one). RQ 2.x keeps one execution per worker: it is swapped in per job. What is done in
RQ goes through rq_adapter.RQOps."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from rq import Queue
from rq.job import Job as RQJob
from rq.registry import FailedJobRegistry

from llamaq_protocol import JobStatus

from .publishing import REDIS_DOWN, RedisRetry
from .rq_adapter import RQOps
from .settings import WorkerSettings
from .slots import Ending, Slot

logger = logging.getLogger(__name__)


class RQBookkeeping:
    """`rq`: RQ's operations on the worker's behalf; `slots`: the running jobs (the decoding loop's, read only);
    `until_redis`: the worker's retry of Redis calls through an outage."""

    def __init__(self, rq: RQOps, slots: Mapping[str, Slot], *, settings: WorkerSettings,
                 until_redis: RedisRetry) -> None:
        self.rq = rq
        self.slots = slots
        self.settings = settings
        self.until_redis = until_redis
        self._heartbeat_at = 0.0

    def record_end(self, job_id: str, slot: Slot, ending: Ending, outcome: bytes) -> None:
        """RQ's side of a job that left the batch with `ending`; `outcome` is what its finish script said."""
        job, queue = slot.rq_job, slot.queue
        self.rq.show_execution(slot.rq_execution)
        if outcome != b"finished":
            # This worker stalled and the job was taken back (re-queued or failed) meanwhile: RQ's registries
            # already follow the record, so only this worker's execution is closed.
            logger.warning("job %s was taken from this worker (%s); dropping its result", job_id, outcome.decode())
            self.until_redis("closing a job", self.close_execution, job)
        else:
            self.until_redis("closing a job", self._record, job, queue, ending)
        self.point_worker_at_running_job()

    def close_execution(self, job: RQJob) -> None:
        """This worker's execution of the job closed (in RQ's started registry and the worker's records)."""
        self.rq.close_execution(job)

    def end_reclaimed(self, job: RQJob, queue: Queue, outcome: str, exc_string: str) -> None:
        """RQ's records of a job RECLAIM_SCRIPT ended instead of re-queueing ("canceled" or "failed"), told the same
        story as its record (a re-queue has written RQ's side already)."""
        if outcome == "canceled":
            job.cancel()
        elif outcome == "failed":
            job.set_status("failed")
            FailedJobRegistry(queue=queue).add(job, ttl=self.settings.result_ttl_s, exc_string=exc_string)

    def _record(self, job: RQJob, queue: Queue, ending: Ending) -> None:
        """RQ's registries and result for a job this worker finished."""
        status, output, error = ending.status, ending.output, ending.error
        if status is JobStatus.succeeded:
            self.rq.record_success(job, queue, output.model_dump(mode="json") if output else None)
        elif status is JobStatus.failed:
            self.rq.record_failure(job, queue, f"{error.type}: {error.message}" if error else "failed")
        else:
            self.rq.record_cancel(job, queue)

    def point_worker_at_running_job(self) -> None:
        """RQ's worker hash has one current job; while others still run, show one of them."""
        if self.slots:
            job_id, slot = next(iter(self.slots.items()))
            self.rq.show_execution(slot.rq_execution)
            try:
                self.rq.show_current_job(job_id)
            except REDIS_DOWN:
                pass  # display only
        else:
            self.rq.show_execution(None)

    def maintain_heartbeats(self) -> None:
        """The worker's, and every running job's and execution's, RQ heartbeat, every RQ_HEARTBEAT_S."""
        current = time.monotonic()
        if current - self._heartbeat_at < self.settings.rq_heartbeat_s or not self.slots:
            return
        self._heartbeat_at = current
        try:
            self.rq.heartbeat([(slot.rq_job, slot.queue, slot.rq_execution) for slot in self.slots.values()])
        except REDIS_DOWN:
            # Their TTLs (job_timeout + 60 s) outlast an outage the worker survives; try again next round.
            self._heartbeat_at = current - self.settings.rq_heartbeat_s + 1.0
