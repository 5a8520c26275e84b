"""`GET /v1/jobs`: the caller's own jobs, newest first, a page at a time.

Each owner (an API key's digest; with the API open, each client address) has a sorted set of its job ids scored by
creation time, written by the submission's admission script with the job record. Redis cannot expire members of a
set one by one, so an entry outlives its job (RESULT_TTL_S after the job ended) until a listing meets it without a
record and drops it; entries older than any record can live (jobs.INDEX_TTL_S) are trimmed at each submission, and
the set itself expires with the owner's newest possible record.

The cursor is a job id (`after`: the `last_id` of the previous page), resolved to its place in the set on each
request, so jobs submitted meanwhile neither shift nor repeat a page. With a `status` filter a page may scan past
non-matching jobs: `last_id` is the last job looked at, matching or not, so the next page starts after it.
"""

from __future__ import annotations

from typing import Any

from llamaq_protocol import JobStatus, keys
from llamaq_protocol.records import job_from_record

from .errors import InvalidRequest
from .jobs import JobService, queue_positions

MAX_LIMIT = 100
# Index entries one request reads at most (a status filter that matches little answers a short page, has_more).
MAX_SCANNED = 1000
SCAN_CHUNK = 100


async def cursor_start(aio, index: str, after: str | None, what: str) -> int:
    """Where a page starts in an owner's index, newest first: after `after` (the previous page's `last_id`, a
    `what` id), resolved on each request so that items added meanwhile neither shift nor repeat a page."""
    if after is None:
        return 0
    rank = await aio.zrevrank(index, after)
    if rank is None:
        raise InvalidRequest(f"after: no {what} {after!r} in this list (unknown, another key's, or expired)",
                             param="after")
    return rank + 1


async def list_jobs(
    jobs: JobService, owner: str, status: JobStatus | None, limit: int, after: str | None, list_owner: str
) -> dict[str, Any]:
    """`list_owner`: whose index to read (Caller.list_owner); each job listed must also be `owner`'s."""
    aio = jobs.aio
    index = keys.owner_jobs(list_owner)
    start = await cursor_start(aio, index, after, "job")
    found: list[tuple[str, dict]] = []
    gone: list[bytes] = []
    last_id: str | None = None
    scanned = 0
    exhausted = False
    while len(found) < limit and scanned < MAX_SCANNED:
        ids = await aio.zrevrange(index, start, start + SCAN_CHUNK - 1)
        if not ids:
            exhausted = True
            break
        async with aio.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.job(job_id.decode()))
            records = await pipe.execute()
        for job_id, record in zip(ids, records):
            start += 1
            scanned += 1
            if not record:
                gone.append(job_id)  # the job expired: its entry goes (after the scan, so ranks hold meanwhile)
                continue
            last_id = job_id.decode()
            if record.get(b"owner", b"").decode() != owner:
                continue
            if status is None or record.get(b"status", b"").decode() == status.value:
                found.append((last_id, record))
                if len(found) == limit:
                    break
    has_more = not exhausted and await aio.zcard(index) > start
    if gone:
        await aio.zrem(index, *gone)
    positions = await queue_positions(jobs, [
        (job_id, record) for job_id, record in found if record.get(b"status") == b"queued"])
    data = [job_from_record(job_id, record, positions.get(job_id)).public() for job_id, record in found]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        # With more to come: the cursor for the next page (the client's own again if every entry scanned had
        # expired); at the end, the last job of the page, as OpenAI's lists have it.
        "last_id": (last_id or after) if has_more else (data[-1]["id"] if data else None),
        "has_more": has_more,
    }
