"""The OpenAI Batch API (`/v1/batches`): a file of requests run as batch-priority jobs on the one queue.

A batch moves through OpenAI's statuses: `validating` (created; its input file is read) -> `in_progress` (its
lines are queued as jobs, a chunk per round while the batch queue has room, so a 50,000-line batch never fills
MAX_BATCH_QUEUE or delays an interactive job) -> `finalizing` -> `completed`; `cancelling` -> `cancelled` after
POST .../cancel; `expired` once its `completion_window` has passed (unfinished lines are canceled, as for a cancel);
`failed` only when its input file is gone. A bad line never fails the batch: it goes to the error file.

Everything lives in Redis, so a gateway restart loses nothing: the batch's hash (with `submitted`, the cursor of
lines handled so far), and each finished line by line number in the batch's `output` or `error` hash. Line n of
batch B runs as job "B_n", so a round that died after queueing some of its lines finds them queued and skips
them. The job-state scripts append each ended job of a batch to BATCH_JOBS_ENDED (records.NOTIFY_LUA) in the step
that ends it; the driver turns each into its result line (an OpenAI response body, rendered as the OpenAI routes
render it) and trims the list only after writing, so a crash in between writes the same lines again, by number.
`request_counts.completed` and `.failed` are the sizes of those hashes, so they cannot drift from the files.

One gateway process drives every batch at a time (BATCH_DRIVER_LOCK, renewed each round); another takes over
within LOCK_TTL_MS of its death. The lock fences the one write that is not idempotent, the trim of the ended list
(TRIM_ENDED_SCRIPT): a driver whose lock lapsed mid-round cannot drop entries its successor has not collected. And
should a notice be lost all the same, a batch whose answered lines stop growing is reconciled from its line jobs
(`BatchDriver.reconcile`), so no batch waits forever for a job that has ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
import uuid
from typing import Any

from pydantic import ValidationError

from llamaq_protocol import JobStatus, Priority, keys, utc_now
from llamaq_protocol.records import CANCEL_SCRIPT, end_keys, job_from_record

from ..errors import InvalidParameter, LlamaqError, NotFound, error_body
from ..callers import Caller, batch_caller
from .files import PURPOSE_BATCH, PURPOSE_BATCH_OUTPUT, FileStore, owner_page, stored_file_commands
from .requests import BatchRequest
from ..jobs import JobService
from ..openai import CHAT, TEXT, ChatCompletionRequest, CompletionRequest, Rendering, completion, prepare
from ..settings import GatewaySettings

logger = logging.getLogger(__name__)

BATCH_ID_PREFIX = "batch_"
# What a batch id may be (batch_<24 hex>); anything else is a 404 without a look in Redis (no ':' into other keys).
BATCH_ID_PATTERN = re.compile(r"^batch_[A-Za-z0-9_-]{1,64}$")
ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/completions": TEXT}
COMPLETION_WINDOW_S = {"24h": 24 * 3600}
OUTPUT, ERROR = "output", "error"
RUNNING_STATUSES = ("validating", "in_progress", "cancelling", "finalizing")
FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")

ROUND_S = 0.25
LOCK_TTL_MS = 10_000
# Lines queued per batch per round, ended jobs collected per round, unfinished lines canceled per round.
SUBMIT_CHUNK = 200
COLLECT_CHUNK = 500
CANCEL_CHUNK = 500
# How often the driver removes the bytes of files whose record is gone (file_blobs.py).
FILE_SWEEP_S = 600.0
# A batch whose answered lines have not grown for this long, with every line submitted, is reconciled: each line
# without a result whose job has ended (or expired) gets its line from the job itself, so no lost notice can leave a
# batch unfinished.
RECONCILE_S = 30.0
RECONCILE_CHUNK = 500

# KEYS: the lock, the list of ended batch jobs. ARGV: this process's token, how many entries it collected. Trims
# them off the list only while this process still holds the lock (a fence): a driver whose lock lapsed mid-round
# (a pause, a slow Redis) and another that took over both read the same head of the list; were both to trim it, the
# second would drop entries nobody collected. Refused, the entries stay for the holder (writing a line twice is
# harmless: lines are written by number).
TRIM_ENDED_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
return 1
"""

# KEYS: the lock. ARGV: this process's token, ttl ms. Keeps the lock this process holds, or takes a free one.
HOLD_LOCK_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

# KEYS: the batch. ARGV: now. Only a batch still validating or in progress turns cancelling (the driver may be
# finalizing it meanwhile).
REQUEST_CANCEL_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'validating' or status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1], 'ending', 'cancelled')
end
return 1
"""


def new_batch_id() -> str:
    return BATCH_ID_PREFIX + uuid.uuid4().hex[:24]


def line_job_id(batch_id: str, line: int) -> str:
    return f"{batch_id}_{line}"


def line_of(job_id: str) -> int:
    return int(job_id.rpartition("_")[2])


def _text(record: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in record.items()}


def batch_object(batch_id: str, fields: dict[str, str], counts: tuple[int, int]) -> dict[str, Any]:
    """The OpenAI `batch` object; `counts`: (completed, failed) lines."""
    def at(name: str) -> int | None:
        value = fields.get(f"{name}_at")
        return int(float(value)) if value else None

    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": fields["endpoint"],
        "errors": json.loads(fields["errors"]) if fields.get("errors") else None,
        "input_file_id": fields["input_file_id"],
        "completion_window": fields["completion_window"],
        "status": fields["status"],
        "output_file_id": fields.get("output_file_id") or None,
        "error_file_id": fields.get("error_file_id") or None,
        **{f"{name}_at": at(name) for name in ("created", "in_progress", "expires", "finalizing", "completed",
                                               "failed", "expired", "cancelling", "cancelled")},
        "request_counts": {"total": int(fields.get("total") or 0), "completed": counts[0], "failed": counts[1]},
        "metadata": json.loads(fields["metadata"]) if fields.get("metadata") else None,
    }


class BatchService:
    def __init__(self, settings: GatewaySettings, aio, files: FileStore):
        self.settings = settings
        self.aio = aio
        self.files = files
        self._request_cancel = aio.register_script(REQUEST_CANCEL_SCRIPT)

    async def create(self, caller: Caller, body: BatchRequest) -> dict[str, Any]:
        """The batch's lines are queued later by the driver, as the caller: scheduled with its key's weight (its rate
        limits do not apply to them: a batch waits for room instead, as OpenAI's do)."""
        owner = caller.owner
        metadata = body.checked_metadata()
        record = await self.files.record(body.input_file_id, owner)
        if record.get(b"purpose", b"").decode() != PURPOSE_BATCH:
            raise InvalidParameter(f"input_file_id: {body.input_file_id!r} was not uploaded with purpose 'batch'",
                                   param="input_file_id")
        batch_id = new_batch_id()
        created = time.time()
        fields = {"owner": owner, "list_owner": caller.list_owner, "client": caller.client,
                  "account": caller.account, "weight": caller.weight, "status": "validating", "endpoint": body.endpoint,
                  "input_file_id": body.input_file_id, "completion_window": body.completion_window,
                  "created_at": int(created), "expires_at": int(created + COMPLETION_WINDOW_S[body.completion_window]),
                  "submitted": 0}
        if metadata is not None:
            fields["metadata"] = json.dumps(metadata)
        ttl = self.settings.file_ttl_s
        async with self.aio.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch(batch_id), mapping=fields)
            pipe.expire(keys.batch(batch_id), ttl)
            pipe.sadd(keys.BATCHES_ACTIVE, batch_id)
            pipe.zadd(keys.owner_batches(caller.list_owner), {batch_id: created})
            pipe.zremrangebyscore(keys.owner_batches(caller.list_owner), "-inf", created - ttl)
            pipe.expire(keys.owner_batches(caller.list_owner), ttl)
            await pipe.execute()
        logger.info("batch %s created from %s", batch_id, body.input_file_id)
        return await self.get(batch_id, owner)

    async def _fields(self, batch_id: str, owner: str) -> dict[str, str]:
        record = await self.aio.hgetall(keys.batch(batch_id)) if BATCH_ID_PATTERN.fullmatch(batch_id) else {}
        if not record or record.get(b"owner", b"").decode() != owner:
            raise NotFound(f"no batch {batch_id!r}", param="batch_id")
        return _text(record)

    async def get(self, batch_id: str, owner: str) -> dict[str, Any]:
        fields = await self._fields(batch_id, owner)
        return batch_object(batch_id, fields, await counts_of(self.aio, batch_id, fields))

    async def list(self, owner: str, limit: int, after: str | None, list_owner: str | None = None) -> dict[str, Any]:
        """`list_owner`: whose list (Caller.list_owner); each batch listed must also be `owner`'s."""
        async def load(ids: list[str]) -> list[dict[str, Any] | None]:
            async with self.aio.pipeline(transaction=False) as pipe:
                for batch_id in ids:
                    pipe.hgetall(keys.batch(batch_id))
                records = await pipe.execute()
            found = []
            for batch_id, record in zip(ids, records):
                fields = _text(record)
                if fields.get("owner") != owner:
                    found.append(None)
                else:
                    found.append(batch_object(batch_id, fields, await counts_of(self.aio, batch_id, fields)))
            return found

        return await owner_page(self.aio, keys.owner_batches(list_owner or owner), "batch", load, limit, after)

    async def cancel(self, batch_id: str, owner: str) -> dict[str, Any]:
        """Asks the driver to cancel the batch's unfinished lines; the batch is `cancelling` until they have."""
        fields = await self._fields(batch_id, owner)
        if fields["status"] in ("validating", "in_progress"):
            await self._request_cancel(keys=[keys.batch(batch_id)], args=[int(time.time())])
        elif fields["status"] in ("completed", "failed", "expired"):
            raise InvalidParameter(f"batch {batch_id} is {fields['status']}: there is nothing left to cancel",
                                   param="batch_id")
        return await self.get(batch_id, owner)


async def counts_of(aio, batch_id: str, fields: dict[str, str]) -> tuple[int, int]:
    """(completed, failed) lines: counted live while the batch runs, kept in its record once it has ended."""
    if fields["status"] in FINAL_STATUSES:
        return int(fields.get("completed_count") or 0), int(fields.get("failed_count") or 0)
    async with aio.pipeline(transaction=False) as pipe:
        pipe.hlen(keys.batch_lines(batch_id, OUTPUT))
        pipe.hlen(keys.batch_lines(batch_id, ERROR))
        completed, failed = await pipe.execute()
    return completed, failed


# ---- lines ---------------------------------------------------------------------------------------------------


class LineRefused(Exception):
    """A line llamaq will not run: its result line says why, and the batch goes on."""

    def __init__(self, message: str, status_code: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code  # None: the line itself is malformed (no response at all)
        self.body = body


@dataclasses.dataclass
class BatchInput:
    """A batch's input file as the driver reads it: its request lines counted once (the file's line index), each
    line read and parsed only when it is queued (a dict, or the reason it is not a request)."""

    files: FileStore
    file_id: str
    count: int

    async def entries(self, lines: range) -> list[dict[str, Any] | str] | None:
        """The lines' entries; None when the file is gone."""
        return await asyncio.to_thread(self.files.blobs.lines, self.file_id, lines.start, len(lines))

    async def custom_id(self, line: int) -> str | None:
        entries = await self.entries(range(line, line + 1)) if 0 <= line < self.count else None
        entry = entries[0] if entries else None
        return entry.get("custom_id") if isinstance(entry, dict) else None

    @staticmethod
    def request(entry: dict[str, Any] | str, endpoint: str) -> tuple[str, ChatCompletionRequest | CompletionRequest]:
        """A line's custom id and its request body, or LineRefused."""
        if isinstance(entry, str):
            raise LineRefused(entry)
        unknown = set(entry) - {"custom_id", "method", "url", "body"}
        if unknown:
            raise LineRefused(f"unknown field(s) {sorted(unknown)}: a line has custom_id, method, url and body")
        if entry.get("method") != "POST":
            raise LineRefused("method: must be 'POST'")
        if entry.get("url") != endpoint:
            raise LineRefused(f"url: must be the batch's endpoint, {endpoint!r}")
        body = entry.get("body")
        if not isinstance(body, dict):
            raise LineRefused("body: a JSON object (the request) is required")
        if body.get("stream"):
            raise LineRefused("body.stream: a batch line is answered whole; leave stream out", 400,
                              error_body(400, "invalid_request_error", "stream is not supported in a batch",
                                         openai=True, param="stream"))
        model = ChatCompletionRequest if ENDPOINTS[endpoint] == CHAT else CompletionRequest
        try:
            return entry["custom_id"], model.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            message = f"{param or 'body'}: {first.get('msg')}"
            raise LineRefused(message, 422, error_body(422, "invalid_request", message, openai=True,
                                                       param=param)) from exc


def result_line(batch_id: str, line: int, custom_id: str | None, *, status_code: int | None = None,
                body: dict | None = None, request_id: str | None = None,
                error: dict[str, str] | None = None) -> str:
    """One line of an output or error file, as OpenAI writes them."""
    return json.dumps({
        "id": f"batch_req_{line_job_id(batch_id, line)}",
        "custom_id": custom_id,
        "response": None if status_code is None else {"status_code": status_code, "request_id": request_id,
                                                      "body": body},
        "error": error,
    }, separators=(",", ":"), ensure_ascii=False)


def ended_line(batch_id: str, job_id: str, record: dict[bytes, bytes], custom_id: str | None,
               endpoint: str) -> tuple[str, str]:
    """(OUTPUT or ERROR, the result line) of an ended job of the batch."""
    line = line_of(job_id)
    if not record:
        return ERROR, result_line(batch_id, line, custom_id, error={
            "code": "result_expired", "message": "the job's result expired before the batch collected it"})
    custom_id = record.get(b"batch_custom_id", b"").decode() or custom_id
    job = job_from_record(job_id, record)
    status = job.status.value
    if status == "succeeded":
        render = json.loads(record[b"batch_render"])
        model = render.pop("model")
        body = completion(ENDPOINTS[endpoint], job, model, Rendering(**render))
        return OUTPUT, result_line(batch_id, line, custom_id, status_code=200, body=body, request_id=job_id)
    if status == "failed":
        error = job.error
        body = error_body(500, error.type if error else "internal_error",
                          error.message if error else "the job failed", openai=True)
        return ERROR, result_line(batch_id, line, custom_id, status_code=500, body=body, request_id=job_id)
    if job.error and job.error.type == "deadline_exceeded":  # its job's deadline: the batch's completion window
        return ERROR, result_line(batch_id, line, custom_id, error={
            "code": "batch_expired", "message": "the batch's completion window ended before the line finished"})
    return ERROR, result_line(batch_id, line, custom_id, error={
        "code": "batch_cancelled", "message": "the line was canceled before it finished (batch cancelled or "
                                              "expired, or its job canceled)"})


# ---- the driver ----------------------------------------------------------------------------------------------


class BatchDriver:
    """Runs in every gateway process; the one holding BATCH_DRIVER_LOCK advances every batch each round."""

    def __init__(self, jobs: JobService, files: FileStore):
        self.jobs = jobs
        self.aio = jobs.aio
        self.settings = jobs.settings
        self.files = files
        self.token = uuid.uuid4().hex
        self._hold = self.aio.register_script(HOLD_LOCK_SCRIPT)
        self._trim = self.aio.register_script(TRIM_ENDED_SCRIPT)
        self._inputs: dict[str, BatchInput] = {}
        self._next_sweep = 0.0
        # Batch id -> (its answered lines, when that count last changed), for `reconcile`.
        self._progress: dict[str, tuple[int, float]] = {}

    async def run_forever(self) -> None:
        while True:
            try:
                if await self._hold(keys=[keys.BATCH_DRIVER_LOCK], args=[self.token, LOCK_TTL_MS]):
                    await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away, say: every step is safe to take again next round
                logger.warning("batch round failed", exc_info=True)
            await asyncio.sleep(ROUND_S)

    async def round(self) -> None:
        while await self.collect_ended() == COLLECT_CHUNK:
            pass
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + FILE_SWEEP_S
            removed = await self.files.sweep()
            if removed:
                logger.info("removed %d file(s) of FILES_DIR whose record is gone", removed)
        for batch_id in sorted(b.decode() for b in await self.aio.smembers(keys.BATCHES_ACTIVE)):
            await self.advance(batch_id)

    async def _input(self, batch_id: str, input_file_id: str) -> BatchInput | None:
        parsed = self._inputs.get(batch_id)
        if parsed is None:
            count = await self.files.line_count(input_file_id)
            if count is None:
                return None
            parsed = self._inputs[batch_id] = BatchInput(self.files, input_file_id, count)
        return parsed

    async def collect_ended(self) -> int:
        """Turns ended jobs of batches into result lines; how many entries it took from the list."""
        items = await self.aio.lrange(keys.BATCH_JOBS_ENDED, 0, COLLECT_CHUNK - 1)
        if not items:
            return 0
        pairs = [item.decode().split(" ", 1) for item in items]
        async with self.aio.pipeline(transaction=False) as pipe:
            for batch_id, job_id in pairs:
                pipe.hgetall(keys.job(job_id))
                pipe.hmget(keys.batch(batch_id), "status", "endpoint", "input_file_id")
            replies = await pipe.execute()
        async with self.aio.pipeline(transaction=False) as pipe:
            for (batch_id, job_id), record, (status, endpoint, input_file_id) in zip(
                    pairs, replies[::2], replies[1::2]):
                if status is None or status.decode() not in RUNNING_STATUSES:
                    continue  # the batch ended (or expired) already
                parsed = None if record else await self._input(batch_id, input_file_id.decode())
                custom_id = await parsed.custom_id(line_of(job_id)) if parsed else None
                kind, line = ended_line(batch_id, job_id, record, custom_id, endpoint.decode())
                pipe.hset(keys.batch_lines(batch_id, kind), str(line_of(job_id)), line)
                pipe.expire(keys.batch_lines(batch_id, kind), self.settings.file_ttl_s)
            await pipe.execute()
        if not await self._trim(keys=[keys.BATCH_DRIVER_LOCK, keys.BATCH_JOBS_ENDED], args=[self.token, len(items)]):
            logger.warning("batch driver lost its lock mid-round; the ended jobs it read stay for the holder")
            return 0
        return len(items)

    async def advance(self, batch_id: str) -> None:
        record = await self.aio.hgetall(keys.batch(batch_id))
        if not record:
            await self.aio.srem(keys.BATCHES_ACTIVE, batch_id)
            self._inputs.pop(batch_id, None)
            return
        fields = _text(record)
        status = fields["status"]
        if status in ("validating", "in_progress") and time.time() >= float(fields["expires_at"]):
            await self.aio.hset(keys.batch(batch_id), mapping={"status": "cancelling", "ending": "expired"})
            return
        if status == "validating":
            parsed = await self._input_or_fail(batch_id, fields)
            if parsed is None:
                return
            await self.aio.hset(keys.batch(batch_id), mapping={
                "status": "in_progress", "in_progress_at": int(time.time()), "total": parsed.count})
            return
        submitted, total = int(fields["submitted"]), int(fields.get("total") or 0)
        if status == "in_progress" and submitted < total:
            parsed = await self._input_or_fail(batch_id, fields)
            if parsed is not None:
                await self._submit(batch_id, fields, parsed, submitted, total)
            return
        if status == "cancelling" and not fields.get("cancel_sent"):
            await self._cancel_unfinished(batch_id, submitted)
            return
        if status == "finalizing":  # a round that died while writing the files: write them again
            await self._finalize(batch_id, fields, "completed")
            return
        if status in ("in_progress", "cancelling"):
            completed, failed = await counts_of(self.aio, batch_id, fields)
            if completed + failed < submitted and self._stalled(batch_id, completed + failed):
                await self.reconcile(batch_id, fields, submitted)
                completed, failed = await counts_of(self.aio, batch_id, fields)
            if completed + failed >= submitted:
                self._progress.pop(batch_id, None)
                await self._finalize(batch_id, fields, fields.get("ending") or "completed")

    def _stalled(self, batch_id: str, answered: int) -> bool:
        """Whether the batch's answered lines have not grown for RECONCILE_S (then it is reconciled, and waits
        RECONCILE_S again)."""
        now = time.monotonic()
        seen, since = self._progress.get(batch_id, (-1, now))
        if answered != seen:
            self._progress[batch_id] = (answered, now)
            return False
        if now - since < RECONCILE_S:
            return False
        self._progress[batch_id] = (answered, now)
        return True

    async def reconcile(self, batch_id: str, fields: dict[str, str], submitted: int) -> int:
        """Writes the line of every submitted line without one whose job has ended, or whose record is gone (its
        result expired), read from the job itself: what collect_ended would have written had the job's notice on
        BATCH_JOBS_ENDED not been lost. Returns how many lines it wrote."""
        written = 0
        for start in range(0, submitted, RECONCILE_CHUNK):
            unanswered = await self._unanswered(batch_id, range(start, min(submitted, start + RECONCILE_CHUNK)))
            async with self.aio.pipeline(transaction=False) as pipe:
                for line in unanswered:
                    pipe.hget(keys.job(line_job_id(batch_id, line)), "status")
                statuses = await pipe.execute()
            missing = [line for line, status in zip(unanswered, statuses)
                       if status is None or JobStatus(status.decode()).is_terminal()]
            for line in missing:
                job_id = line_job_id(batch_id, line)
                record = await self.aio.hgetall(keys.job(job_id))
                parsed = None if record else await self._input(batch_id, fields["input_file_id"])
                custom_id = await parsed.custom_id(line) if parsed else None
                kind, text = ended_line(batch_id, job_id, record, custom_id, fields["endpoint"])
                await self.aio.hset(keys.batch_lines(batch_id, kind), str(line), text)
                await self.aio.expire(keys.batch_lines(batch_id, kind), self.settings.file_ttl_s)
                written += 1
        if written:
            logger.warning("batch %s reconciled: %d line(s) whose job had ended without its notice", batch_id,
                           written)
        return written

    async def _input_or_fail(self, batch_id: str, fields: dict[str, str]) -> BatchInput | None:
        """The batch's parsed input; None (and the batch failed) when its file is gone."""
        parsed = await self._input(batch_id, fields["input_file_id"])
        if parsed is None:
            await self._fail(batch_id, "file_not_found", f"input file {fields['input_file_id']} no longer exists")
        return parsed

    async def _submit(self, batch_id: str, fields: dict[str, str], parsed: BatchInput, submitted: int,
                      total: int) -> None:
        room = self.settings.max_batch_queue - await self.jobs.queued(Priority.batch)
        lines = range(submitted, min(total, submitted + min(SUBMIT_CHUNK, room)))
        if not lines:
            return  # the batch queue is full: the lines wait for room, they are not refused
        async with self.aio.pipeline(transaction=False) as pipe:
            for line in lines:
                pipe.exists(keys.job(line_job_id(batch_id, line)))
            queued_already = await pipe.execute()
        entries = await parsed.entries(lines)
        if entries is None:
            await self._fail(batch_id, "file_not_found", f"input file {fields['input_file_id']} no longer exists")
            return
        done = submitted
        for line, exists, entry in zip(lines, queued_already, entries):
            if not exists and not await self._queue_line(batch_id, fields, entry, line):
                break  # no worker ready, or the queue filled up: this line and the rest next round
            done = line + 1
            await asyncio.sleep(0)  # a chunk's prompts are tokenized here: let the requests of this process in
        await self.aio.hset(keys.batch(batch_id), "submitted", done)

    async def _queue_line(self, batch_id: str, fields: dict[str, str], entry: dict[str, Any] | str,
                          line: int) -> bool:
        """Queues one line as a job, or writes its refusal to the error file; False when it must wait."""
        endpoint = fields["endpoint"]
        custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
        try:
            custom_id, req = BatchInput.request(entry, endpoint)
            params, card, rendering = await prepare(req, self.jobs, self.settings)
            prompt_tokens = await self.jobs.check_params(params, card)
        except LineRefused as refused:
            error = None if refused.status_code else {"code": "invalid_request", "message": refused.message}
            await self._refuse(batch_id, line, result_line(batch_id, line, custom_id, status_code=refused.status_code,
                                                           body=refused.body, error=error))
            return True
        except LlamaqError as exc:
            if exc.status_code not in (400, 404, 413, 422):
                logger.info("batch %s waits: %s", batch_id, exc.message)
                return False
            body = error_body(exc.status_code, exc.error_type, exc.message, openai=True, param=exc.param)
            await self._refuse(batch_id, line, result_line(batch_id, line, custom_id, status_code=exc.status_code,
                                                           body=body))
            return True
        render = {"model": card.name, **dataclasses.asdict(rendering)}
        try:
            await self.jobs.enqueue(
                params, fields["owner"], None, None, Priority.batch, job_id=line_job_id(batch_id, line),
                caller=batch_caller(fields), prompt_tokens=prompt_tokens, deadline=float(fields["expires_at"]),
                record_extra={"batch": batch_id, "batch_custom_id": custom_id, "batch_render": json.dumps(render)},
            )
        except LlamaqError as exc:  # the batch queue filled meanwhile
            logger.info("batch %s waits: %s", batch_id, exc.message)
            return False
        return True

    async def _refuse(self, batch_id: str, line: int, result: str) -> None:
        async with self.aio.pipeline(transaction=False) as pipe:
            pipe.hset(keys.batch_lines(batch_id, ERROR), str(line), result)
            pipe.expire(keys.batch_lines(batch_id, ERROR), self.settings.file_ttl_s)
            await pipe.execute()

    async def _cancel_unfinished(self, batch_id: str, submitted: int) -> None:
        """Cancels every queued or running job of the batch (each then ends `canceled` and is collected)."""
        cancel_sha = await self.aio.script_load(CANCEL_SCRIPT)
        for start in range(0, submitted, CANCEL_CHUNK):
            unanswered = await self._unanswered(batch_id, range(start, min(submitted, start + CANCEL_CHUNK)))
            now = utc_now().isoformat()
            async with self.aio.pipeline(transaction=False) as pipe:
                for line in unanswered:
                    job_id = line_job_id(batch_id, line)
                    job_keys = end_keys(job_id)
                    pipe.evalsha(cancel_sha, len(job_keys), *job_keys, now, job_id, self.settings.result_ttl_s)
                await pipe.execute()
        await self.aio.hset(keys.batch(batch_id), "cancel_sent", 1)

    async def _unanswered(self, batch_id: str, lines: range) -> list[int]:
        """Those of `lines` with neither an output nor an error line yet, in one round trip."""
        async with self.aio.pipeline(transaction=False) as pipe:
            for line in lines:
                pipe.hexists(keys.batch_lines(batch_id, OUTPUT), str(line))
                pipe.hexists(keys.batch_lines(batch_id, ERROR), str(line))
            answered = await pipe.execute()
        return [line for line, has_output, has_error in zip(lines, answered[::2], answered[1::2])
                if not (has_output or has_error)]

    async def _fail(self, batch_id: str, code: str, message: str) -> None:
        errors = {"object": "list", "data": [{"code": code, "message": message, "param": "input_file_id",
                                              "line": None}]}
        async with self.aio.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch(batch_id), mapping={"status": "failed", "failed_at": int(time.time()),
                                                     "errors": json.dumps(errors)})
            pipe.srem(keys.BATCHES_ACTIVE, batch_id)
            await pipe.execute()
        self._inputs.pop(batch_id, None)
        logger.warning("batch %s failed: %s", batch_id, message)

    async def _finalize(self, batch_id: str, fields: dict[str, str], final: str) -> None:
        """Writes the output and error files (lines in input order) and ends the batch, in one transaction. File
        ids follow from the batch's, so finalizing twice (a crash before the end) writes the same files."""
        now = int(time.time())
        if final == "completed":
            await self.aio.hset(keys.batch(batch_id), mapping={"status": "finalizing", "finalizing_at": now})
        async with self.aio.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.batch_lines(batch_id, OUTPUT))
            pipe.hgetall(keys.batch_lines(batch_id, ERROR))
            outputs, errors = await pipe.execute()
        owner, hex_id = fields["owner"], batch_id.removeprefix(BATCH_ID_PREFIX)
        ended = {"status": final, f"{final}_at": now, "completed_count": len(outputs), "failed_count": len(errors)}
        sizes = {}
        for kind, lines in ((OUTPUT, outputs), (ERROR, errors)):
            if lines:  # the bytes first (file_blobs.py): a crash before the transaction writes them again
                ordered = sorted(lines.items(), key=lambda item: int(item[0]))
                content = b"".join(line + b"\n" for _, line in ordered)
                await asyncio.to_thread(self.files.blobs.write, f"file-{hex_id}-{kind}", content)
                sizes[kind] = len(content)
        async with self.aio.pipeline(transaction=True) as pipe:
            for kind, size in sizes.items():
                file_id = f"file-{hex_id}-{kind}"
                stored_file_commands(pipe, file_id, owner, f"{batch_id}_{kind}.jsonl", PURPOSE_BATCH_OUTPUT,
                                     size, self.settings.file_ttl_s, fields.get("list_owner") or owner)
                ended[f"{kind}_file_id"] = file_id
            pipe.hset(keys.batch(batch_id), mapping=ended)
            pipe.srem(keys.BATCHES_ACTIVE, batch_id)
            pipe.delete(keys.batch_lines(batch_id, OUTPUT), keys.batch_lines(batch_id, ERROR))
            await pipe.execute()
        self._inputs.pop(batch_id, None)
        logger.info("batch %s %s: %d answered, %d in the error file", batch_id, final, len(outputs), len(errors))
