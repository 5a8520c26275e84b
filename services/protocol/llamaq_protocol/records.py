"""The job record: a Redis hash per job, its event stream, and the atomic state changes on them.

The Lua scripts are the only writers of `status`, so a job moves queued -> running -> terminal exactly
once even when the gateway cancels while a worker claims. Each side runs them with its own client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime

from .models import Job, JobError, JobOutput, JobStatus

EVENT_STATUS = "status"
EVENT_TOKEN = "token"
EVENT_DONE = "done"

# KEYS: job, events. ARGV: started_at. Returns "claimed" or the status that prevented it.
CLAIM_SCRIPT = """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' then return s or 'missing' end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"running"}')
return 'claimed'
"""

# KEYS: job, events, cancel set. ARGV: finished_at, job id, ttl seconds.
# Returns "canceled" (was queued), "running" (flagged for the worker) or the terminal status.
CANCEL_SCRIPT = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 'missing' end
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[1])
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

# KEYS: job, events, cancel set. ARGV: status, finished_at, output json or "", error json or "", ttl, job id.
FINISH_SCRIPT = """
local s = redis.call('HGET', KEYS[1], 'status')
redis.call('SREM', KEYS[3], ARGV[6])
if s ~= 'running' then return s or 'missing' end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'output', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"' .. ARGV[1] .. '"}')
redis.call('XADD', KEYS[2], '*', 'event', 'done', 'data', '{}')
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 'finished'
"""


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
