"""Finds jobs whose worker died (kill -9, OOM kill, lost node) and re-queues or fails them.

RQ alone notices an abandoned job only `job_timeout + 60` s later, and only when another worker runs its
maintenance. Here every gateway process runs this loop, one at a time through a short Redis lock, so a dead
worker's jobs are found within `WORKER_STALE_S` plus one sweep even when no worker is up.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import anyio
from rq.job import Job as RQJob
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from llamaq_protocol import JobError, keys, utc_now
from llamaq_protocol.records import RECLAIM_SCRIPT

from .jobs import JobService

logger = logging.getLogger(__name__)


class LostWorkerSweeper:
    def __init__(self, jobs: JobService, interval_s: float = 2.0):
        self.jobs = jobs
        self.settings = jobs.settings
        self.interval_s = interval_s
        self._token = uuid.uuid4().hex

    async def run_forever(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away, say: try again next round
                logger.warning("lost-worker sweep failed: %s", exc)
            await asyncio.sleep(self.interval_s)

    async def sweep_once(self) -> list[tuple[str, str]]:
        """One pass; returns (job id, outcome) for every job it took back."""
        aio = self.jobs.aio
        if not await aio.set(keys.SWEEP_LOCK, self._token, nx=True, px=int(self.interval_s * 1000)):
            return []
        running = [j.decode() for j in await aio.smembers(keys.RUNNING)]
        if not running:
            return []
        fresh_since = time.time() - self.settings.worker_stale_s
        outcomes = []
        for job_id in running:
            worker = await aio.hget(keys.job(job_id), "worker")
            last_beat = await aio.zscore(keys.WORKERS, worker) if worker else None
            if last_beat is not None and last_beat >= fresh_since:
                continue
            outcome = await self._reclaim(job_id, worker.decode() if worker else "")
            if outcome in ("requeued", "failed", "canceled"):
                outcomes.append((job_id, outcome))
                await anyio.to_thread.run_sync(self._sync_rq, job_id, outcome)
                logger.warning("job %s: worker %s lost; %s", job_id, worker, outcome, extra={"job_id": job_id})
        return outcomes

    async def _reclaim(self, job_id: str, worker: str) -> str:
        error = JobError(
            type="worker_lost",
            message=f"the worker running this job stopped responding, {self.settings.job_retries + 1} time(s)",
        )
        outcome = await self.jobs.aio.eval(
            RECLAIM_SCRIPT,
            4,
            keys.job(job_id),
            keys.events(job_id),
            keys.CANCEL_REQUESTS,
            keys.RUNNING,
            worker,
            self.settings.job_retries + 1,
            utc_now().isoformat(),
            error.model_dump_json(),
            self.settings.result_ttl_s,
            job_id,
        )
        return outcome.decode() if isinstance(outcome, bytes) else str(outcome)

    def _sync_rq(self, job_id: str, outcome: str) -> None:
        """Make RQ's registries tell the same story as the job record."""
        sync, queue = self.jobs.sync, self.jobs.queue
        registry = queue.started_job_registry
        for member in sync.zrange(registry.key, 0, -1):
            if member.decode().startswith(f"{job_id}:"):
                sync.zrem(registry.key, member)
        try:
            rq_job = RQJob.fetch(job_id, connection=sync, serializer=JSONSerializer)
        except Exception:  # expired or never there: the record alone speaks
            return
        if outcome == "requeued":
            queue.enqueue_job(rq_job, at_front=True)
        elif outcome == "canceled":
            rq_job.cancel()
        else:
            rq_job.set_status("failed")
            FailedJobRegistry(queue=queue).add(rq_job, ttl=self.settings.result_ttl_s,
                                                exc_string="worker_lost: the worker stopped responding")
