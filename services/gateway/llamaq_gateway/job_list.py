"""`GET /v1/jobs`: the caller's own jobs, newest first, a page at a time.

Each owner (an API key's digest; with the API open, each client address) has a sorted set of its job ids scored by
creation time, written by the submission's admission script with the job record. Redis cannot expire members of a
set one by one, so an entry outlives its job (RESULT_TTL_S after the job ended) until a listing meets it without a
record and drops it; entries older than any record can live are trimmed at each submission, and the set itself
expires with the owner's newest possible record.

The cursor is a job id (`after`: the `last_id` of the previous page), resolved to its place in the set on each
request, so jobs submitted meanwhile neither shift nor repeat a page. With a `status` filter a page may scan past
non-matching jobs: `last_id` is the last job looked at, matching or not, so the next page starts after it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from llamaq_protocol import JobStatus, keys
from llamaq_protocol.records import job_from_record

from .errors import InvalidRequest

if TYPE_CHECKING:
    from .jobs import JobService

MAX_LIMIT = 100
# Waiting clients a position estimate looks at, least served first.
MAX_POSITION_CLIENTS = 1000
# Index entries one request reads at most (a status filter that matches little answers a short page, has_more).
MAX_SCANNED = 1000
SCAN_CHUNK = 100
# An index entry older than this cannot name a live record (jobs.UNFINISHED_RECORD_TTL_S, the longest a record
# lives); the set expires this long after its newest entry.
INDEX_TTL_S = 7 * 24 * 3600


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


async def queue_positions(jobs: JobService, queued: list[tuple[str, dict]]) -> dict[str, int | None]:
    """The 0-based places in the claim order of these queued jobs (id, record): the jobs of earlier tiers (every
    queued interactive job is ahead of a batch one, and those that arrive later too: its position can grow), its own
    client's jobs ahead of it, and of every other waiting client as many as the fair share will claim first. That is
    an estimate: a client's service grows by what its jobs really generate, counted as if each job cost this one's
    tokens (prompt + max tokens), weighted by each client's weight."""
    if not queued:
        return {}
    base = jobs.settings.queue_name
    tiers = keys.fair_tiers(base)
    wanted = {}
    for job_id, record in queued:
        tier, client = record.get(b"fq_tier", b"").decode(), record.get(b"client", b"").decode()
        if tier in tiers:
            wanted[job_id] = (tier, client, float(record.get(b"cost") or 1) or 1.0)
    if not wanted:
        return {}
    used = sorted({tier for tier, _, _ in wanted.values()}, key=tiers.index)
    async with jobs.aio.pipeline(transaction=False) as pipe:
        for tier in tiers:
            pipe.llen(tier + ":depth")
        for tier in used:
            pipe.zrange(tier + ":clients", 0, MAX_POSITION_CLIENTS - 1)
        for job_id, (tier, client, _) in wanted.items():
            pipe.lpos(keys.fair_jobs(tier, client), job_id)
        replies = await pipe.execute()
    depth = {tier: int(count or 0) for tier, count in zip(tiers, replies)}
    members = {tier: [m.decode() for m in found] for tier, found in zip(used, replies[len(tiers):])}
    places = replies[len(tiers) + len(used):]
    clients = sorted({c for found in members.values() for c in found} | {c for _, c, _ in wanted.values()})
    async with jobs.aio.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.FAIR_SERVICE, clients)
        pipe.hmget(keys.FAIR_WEIGHT, clients)
        for tier in used:
            for client in members[tier]:
                pipe.llen(keys.fair_jobs(tier, client))
        service, weights, *lengths = await pipe.execute()
    service = {c: float(v or 0) for c, v in zip(clients, service)}
    weight = {c: float(v or 1) for c, v in zip(clients, weights)}
    waiting = {}
    for tier in used:
        for client in members[tier]:
            waiting[(tier, client)] = lengths[len(waiting)]
    positions: dict[str, int | None] = {}
    for (job_id, (tier, client, cost)), place in zip(wanted.items(), places):
        if place is None:
            positions[job_id] = None  # claimed meanwhile
            continue
        ahead = sum(depth[t] for t in tiers[:tiers.index(tier)]) + place
        # Its client's service when this job comes up; another client's jobs that start below it go first.
        reached = service[client] + place * cost / weight[client]
        for other in members[tier]:
            if other != client:
                first = math.ceil((reached - service[other]) * weight[other] / cost)
                ahead += min(max(first, 0), waiting[(tier, other)])
        positions[job_id] = ahead
    return positions
