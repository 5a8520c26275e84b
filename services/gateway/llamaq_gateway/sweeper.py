"""Finds jobs whose worker died (kill -9, OOM kill, lost node) and re-queues or fails them.

RQ alone notices an abandoned job only `job_timeout + 60` s later, and only when another worker runs its
maintenance. Here every gateway process runs this loop, one at a time through a short Redis lock, so a dead
worker's jobs are found within `WORKER_STALE_S` plus one sweep even when no worker is up.

A Redis that has just (re)started holds heartbeats that are old only because no worker could write while it
was down: nothing is judged until it has been up for `WORKER_STALE_S`, so a Redis restart costs no job an
attempt. (A worker that stays cut off longer does lose its jobs, and drops them when it is back.)

The sweep also cancels the jobs whose deadline has passed (`Cancel-After`, `deadline`): a queued one ends
`canceled` at once, a running one is stopped by its worker at its next step (CLAIM_SCRIPT refuses to start one in
between), each with `error.type` "deadline_exceeded".

It also rescues a job a worker popped but never claimed (it died between RQ's dequeue, which moves the id
to the queue's intermediate list, and the claim): still `queued` in its record yet in no queue, it would wait
forever. One seen there, unclaimed, for `WORKER_STALE_S` goes back to the front of the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime, timezone

import anyio
from rq import Queue
from rq.job import Job as RQJob
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from llamaq_protocol import JobError, Priority, keys, utc_now
from llamaq_protocol.records import CANCEL_SCRIPT, RECLAIM_SCRIPT, RETURN_SCRIPT, end_keys, reclaim_keys

from .jobs import JobService
from .rq_adapter import intermediate_key

logger = logging.getLogger(__name__)

# Heartbeat entries older than this are dropped from the workers set: each worker start has a name of its own, so a
# worker that died without saying goodbye would otherwise stay in it for good (readers only count fresh ones).
STALE_WORKER_ENTRY_S = 3600
# Jobs past their deadline canceled per sweep (the rest next sweep).
DEADLINE_CHUNK = 500
DEADLINE_EXCEEDED = "deadline_exceeded"


class LostWorkerSweeper:
    def __init__(self, jobs: JobService, interval_s: float = 2.0):
        self.jobs = jobs
        self.settings = jobs.settings
        self.interval_s = interval_s
        self._token = uuid.uuid4().hex
        # Job id -> when this process first saw it unclaimed in the intermediate list.
        self._stranded_since: dict[str, float] = {}
        self._cancel_script = jobs.aio.register_script(CANCEL_SCRIPT)
        self._return_script = jobs.aio.register_script(RETURN_SCRIPT)
        self._reclaim_script = jobs.aio.register_script(RECLAIM_SCRIPT)

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
        uptime = (await aio.info("server")).get("uptime_in_seconds", 0)
        if uptime < self.settings.worker_stale_s:
            return []  # the workers have not had the time to beat since Redis came back
        await aio.zremrangebyscore(keys.WORKERS, "-inf", time.time() - STALE_WORKER_ENTRY_S)
        await self._cancel_past_deadlines()
        outcomes = [(job_id, "requeued") for job_id in await self._rescue_stranded()]
        for job_id, worker, queue in await self._jobs_of_lost_workers():
            # Before the re-queue, so a worker that takes the job at once keeps its own entry.
            await self._forget_started(job_id, queue)
            outcome = await self._reclaim(job_id, worker, queue)
            if outcome in ("requeued", "failed", "canceled"):
                outcomes.append((job_id, outcome))
                if outcome != "requeued":  # the script itself put it back in the fair queue
                    await anyio.to_thread.run_sync(self._end_in_rq, job_id, outcome, queue)
                logger.warning("job %s: worker %s lost; %s", job_id, worker, outcome, extra={"job_id": job_id})
        return outcomes

    async def _cancel_past_deadlines(self) -> list[str]:
        """Cancels the jobs whose deadline has passed (a queued one ends at once; a running one is flagged for its
        worker), each with its reason; returns those that were still queued or running."""
        aio = self.jobs.aio
        due = await aio.zrangebyscore(keys.DEADLINES, "-inf", time.time(), start=0, num=DEADLINE_CHUNK,
                                      withscores=True)
        if not due:
            return []
        now = utc_now().isoformat()
        stopped = []
        for raw_id, deadline in due:
            job_id = raw_id.decode()
            when = datetime.fromtimestamp(deadline, timezone.utc).isoformat()
            reason = JobError(type=DEADLINE_EXCEEDED, message=f"the job's deadline ({when}) passed before it ended")
            outcome = await self._cancel_script(
                keys=end_keys(job_id), args=[now, job_id, self.settings.result_ttl_s, reason.model_dump_json()])
            if outcome in (b"canceled", b"running"):
                stopped.append(job_id)
                logger.info("job %s: deadline passed; %s", job_id, "canceled" if outcome == b"canceled" else
                            "stopping", extra={"job_id": job_id})
        await aio.zrem(keys.DEADLINES, *(raw_id for raw_id, _ in due))
        return stopped

    def _queue_of(self, priority: bytes | None):
        """The RQ queue a job of this (recorded) priority waits in, so a re-queue puts it back on its own."""
        try:
            return self.jobs.queues[Priority((priority or b"interactive").decode())]
        except ValueError:
            return self.jobs.queue

    async def _jobs_of_lost_workers(self) -> list[tuple[str, str, Queue]]:
        """(job id, worker, its RQ queue) of each running job whose worker has not beaten since `fresh_since` (or
        has no name), read in one round trip for all of them."""
        aio = self.jobs.aio
        running = [j.decode() for j in await aio.smembers(keys.RUNNING)]
        if not running:
            return []
        async with aio.pipeline(transaction=False) as pipe:
            for job_id in running:
                pipe.hmget(keys.job(job_id), "worker", "priority")
            pipe.zrangebyscore(keys.WORKERS, self.jobs.fresh_since(), "+inf")
            *records, fresh = await pipe.execute()
        alive = {name.decode() for name in fresh}
        lost = []
        for job_id, (worker, priority) in zip(running, records):
            worker = (worker or b"").decode()
            if not worker or worker not in alive:
                lost.append((job_id, worker, self._queue_of(priority)))
        return lost

    async def _rescue_stranded(self) -> list[str]:
        """Over every priority's queue (RQ uses the intermediate list when a worker serves one queue only)."""
        rescued = []
        seen: list[str] = []
        for queue in self.jobs.queues.values():
            rescued += await self._rescue_stranded_from(queue, seen)
        self._stranded_since = {j: t for j, t in self._stranded_since.items() if j in seen}
        return rescued

    async def _rescue_stranded_from(self, queue: Queue, seen: list[str]) -> list[str]:
        aio = self.jobs.aio
        stranded = [j.decode() for j in await aio.lrange(intermediate_key(queue), 0, -1)]
        seen += stranded
        current = time.monotonic()
        rescued: list[str] = []
        if not stranded:
            return rescued
        async with aio.pipeline(transaction=False) as pipe:
            for job_id in stranded:
                pipe.hget(keys.job(job_id), "status")
            statuses = await pipe.execute()
        for job_id, status in zip(stranded, statuses):
            if status != b"queued":
                continue  # claimed (the worker removes it from the list next), or ended
            first_seen = self._stranded_since.setdefault(job_id, current)
            if current - first_seen < self.settings.worker_stale_s:
                continue
            moved = await self._return_script(keys=[intermediate_key(queue), keys.job(job_id)], args=[job_id])
            if not moved:
                continue
            self._stranded_since.pop(job_id, None)
            rescued.append(job_id)
            logger.warning("job %s was popped but never claimed (its worker died); back on the queue", job_id,
                           extra={"job_id": job_id})
        return rescued

    async def _reclaim(self, job_id: str, worker: str, queue: Queue) -> str:
        error = JobError(
            type="worker_lost",
            message=f"the worker running this job stopped responding, {self.settings.job_retries + 1} time(s)",
        )
        reclaiming = reclaim_keys(job_id, queue.key, RQJob.key_for(job_id))
        outcome = await self._reclaim_script(keys=reclaiming, args=[
            worker, self.settings.job_retries + 1, utc_now().isoformat(), error.model_dump_json(),
            self.settings.result_ttl_s, job_id,
        ])
        return outcome.decode() if isinstance(outcome, bytes) else str(outcome)

    async def _forget_started(self, job_id: str, queue: Queue) -> None:
        """Drop the lost worker's executions of the job from its queue's RQ started registry."""
        registry_key = queue.started_job_registry.key
        stale = [m for m in await self.jobs.aio.zrange(registry_key, 0, -1) if m.decode().startswith(f"{job_id}:")]
        if stale:
            await self.jobs.aio.zrem(registry_key, *stale)

    def _end_in_rq(self, job_id: str, outcome: str, queue: Queue) -> None:
        """Make RQ's records of a job the sweep ended tell the same story as the job record."""
        try:
            rq_job = RQJob.fetch(job_id, connection=self.jobs.sync, serializer=JSONSerializer)
        except Exception:  # expired or never there: the record alone speaks
            return
        if outcome == "canceled":
            rq_job.cancel()
        else:
            rq_job.set_status("failed")
            FailedJobRegistry(queue=queue).add(rq_job, ttl=self.settings.result_ttl_s,
                                                exc_string="worker_lost: the worker stopped responding")
