"""Where tokens are written: each step's text to the jobs' event streams and records, and the jobs that ended.

One pipeline a step carries every running job's new token events (TOKENS_SCRIPT, one call for up to
TOKENS_JOBS_PER_CALL jobs, with the partial output in the record refreshed about every PARTIAL_OUTPUT_EVERY_S) and
the finish of every job that ended (FINISH_SCRIPT), so a waiting client wakes once. The work per step follows the
jobs that have news, not every running job. A job the scripts say is no longer this worker's (the sweep re-queued it
while this worker was cut off) is stopped and nothing more is written for it.

Redis may go away (a restart, a failover) while a batch runs: `RedisRetry` tries each write again until Redis
answers, for up to REDIS_OUTAGE_TOLERANCE_S, with decoding paused meanwhile, so no token is dropped and no job
event or state is written twice (the job-state scripts are idempotent). Past that it raises RedisOutageTooLong.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import redis
import redis.exceptions

from llamaq_protocol.records import FINISH_SCRIPT, TOKENS_SCRIPT, end_keys, event_data, tokens_call

from .engines.base import PRIORITY_NAMES, StepOutput
from .metrics import WorkerMetrics
from .settings import WorkerSettings
from .slots import Ending, Slot, ending_of, job_and_choice

logger = logging.getLogger(__name__)

# Partial output in the job record (what GET /v1/jobs/{id} shows while it runs) is refreshed about this often, each
# job at its own moment (a random 0.75-1.25 times this apart), so the jobs of a batch do not all rewrite their text in
# the same step; the event stream gets every token.
PARTIAL_OUTPUT_EVERY_S = 0.5
# Jobs per TOKENS_SCRIPT call: a step's calls go in one pipeline, and Redis serves the gateway's reads between them.
TOKENS_JOBS_PER_CALL = 64
# What a Redis restart or a dropped connection raises (redis-py has already retried a few times by then), and a
# Redis at its maxmemory refusing writes (noeviction): the batch waits for it as for an outage.
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.OutOfMemoryError)
# Longest pause between two tries while Redis is away.
REDIS_RETRY_MAX_S = 1.0


class RedisOutageTooLong(Exception):
    """Redis stayed away longer than REDIS_OUTAGE_TOLERANCE_S: exit, and let the sweep re-queue the jobs."""


class RedisRetry:
    """`until_redis(what, fn, *args, **kwargs)`: `fn(*args, **kwargs)`, tried again while Redis is unreachable; after
    `tolerance_s` of one outage, RedisOutageTooLong. `fn` must be safe to repeat (the job-state scripts are).
    `held()` counts the running jobs, for the log."""

    def __init__(self, tolerance_s: float, held: Callable[[], int]) -> None:
        self.tolerance_s = tolerance_s
        self._held = held
        self._outage_since: float | None = None

    def __call__(self, what: str, fn, *args, **kwargs):
        pause = 0.05
        while True:
            try:
                result = fn(*args, **kwargs)
            except REDIS_DOWN as exc:
                current = time.monotonic()
                tolerance = self.tolerance_s
                if self._outage_since is None:
                    self._outage_since = current
                    logger.warning("Redis unreachable while %s (%s); holding %d running job(s), decoding paused, "
                                   "retrying for up to %.0f s", what, exc, self._held(), tolerance)
                elif current - self._outage_since > tolerance:
                    logger.error("Redis unreachable for %.0f s (over REDIS_OUTAGE_TOLERANCE_S); exiting so the "
                                 "jobs are re-queued", current - self._outage_since)
                    raise RedisOutageTooLong(f"Redis unreachable for over {tolerance:.0f} s") from exc
                time.sleep(pause)
                pause = min(pause * 2, REDIS_RETRY_MAX_S)
                continue
            if self._outage_since is not None:
                logger.warning("Redis is back after %.1f s; resuming %d job(s)",
                               time.monotonic() - self._outage_since, self._held())
                self._outage_since = None
            return result


class Publisher:
    """Writes what the engine made for the worker's running jobs (`slots`, the worker's own dict)."""

    def __init__(
        self,
        connection: redis.Redis,
        worker_name: str,
        slots: dict[str, Slot],
        *,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        until_redis: RedisRetry,
        stop_generating: Callable[[str, Slot], None],
    ) -> None:
        """`stop_generating(job_id, slot)` stops a job's sequence in the engine (here: a job found lost)."""
        self.connection = connection
        self.worker_name = worker_name
        self.slots = slots
        self.settings = settings
        self.metrics = metrics
        self.until_redis = until_redis
        self.stop_generating = stop_generating
        self._finish = connection.register_script(FINISH_SCRIPT)
        self._tokens = connection.register_script(TOKENS_SCRIPT)
        # The jobs with token events not written yet, in the order they got them.
        self._pending: dict[str, Slot] = {}

    def publish(self, outputs: list[StepOutput]) -> dict[str, tuple[Ending, bytes]]:
        """Take one step's outputs into the slots and write them; returns each job that ended in this step with its
        ending and its finish's outcome (b"finished", or what the record said instead)."""
        finished: dict[str, Slot] = {}
        generated = 0
        for out in outputs:
            job_id, index = job_and_choice(out.seq_id)
            slot = self.slots.get(job_id)
            if slot is None or job_id in finished:
                continue  # (a choice still leaving the engine after its job ended)
            choice = slot.choices[index]
            out.completion_tokens += choice.offset  # (a resumed generation: the earlier attempt's tokens first)
            if out.completion_tokens > choice.completion_tokens:
                if slot.completion_tokens == 0 and slot.waited_s is not None:
                    self.metrics.first_token.labels(priority=PRIORITY_NAMES[slot.priority]).observe(
                        slot.waited_s + time.monotonic() - slot.admitted_at)
                generated += out.completion_tokens - choice.completion_tokens
            choice.completion_tokens = out.completion_tokens
            event = None if slot.lost else slot.take_token_event(out, choice)
            if event is not None:
                slot.unpublished.append(event_data(event))
                slot.token_events += 1
                self._pending[job_id] = slot
            if out.finish_reason or out.error:
                choice.finish_reason, choice.error = out.finish_reason, out.error
                if slot.ended:
                    finished[job_id] = slot
        if generated:
            self.metrics.generated_tokens.inc(generated)
        endings = {job_id: ending_of(slot) for job_id, slot in finished.items()}
        # While Redis is away decoding waits here, holding the tokens, rather than running on and dropping them.
        outcomes = self.until_redis("publishing tokens", self._write, endings)
        return {job_id: (ending, outcomes[job_id]) for job_id, ending in endings.items()}

    def finish(self, job_id: str, ending: Ending) -> bytes:
        """The job's record finished on its own (a job that ended before its first step)."""
        # The same arguments on every try (one finished_at): a finish retried after a lost reply is recognised.
        return self.until_redis("finishing a job", self._finish, keys=end_keys(job_id),
                                args=self._finish_args(job_id, ending))

    def _write(self, endings: dict[str, Ending]) -> dict[str, bytes]:
        """The unpublished token events of every job that has some, then the finish of every job that ended in this
        step, in one round trip (so a waiting client wakes once); returns each finish's outcome. TOKENS_SCRIPT skips
        events already written and FINISH_SCRIPT recognises a finish already done, so a retry after a lost reply is
        harmless."""
        pending = [(job_id, slot) for job_id, slot in self._pending.items()
                   if self.slots.get(job_id) is slot and not slot.lost]
        if not pending and not endings:
            self._pending.clear()
            return {}
        current = time.monotonic()
        partial = {
            job_id: slot.output().model_dump_json()
            for job_id, slot in pending
            if job_id not in endings and current >= slot.partial_due_at
        }
        writes = [(job_id, slot.token_events - len(slot.unpublished), slot.max_new_tokens + 16,
                   partial.get(job_id, ""), slot.unpublished, slot.completion_tokens) for job_id, slot in pending]
        calls = [tokens_call(self.worker_name, writes[i:i + TOKENS_JOBS_PER_CALL])
                 for i in range(0, len(writes), TOKENS_JOBS_PER_CALL)]

        def send() -> list:
            with self.connection.pipeline(transaction=False) as pipe:
                for call_keys, args in calls:
                    pipe.evalsha(self._tokens.sha, len(call_keys), *call_keys, *args)
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
        written = [count for counts in replies[:len(calls)] for count in counts]
        for (job_id, slot), count in zip(pending, written):
            # (a job that ended in this step reads as not running when a retry finds its finish already done)
            if count < 0 and job_id not in endings:
                self._drop_lost(job_id, slot)
                continue
            slot.unpublished.clear()
            if job_id in partial:
                slot.partial_due_at = current + PARTIAL_OUTPUT_EVERY_S * random.uniform(0.75, 1.25)
        self._pending.clear()
        return dict(zip(endings, replies[len(calls):]))

    def _drop_lost(self, job_id: str, slot: Slot) -> None:
        """The job is no longer this worker's (the sweep re-queued it while this worker was cut off): stop it."""
        logger.warning("job %s was taken from this worker; stopping it", job_id, extra={"job_id": job_id})
        slot.lost = True
        slot.unpublished.clear()
        self.stop_generating(job_id, slot)

    def _finish_args(self, job_id: str, ending: Ending) -> list:
        return [
            ending.status.value,
            ending.finished_at,
            ending.output.model_dump_json() if ending.output else "",
            ending.error.model_dump_json() if ending.error else "",
            self.settings.result_ttl_s,
            job_id,
            self.worker_name,
        ]
