"""The job record: a Redis hash per job, its event stream, and the atomic state changes on them.

The Lua scripts are the only writers of `status`, so a job moves queued -> running -> terminal exactly
once even when the gateway cancels while a worker claims. Each side runs them with its own client. The scripts
that end a job also count it in the stats hash (jobs by final status, for /metrics), in the same atomic step.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from . import keys
from .models import Job, JobError, JobOutput, JobStatus, Priority

EVENT_STATUS = "status"
EVENT_TOKEN = "token"
EVENT_DONE = "done"

# One job's part of a TOKENS_SCRIPT call: job id, index of its first event, stream maxlen, partial output json or
# "", the data (JSON) of its events in index order.
TokenWrite = tuple[str, int, int, str, Sequence[str]]

# Lua that queues a job's webhook delivery for `event` (started, completed, failed, canceled) when the job asked for
# it (its record's `webhook_events`): a member "<job id>:<event>" of the webhooks-due sorted set, due now (score
# 0). ZADD NX: a script run twice queues it once. The gateway's deliverers send it (gateway webhooks.py).
# With `batch_ended_key` (the scripts that end a job), a job of a Batch API batch (its record's `batch`) is also
# appended there as "<batch id> <job id>" for the gateway's batch driver (gateway batches.py); a script run twice
# appends it twice, which the driver's writes by line number absorb.
NOTIFY_LUA = """
local function notify(due_key, job_key, job_id, event, batch_ended_key)
  local fields = redis.call('HMGET', job_key, 'webhook_events', 'batch')
  local wanted = fields[1]
  if wanted and string.find(',' .. wanted .. ',', ',' .. event .. ',', 1, true) then
    redis.call('ZADD', due_key, 'NX', 0, job_id .. ':' .. event)
  end
  if batch_ended_key and fields[2] then
    redis.call('RPUSH', batch_ended_key, fields[2] .. ' ' .. job_id)
  end
end
"""

# KEYS: job, events, running set, webhooks due. ARGV: started_at, worker name, job id.
# Returns "claimed" or the status that prevented it. The running set is what the lost-worker sweep scans.
# Every script here may run twice for one call: redis-py re-sends a command whose connection broke, and the
# worker retries until Redis answers. So each is idempotent for its caller: a second claim by the same worker
# is "claimed" again (one attempt counted), a second finish with the same finished_at is "finished".
CLAIM_SCRIPT = NOTIFY_LUA + """
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[2] then return 'claimed' end
if s ~= 'queued' then return s or 'missing' end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"running"}')
notify(KEYS[4], KEYS[1], ARGV[3], 'started')
return 'claimed'
"""

# KEYS: those of `end_keys` (job, events, cancel set, running set (unused), stats, webhooks due, batch jobs ended).
# ARGV: finished_at, job id, ttl seconds.
# Returns "canceled" (was queued), "running" (flagged for the worker) or the terminal status.
CANCEL_SCRIPT = NOTIFY_LUA + """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 'missing' end
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[1])
  redis.call('HINCRBY', KEYS[5], 'canceled', 1)
  redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"canceled"}')
  redis.call('XADD', KEYS[2], '*', 'event', 'done', 'data', '{}')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  notify(KEYS[6], KEYS[1], ARGV[2], 'canceled', KEYS[7])
  return 'canceled'
end
if s == 'running' then
  redis.call('SADD', KEYS[3], ARGV[2])
  return 'running'
end
return s
"""

# KEYS: those of `end_keys`. ARGV: status, finished_at, output json or "", error json or "", ttl, job id, worker
# name. Only the worker that holds the job may finish it: one whose job was given away as
# lost (it stalled past the heartbeat deadline) gets "lost" and must drop it.
FINISH_SCRIPT = NOTIFY_LUA + """
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
notify(KEYS[6], KEYS[1], ARGV[6], ARGV[1] == 'succeeded' and 'completed' or ARGV[1], KEYS[7])
return 'finished'
"""

# KEYS: those of `end_keys`, then the RQ queue and the RQ job hash. ARGV: worker name believed lost, max attempts,
# finished_at, error json, ttl, job id, and optionally "handback". A job still held by that
# worker goes back to the front of the RQ queue while it has attempts left ("requeued"), else fails as
# worker_lost ("failed"); one whose cancel was requested ends "canceled". The push and RQ's "queued" status are
# written in the same atomic step as the record, so no crash in between can leave a queued job on no queue, and a
# second run of the same call only sees "queued". With "handback" the worker itself gives the job back (it is
# shutting down): the attempt is not counted, so the job always goes back to the queue.
RECLAIM_SCRIPT = NOTIFY_LUA + """
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
    redis.call('LPUSH', KEYS[8], ARGV[6])
    if redis.call('EXISTS', KEYS[9]) == 1 then redis.call('HSET', KEYS[9], 'status', 'queued') end
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
notify(KEYS[6], KEYS[1], ARGV[6], final, KEYS[7])
return final
"""

# KEYS: the job and events keys of each job, in pairs (`tokens_call` builds them). ARGV: worker name, then for each
# job in KEYS' order: the index of its first event below, how many events follow, its stream's maxlen, its partial
# output json or "", then the data (JSON) of each of its token events, in index order. One call carries every job
# with news in a decoding step. For each job it appends only the events not written yet (the job's `token_events`
# counts them), so publishing again after a lost reply never writes an event twice. Returns, per job, how many
# token events it has, or -1 when it is no longer this worker's (re-queued or ended elsewhere): nothing is
# written for that job, and the others are written as usual.
TOKENS_SCRIPT = """
local counts = {}
local a = 2
for k = 1, #KEYS, 2 do
  local first, n, maxlen, partial = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
  local data = a + 4
  a = data + n
  local record = redis.call('HMGET', KEYS[k], 'status', 'worker', 'token_events')
  if record[1] ~= 'running' or record[2] ~= ARGV[1] then
    counts[#counts + 1] = -1
  else
    local had = tonumber(record[3] or '0')
    local written = had
    for i = 0, n - 1 do
      if first + i >= written then
        redis.call('XADD', KEYS[k + 1], 'MAXLEN', '~', maxlen, '*', 'event', 'token', 'data', ARGV[data + i])
        written = first + i + 1
      end
    end
    if partial ~= '' then
      redis.call('HSET', KEYS[k], 'token_events', written, 'output', partial)
    elseif written ~= had then
      redis.call('HSET', KEYS[k], 'token_events', written)
    end
    counts[#counts + 1] = written
  end
end
return counts
"""


def end_keys(job_id: str) -> list[str]:
    """The keys of the scripts that can end a job (FINISH_SCRIPT, CANCEL_SCRIPT), in their order."""
    return [keys.job(job_id), keys.events(job_id), keys.CANCEL_REQUESTS, keys.RUNNING, keys.STATS, keys.WEBHOOKS_DUE,
            keys.BATCH_JOBS_ENDED]


def claim_keys(job_id: str) -> list[str]:
    """CLAIM_SCRIPT's keys."""
    return [keys.job(job_id), keys.events(job_id), keys.RUNNING, keys.WEBHOOKS_DUE]


def tokens_call(worker_name: str, jobs: Iterable[TokenWrite]) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of one TOKENS_SCRIPT call that writes `jobs`' token events (and partial outputs)."""
    call_keys: list[str] = []
    args: list[str | int] = [worker_name]
    for job_id, first, maxlen, partial, events in jobs:
        call_keys += (keys.job(job_id), keys.events(job_id))
        args += (first, len(events), maxlen, partial, *events)
    return call_keys, args


def reclaim_keys(job_id: str, rq_queue_key: str, rq_job_key: str) -> list[str]:
    """RECLAIM_SCRIPT's keys: those of `end_keys`, then the RQ queue and RQ job hash a re-queue writes."""
    return [*end_keys(job_id), rq_queue_key, rq_job_key]


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return value


def new_record(
    created_at: datetime, request_id: str | None, owner: str, priority: Priority = Priority.interactive
) -> dict[str, str]:
    record = {"status": JobStatus.queued.value, "created_at": created_at.isoformat(), "owner": owner,
              "priority": Priority(priority).value}
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
        priority=fields.get("priority") or Priority.interactive,
        position=position if status is JobStatus.queued else None,
        created_at=fields["created_at"],
        started_at=fields.get("started_at") or None,
        finished_at=fields.get("finished_at") or None,
        output=JobOutput.model_validate_json(output) if output else None,
        error=JobError.model_validate_json(error) if error and status is JobStatus.failed else None,
    )


def event_data(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
