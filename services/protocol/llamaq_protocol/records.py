"""The job record: a Redis hash per job, its event stream, and the atomic state changes on them.

The Lua scripts are the only writers of `status`, so a job moves queued -> running -> terminal exactly
once even when the gateway cancels while a worker claims. Each side runs them with its own client. The scripts
that end a job also count it in the stats hash (jobs by final status, for /metrics), in the same atomic step.

Every Lua script that touches a job's record or the fair queue is here, built from the same parts (NOTIFY_LUA,
FAIR_LUA), whichever service runs it; the others, each run by one service only (the Batch API's driver lock and batch
status, the webhook lease), live beside the code that runs them.
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
# "", the data (JSON) of its events in index order, and the tokens it has generated so far (every choice).
TokenWrite = tuple[str, int, int, str, Sequence[str], int]

# Lua that queues a job's webhook delivery for `event` (started, completed, failed, canceled) when the job asked for
# it (its record's `webhook_events`): a member "<job id>:<event>" of the webhooks-due sorted set, due now (score
# 0). ZADD NX: a script run twice queues it once. The gateway's deliverers send it (gateway webhooks.py).
# With `batch_ended_key` (the scripts that end a job), a job of a Batch API batch (its record's `batch`) is also
# appended there as "<batch id> <job id>" for the gateway's batch driver (gateway batch_api/batches.py); a script
# run twice appends it twice, which the driver's writes by line number absorb.
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

# Lua of the fair queue (keys.fair_tier): a queued job's id waits in its client's list of its tier, and the client is
# in the tier's sorted set while it has jobs there, scored by its service (keys.FAIR_SERVICE: tokens / weight, charged
# as prompts are claimed and tokens made). A job's record names its tier (`fq_tier`), its client, its RQ queue's
# intermediate list (`fq_hold`, where a pop puts it until the claim) and, with a key's TPM, its rate bucket (`rl`)
# and the tokens reserved there (`reserved`). Keys are built here from those fields: llamaq runs on one Redis.
#
# A client that becomes active is lifted to the service of the least served active client (or, with none, to the
# service now of the client claimed last): an idle client banks no credit for a later burst (the virtual token
# counter, Sheng et al., OSDI 2024).
# Charges only raise a client's service; the sorted set's score may lag behind it, and the pop corrects a lagging
# score before it trusts it.
FAIR_LUA = """
local SERVICE, RUNNING_BY, WEIGHTS = '@SERVICE@', '@RUNNING@', '@WEIGHT@'

local function fair_activate(tier, client)
  local zset = tier .. ':clients'
  if redis.call('ZSCORE', zset, client) then return end
  local service = tonumber(redis.call('HGET', SERVICE, client) or '0')
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  local floor = tonumber(first[2] or '0')
  if not first[2] then
    local last = redis.call('HGET', tier .. ':state', 'last')
    floor = tonumber(last and redis.call('HGET', SERVICE, last) or '0')
  end
  if service < floor then
    service = floor
    redis.call('HSET', SERVICE, client, tostring(service))
  end
  redis.call('ZADD', zset, service, client)
end

-- The job back in its client's list (at the front when `front`: a re-queue keeps its place), an idle worker woken.
local function fair_push(job_key, job_id, front)
  local f = redis.call('HMGET', job_key, 'fq_tier', 'client')
  if not f[1] then return false end
  local list = f[1] .. ':jobs:' .. f[2]
  if front then redis.call('LPUSH', list, job_id) else redis.call('RPUSH', list, job_id) end
  redis.call('RPUSH', f[1] .. ':depth', '1')
  fair_activate(f[1], f[2])
  redis.call('LPUSH', f[1] .. ':wake', '1')
  redis.call('LTRIM', f[1] .. ':wake', 0, 15)
  return true
end

-- A queued job out of its client's list (canceled while waiting).
local function fair_remove(job_key, job_id)
  local f = redis.call('HMGET', job_key, 'fq_tier', 'client')
  if not f[1] then return end
  local list = f[1] .. ':jobs:' .. f[2]
  if redis.call('LREM', list, 1, job_id) > 0 then
    redis.call('LPOP', f[1] .. ':depth')
    if redis.call('LLEN', list) == 0 then redis.call('ZREM', f[1] .. ':clients', f[2]) end
  end
end

-- Tokens served to the job's client: its service (weighted) and usage; `prompt`: prompt tokens, else completion.
local function fair_charge(job_key, tokens, prompt)
  if tokens <= 0 then return end
  local f = redis.call('HMGET', job_key, 'client', 'weight', 'account')
  if not f[1] then return end
  redis.call('HINCRBYFLOAT', SERVICE, f[1], tokens / tonumber(f[2] or '1'))
  redis.call('HINCRBY', job_key, 'charged', tokens)
  local field = prompt and 'prompt_tokens' or 'completion_tokens'
  redis.call('HINCRBY', '@USAGE@' .. f[1], field, tokens)
  if f[3] and f[3] ~= f[1] then redis.call('HINCRBY', '@USAGE@' .. f[3], field, tokens) end
end

-- A rate bucket's level now, refilled at its cap per minute since it was last written (kind: 'req' or 'tok').
local function bucket_level(key, kind, now_ms)
  local b = redis.call('HMGET', key, kind, kind .. '_cap', kind .. '_at')
  local cap = tonumber(b[2] or '0')
  if cap <= 0 then return nil, 0 end
  local level = tonumber(b[1] or tostring(cap))
  level = math.min(cap, level + (now_ms - tonumber(b[3] or tostring(now_ms))) * cap / 60000)
  return level, cap
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A running job left its worker (ended, or going back to the queue).
local function fair_release(job_key)
  local client = redis.call('HGET', job_key, 'client')
  if client and redis.call('HINCRBY', RUNNING_BY, client, -1) <= 0 then redis.call('HDEL', RUNNING_BY, client) end
end

-- A job ended: the tokens it reserved but did not use go back to its client's bucket (once).
local function fair_settle(job_key)
  local f = redis.call('HMGET', job_key, 'client', 'rl', 'reserved', 'charged', 'settled')
  if not f[1] or f[5] then return end
  redis.call('HSET', job_key, 'settled', '1')
  if f[2] and f[3] then
    local refund = tonumber(f[3]) - tonumber(f[4] or '0')
    if refund > 0 then
      local now = now_ms()
      local level, cap = bucket_level(f[2], 'tok', now)
      if level then redis.call('HSET', f[2], 'tok', tostring(math.min(cap, level + refund)), 'tok_at', now) end
    end
  end
end
"""
FAIR_LUA = (FAIR_LUA.replace("@SERVICE@", keys.FAIR_SERVICE).replace("@RUNNING@", keys.FAIR_RUNNING)
            .replace("@WEIGHT@", keys.FAIR_WEIGHT).replace("@USAGE@", keys.usage("")))

# KEYS: job, events, running set, webhooks due. ARGV: started_at, worker name, job id.
# Returns "claimed", "resumed" (the job has token events of an earlier attempt: continue from them), "expired" (its
# deadline has passed: it never starts, and the sweep cancels it), or the status that prevented it. The running set
# is what the lost-worker sweep scans.
# Every script here may run twice for one call: redis-py re-sends a command whose connection broke, and the
# worker retries until Redis answers. So each is idempotent for its caller: a second claim by the same worker
# is "claimed" again (one attempt counted), a second finish with the same finished_at is "finished".
CLAIM_SCRIPT = NOTIFY_LUA + FAIR_LUA + """
local s = redis.call('HGET', KEYS[1], 'status')
local claimed = tonumber(redis.call('HGET', KEYS[1], 'token_events') or '0') > 0 and 'resumed' or 'claimed'
if s == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[2] then return claimed end
if s ~= 'queued' then return s or 'missing' end
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline') or '')
if deadline and now_ms() >= deadline * 1000 then return 'expired' end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local f = redis.call('HMGET', KEYS[1], 'client', 'prompt_tokens')
if f[1] then
  redis.call('HINCRBY', RUNNING_BY, f[1], 1)
  fair_charge(KEYS[1], tonumber(f[2] or '0'), true)
end
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"running"}')
notify(KEYS[4], KEYS[1], ARGV[3], 'started')
return claimed
"""

# KEYS: those of `end_keys` (job, events, cancel set, running set (unused), stats, webhooks due, batch jobs ended).
# ARGV: finished_at, job id, ttl seconds, and optionally why (a JobError's JSON: the job's `error` once canceled).
# Returns "canceled" (was queued), "running" (flagged for the worker) or the terminal status.
CANCEL_SCRIPT = NOTIFY_LUA + FAIR_LUA + """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 'missing' end
if (s == 'queued' or s == 'running') and ARGV[4] and ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'cancel_reason', ARGV[4])
end
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[1])
  redis.call('ZREM', '@DEADLINES@', ARGV[2])
  fair_remove(KEYS[1], ARGV[2])
  fair_settle(KEYS[1])
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
""".replace("@DEADLINES@", keys.DEADLINES)

# KEYS: those of `end_keys`. ARGV: status, finished_at, output json or "", error json or "", ttl, job id, worker
# name. Only the worker that holds the job may finish it: one whose job was given away as
# lost (it stalled past the heartbeat deadline) gets "lost" and must drop it.
FINISH_SCRIPT = NOTIFY_LUA + FAIR_LUA + """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'running' then
  if s == ARGV[1] and redis.call('HGET', KEYS[1], 'finished_at') == ARGV[2] then return 'finished' end
  return s or 'missing'
end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[7] then return 'lost' end
redis.call('SREM', KEYS[3], ARGV[6])
redis.call('SREM', KEYS[4], ARGV[6])
redis.call('ZREM', '@DEADLINES@', ARGV[6])
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2])
fair_release(KEYS[1])
fair_settle(KEYS[1])
redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'output', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"' .. ARGV[1] .. '"}')
redis.call('XADD', KEYS[2], '*', 'event', 'done', 'data', '{}')
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
notify(KEYS[6], KEYS[1], ARGV[6], ARGV[1] == 'succeeded' and 'completed' or ARGV[1], KEYS[7])
return 'finished'
""".replace("@DEADLINES@", keys.DEADLINES)

# KEYS: those of `end_keys`, then the RQ queue and the RQ job hash. ARGV: worker name believed lost, max attempts,
# finished_at, error json, ttl, job id, and optionally "handback". A job still held by that
# worker goes back to the front of its client's list in the fair queue while it has attempts left ("requeued"),
# its tokens kept for the next worker to continue from when its record says `resumable` (else dropped: it starts
# over, and its `requeued` status event says which), else fails as
# worker_lost ("failed"); one whose cancel was requested ends "canceled". The push and RQ's "queued" status are
# written in the same atomic step as the record, so no crash in between can leave a queued job on no queue, and a
# second run of the same call only sees "queued". With "handback" the worker itself gives the job back (it is
# shutting down): the attempt is not counted, so the job always goes back to the queue.
RECLAIM_SCRIPT = NOTIFY_LUA + FAIR_LUA + """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  if s ~= 'running' then redis.call('SREM', KEYS[4], ARGV[6]) end
  return s or 'missing'
end
redis.call('SREM', KEYS[4], ARGV[6])
fair_release(KEYS[1])
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
    if redis.call('HGET', KEYS[1], 'resumable') == '1' then
      -- The next worker continues from the tokens written so far (the stream carries on).
      redis.call('HDEL', KEYS[1], 'started_at', 'worker')
      redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"queued","requeued":true,"resumed":true}')
    else
      redis.call('HDEL', KEYS[1], 'started_at', 'worker', 'output', 'token_events', 'generated')
      -- The lost attempt's tokens are void: drop them so a replay shows only the attempt that counts.
      for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
        if entry[2][2] == 'token' then redis.call('XDEL', KEYS[2], entry[1]) end
      end
      redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"queued","requeued":true}')
    end
    if not fair_push(KEYS[1], ARGV[6], true) then redis.call('LPUSH', KEYS[8], ARGV[6]) end
    if redis.call('EXISTS', KEYS[9]) == 1 then redis.call('HSET', KEYS[9], 'status', 'queued') end
    return 'requeued'
  end
  redis.call('HSET', KEYS[1], 'error', ARGV[4])
end
redis.call('HSET', KEYS[1], 'status', final, 'finished_at', ARGV[3])
fair_settle(KEYS[1])
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
# output json or "", the tokens it has generated so far (charged to its client as they grow: a repeat charges
# nothing), then the data (JSON) of each of its token events, in index order. One call carries every job
# with news in a decoding step. For each job it appends only the events not written yet (the job's `token_events`
# counts them), so publishing again after a lost reply never writes an event twice. Returns, per job, how many
# token events it has, or -1 when it is no longer this worker's (re-queued or ended elsewhere): nothing is
# written for that job, and the others are written as usual.
TOKENS_SCRIPT = FAIR_LUA + """
local counts = {}
local a = 2
for k = 1, #KEYS, 2 do
  local first, n, maxlen, partial = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
  local generated = tonumber(ARGV[a + 4])
  local data = a + 5
  a = data + n
  local record = redis.call('HMGET', KEYS[k], 'status', 'worker', 'token_events', 'generated')
  if record[1] ~= 'running' or record[2] ~= ARGV[1] then
    counts[#counts + 1] = -1
  else
    local charged_before = tonumber(record[4] or '0')
    if generated > charged_before then
      fair_charge(KEYS[k], generated - charged_before, false)
      redis.call('HSET', KEYS[k], 'generated', generated)
    end
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


# ARGV: how many clients of a tier to look at per try, the job key prefix, then each tier's prefix in claim order.
# Takes the next job: from the first tier with work, the oldest job of its least served client whose running jobs are
# under its key's MAX_CONCURRENT, moved onto its RQ queue's intermediate list (where the claim finds it, and the sweep
# rescues it should the worker die before the claim). Returns the job id, or nil when no job can be taken. Its cost
# follows the clients waiting, not the jobs: the same at 10,000 queued jobs as at 10.
POP_SCRIPT = FAIR_LUA + """
local width = tonumber(ARGV[1])
for t = 3, #ARGV do
  local tier = ARGV[t]
  local zset = tier .. ':clients'
  for try = 1, 64 do
    local candidates = redis.call('ZRANGE', zset, 0, width - 1, 'WITHSCORES')
    if #candidates == 0 then break end
    local picked, score, lagging = nil, 0, false
    for i = 1, #candidates, 2 do
      local client, listed = candidates[i], tonumber(candidates[i + 1])
      local service = tonumber(redis.call('HGET', SERVICE, client) or '0')
      if service > listed then
        redis.call('ZADD', zset, service, client)
        lagging = true
        break
      end
      local cap = redis.call('HGET', '@MAX_RUNNING@', client)
      if not cap or tonumber(redis.call('HGET', RUNNING_BY, client) or '0') < tonumber(cap) then
        picked, score = client, listed
        break
      end
    end
    if not lagging then
      if not picked then break end
      local list = tier .. ':jobs:' .. picked
      local job_id = redis.call('LPOP', list)
      if redis.call('LLEN', list) == 0 then redis.call('ZREM', zset, picked) end
      if job_id then
        redis.call('LPOP', tier .. ':depth')
        redis.call('HSET', tier .. ':state', 'last', picked)
        local hold = redis.call('HGET', ARGV[2] .. job_id, 'fq_hold')
        if hold then
          redis.call('RPUSH', hold, job_id)
          return job_id
        end
      end
    end
  end
end
return nil
""".replace("@MAX_RUNNING@", keys.FAIR_MAX_RUNNING)

# KEYS: the RQ queue's intermediate list, the job record. ARGV: job id. A popped job that was not claimed goes back to
# the front of its client's list: its worker could not take it after all (push_back), or died before claiming it
# (the sweep's rescue). Only while it is still on the intermediate list and its record still `queued`.
RETURN_SCRIPT = FAIR_LUA + """
if redis.call('HGET', KEYS[2], 'status') ~= 'queued' then return 0 end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if not fair_push(KEYS[2], ARGV[1], true) then return 0 end
return 1
"""

# One atomic admission (the gateway's submit): KEYS: the job record, its events, the owner's job index, the
# Idempotency-Key's key (the job record again when none), the client's rate bucket, its usage.
# ARGV: job id; the idempotency value ("" for none), its ttl; the record (JSON object of fields), its ttl; the index
# score (creation time), its ttl; the tier's prefix, its bound; the over-quota tier's prefix ("" to refuse
# instead); the client, its weight, its bound on jobs waiting in the tier (0: none), its MAX_CONCURRENT (0: none);
# its RPM, its TPM (0: none), the tokens the job reserves; then RQ's commands for the job's records (a count of
# arguments, then the arguments, for each).
# In order: an Idempotency-Key already held answers {'existing', value}; then the bounds ({'queue_full', bound},
# {'key_queue_full', bound}); then the rate limits ({'rate_limited', which, retry after ms}, or the over-quota tier);
# then everything is written at once: the record, its `queued` event, the index, the key, RQ's records, the job in
# its client's list. Returns {'queued', event id, tier}, or {'rate_limited', 'requests' or 'tokens', retry after ms},
# followed by the rate state: requests limit, remaining, reset ms, tokens limit, remaining, reset ms (limits 0: none).
ADMIT_SCRIPT = FAIR_LUA + """
local job_id = ARGV[1]
if ARGV[2] ~= '' then
  local held = redis.call('GET', KEYS[4])
  if held then return {'existing', held} end
end
local tier, bound, over = ARGV[8], tonumber(ARGV[9]), ARGV[10]
local client, weight, max_queued, max_running = ARGV[11], ARGV[12], tonumber(ARGV[13]), tonumber(ARGV[14])
local rpm, tpm, cost = tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])
if max_queued > 0 and redis.call('LLEN', tier .. ':jobs:' .. client) >= max_queued then
  return {'key_queue_full', max_queued}
end
local now = now_ms()
if rpm > 0 or tpm > 0 then
  redis.call('HSET', KEYS[5], 'req_cap', rpm, 'tok_cap', tpm)
end
local req = bucket_level(KEYS[5], 'req', now)
local tokens = bucket_level(KEYS[5], 'tok', now)
local function reset(level, cap) return math.max(0, math.ceil((cap - level) * 60000 / cap)) end
local function rate_state(head)
  local state = {head[1], head[2], head[3], rpm, 0, 0, tpm, 0, 0}
  if req then state[5], state[6] = math.max(0, math.floor(req)), reset(req, rpm) end
  if tokens then state[8], state[9] = math.max(0, math.floor(tokens)), reset(tokens, tpm) end
  return state
end
local over_by, wait_ms = nil, 0
if req and req < 1 then over_by, wait_ms = 'requests', math.ceil((1 - req) * 60000 / rpm) end
if not over_by and tokens and tokens < cost then
  over_by, wait_ms = 'tokens', math.ceil((cost - tokens) * 60000 / tpm)
end
if over_by then
  if over == '' then return rate_state({'rate_limited', over_by, wait_ms}) end
  tier = over
end
if redis.call('LLEN', tier .. ':depth') >= bound then return {'queue_full', bound} end
if not over_by and (req or tokens) then
  if req then req = req - 1 end
  if tokens then tokens = tokens - cost end
  redis.call('HSET', KEYS[5], 'req', tostring(req or 0), 'req_at', now, 'tok', tostring(tokens or 0), 'tok_at', now)
  redis.call('PEXPIRE', KEYS[5], 120000)
end

local record = cjson.decode(ARGV[4])
local fields = {}
for k, v in pairs(record) do fields[#fields + 1] = k; fields[#fields + 1] = v end
redis.call('HSET', KEYS[1], unpack(fields))
if record['deadline'] then redis.call('ZADD', '@DEADLINES@', record['deadline'], job_id) end
redis.call('HSET', KEYS[1], 'fq_tier', tier, 'client', client, 'weight', weight)
if not over_by and tokens then redis.call('HSET', KEYS[1], 'rl', KEYS[5], 'reserved', cost) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
local event_id = redis.call('XADD', KEYS[2], '*', 'event', 'status', 'data', '{"status":"queued"}')
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[6], job_id)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tonumber(ARGV[6]) - tonumber(ARGV[7]))
redis.call('EXPIRE', KEYS[3], ARGV[7])
if ARGV[2] ~= '' then redis.call('SET', KEYS[4], ARGV[2], 'EX', ARGV[3]) end
local a = 18
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  redis.call(unpack(ARGV, a + 1, a + n))
  a = a + n + 1
end
redis.call('HSET', WEIGHTS, client, weight)
if max_running > 0 then redis.call('HSET', '@MAX_RUNNING@', client, max_running)
else redis.call('HDEL', '@MAX_RUNNING@', client) end
redis.call('HINCRBY', KEYS[6], 'requests', 1)
if record['account'] and record['account'] ~= client then
  redis.call('HINCRBY', '@USAGE@' .. record['account'], 'requests', 1)
end
fair_push(KEYS[1], job_id, false)
return rate_state({'queued', event_id, tier})
""".replace("@MAX_RUNNING@", keys.FAIR_MAX_RUNNING).replace("@USAGE@", keys.usage("")).replace(
    "@DEADLINES@", keys.DEADLINES)


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
    for job_id, first, maxlen, partial, events, generated in jobs:
        call_keys += (keys.job(job_id), keys.events(job_id))
        args += (first, len(events), maxlen, partial, generated, *events)
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


def _error(status: JobStatus, error: str | None, cancel_reason: str | None) -> JobError | None:
    """A failed job's error; a canceled one's reason when something other than a client canceled it (a deadline)."""
    if status is JobStatus.failed and error:
        return JobError.model_validate_json(error)
    if status is JobStatus.canceled and cancel_reason:
        return JobError.model_validate_json(cancel_reason)
    return None


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
        error=_error(status, error, fields.get("cancel_reason")),
    )


def event_data(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
