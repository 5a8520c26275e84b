"""The job record: a Redis hash per job, its event stream, and the atomic state changes on them.

The Lua scripts are the only writers of `status`, so a job moves queued -> running -> terminal exactly
once even when the gateway cancels while a worker claims. Each side runs them with its own client. The scripts
that end a job also count it in the stats hash (jobs by final status, for /metrics), in the same atomic step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime

from . import keys
from .models import Job, JobError, JobOutput, JobStatus

EVENT_STATUS = "status"
EVENT_TOKEN = "token"
EVENT_DONE = "done"

# KEYS: job, events, running set. ARGV: started_at, worker name, job id.
# Returns "claimed" or the status that prevented it. The running set is what the lost-worker sweep scans.
# Every script here may run twice for one call: redis-py re-sends a command whose connection broke, and the
# worker retries until Redis answers. So each is idempotent for its caller: a second claim by the same worker
# is "claimed" again (one attempt counted), a second finish with the same finished_at is "finished".
CLAIM_SCRIPT = """
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[2] then return 'claimed' end
if s ~= 'queued' then return s or 'missing' end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"running"}')
return 'claimed'
"""

# KEYS: those of `end_keys` (job, events, cancel set, running set (unused), stats). ARGV: finished_at, job id,
# ttl seconds.
# Returns "canceled" (was queued), "running" (flagged for the worker) or the terminal status.
CANCEL_SCRIPT = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 'missing' end
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[1])
  redis.call('HINCRBY', KEYS[5], 'canceled', 1)
  redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"canceled"}')
  redis.call('XADD', KEYS[2], '*', 'event', 'done', 'data', '{}')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return 'canceled'
end
if s == 'running' then
  redis.call('SADD', KEYS[3], ARGV[2])
  return 'running'
end
return s
"""

# KEYS: job, events, cancel set, running set, stats. ARGV: status, finished_at, output json or "",
# error json or "", ttl, job id, worker name. Only the worker that holds the job may finish it: one whose job was given away as
# lost (it stalled past the heartbeat deadline) gets "lost" and must drop it.
FINISH_SCRIPT = """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'running' then
  if s == ARGV[1] and redis.call('HGET', KEYS[1], 'finished_at') == ARGV[2] then return 'finished' end
  return s or 'missing'
end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[7] then return 'lost' end
redis.call('SREM', KEYS[3], ARGV[6])
redis.call('SREM', KEYS[4], ARGV[6])
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2])
redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'output', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"' .. ARGV[1] .. '"}')
redis.call('XADD', KEYS[2], '*', 'event', 'done', 'data', '{}')
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 'finished'
"""

# KEYS: job, events, cancel set, running set, stats, the RQ queue, the RQ job hash. ARGV: worker name believed
# lost, max attempts, finished_at, error json, ttl, job id, and optionally "handback". A job still held by that
# worker goes back to the front of the RQ queue while it has attempts left ("requeued"), else fails as
# worker_lost ("failed"); one whose cancel was requested ends "canceled". The push and RQ's "queued" status are
# written in the same atomic step as the record, so no crash in between can leave a queued job on no queue, and a
# second run of the same call only sees "queued". With "handback" the worker itself gives the job back (it is
# shutting down): the attempt is not counted, so the job always goes back to the queue.
RECLAIM_SCRIPT = """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  if s ~= 'running' then redis.call('SREM', KEYS[4], ARGV[6]) end
  return s or 'missing'
end
redis.call('SREM', KEYS[4], ARGV[6])
local final = 'failed'
if redis.call('SISMEMBER', KEYS[3], ARGV[6]) == 1 then
  final = 'canceled'
  redis.call('SREM', KEYS[3], ARGV[6])
else
  local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
  if ARGV[7] == 'handback' then
    attempts = attempts - 1
    redis.call('HSET', KEYS[1], 'attempts', attempts)
  end
  if ARGV[7] == 'handback' or attempts < tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[1], 'status', 'queued')
    redis.call('HDEL', KEYS[1], 'started_at', 'worker', 'output', 'token_events')
    -- The lost attempt's tokens are void: drop them so a replay shows only the attempt that counts.
    for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
      if entry[2][2] == 'token' then redis.call('XDEL', KEYS[2], entry[1]) end
    end
    redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"queued","requeued":true}')
    redis.call('LPUSH', KEYS[6], ARGV[6])
    if redis.call('EXISTS', KEYS[7]) == 1 then redis.call('HSET', KEYS[7], 'status', 'queued') end
    return 'requeued'
  end
  redis.call('HSET', KEYS[1], 'error', ARGV[4])
end
redis.call('HSET', KEYS[1], 'status', final, 'finished_at', ARGV[3])
redis.call('HINCRBY', KEYS[5], final, 1)
redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"' .. final .. '"}')
redis.call('XADD', KEYS[2], '*', 'event', 'done', 'data', '{}')
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return final
"""

# KEYS: job, events. ARGV: worker name, index of the first text below, stream maxlen, partial output json or "",
# then the data (JSON) of each token event, in index order. Appends only the events not written yet (the job's
# `token_events` counts them), so publishing again after a lost reply never writes an event twice. Returns
# how many token events the job has, or -1 when it is no longer this worker's (re-queued or ended elsewhere).
TOKENS_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return -1
end
local written = tonumber(redis.call('HGET', KEYS[1], 'token_events') or '0')
local first = tonumber(ARGV[2])
for i = 5, #ARGV do
  local index = first + i - 5
  if index >= written then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', 'token', 'data', ARGV[i])
    written = index + 1
  end
end
redis.call('HSET', KEYS[1], 'token_events', written)
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'output', ARGV[4]) end
return written
"""


def end_keys(job_id: str) -> list[str]:
    """The keys of the scripts that can end a job (FINISH_SCRIPT, CANCEL_SCRIPT), in their order."""
    return [keys.job(job_id), keys.events(job_id), keys.CANCEL_REQUESTS, keys.RUNNING, keys.STATS]


def reclaim_keys(job_id: str, rq_queue_key: str, rq_job_key: str) -> list[str]:
    """RECLAIM_SCRIPT's keys: those of `end_keys`, then the RQ queue and RQ job hash a re-queue writes."""
    return [*end_keys(job_id), rq_queue_key, rq_job_key]


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return value


def new_record(created_at: datetime, request_id: str | None, owner: str) -> dict[str, str]:
    record = {"status": JobStatus.queued.value, "created_at": created_at.isoformat(), "owner": owner}
    if request_id:
        record["request_id"] = request_id
    return record


def job_from_record(job_id: str, record: Mapping[str | bytes, str | bytes], position: int | None = None) -> Job:
    fields = {_text(k): _text(v) for k, v in record.items()}
    status = JobStatus(fields["status"])
    output = fields.get("output")
    error = fields.get("error")
    return Job(
        id=job_id,
        status=status,
        position=position if status is JobStatus.queued else None,
        created_at=fields["created_at"],
        started_at=fields.get("started_at") or None,
        finished_at=fields.get("finished_at") or None,
        output=JobOutput.model_validate_json(output) if output else None,
        error=JobError.model_validate_json(error) if error and status is JobStatus.failed else None,
    )


def event_data(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
