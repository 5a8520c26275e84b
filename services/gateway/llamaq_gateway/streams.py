"""A job's token stream for Server-Sent Events, read from its Redis Stream (`keys.events(job_id)`).

The gateway writes `status: queued` at submit, the worker `status: running`, every text delta
(`token`, `{"index", "text"}`), the terminal status and `done`. Each entry's Redis id is the SSE `id:`, so a
client that reconnects with `Last-Event-ID` resumes exactly after what it saw: nothing lost, nothing twice.
Entries come from the process's event hub (`event_hub.py`: a few shared Redis connections blocked in one XREAD
for every waiter; no polling); a silence of `HEARTBEAT_S` yields a ping so proxies and clients keep the
connection. A client that goes away only stops its reader: the job itself runs on. A client that reads slower than
the job writes (STREAM_MAX_PENDING_EVENTS entries behind) has its stream closed after the last event it was sent;
it reconnects with that `Last-Event-ID` and reads the rest from Redis. The wire format itself (an event's bytes,
the ping) is sse.py's.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import redis.exceptions
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from llamaq_protocol import JobStatus, keys
from llamaq_protocol.records import EVENT_DONE

from .errors import InvalidRequest, JobNotFound
from .event_hub import READ_COUNT, START, StreamEntry, SubscriberTooSlow, entries_of, parse_id
from .sse import PING_BYTES, sse_event

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .event_hub import EventHub
    from .jobs import JobService

logger = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
# Stream ids are `<ms>-<seq>`; Redis also takes a bare `<ms>`.
EVENT_ID_PATTERN = re.compile(r"^\d{1,20}(-\d{1,20})?$")
# Each part is a 64-bit unsigned number: Redis refuses a larger one (in the XREAD every waiter shares).
MAX_ID_PART = 2**64 - 1

SSE_MEDIA_TYPE = "text/event-stream"
# X-Accel-Buffering: any nginx in front flushes each event (ours also has proxy_buffering off for these paths).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def resume_point(header: str | None, query: str | None) -> str:
    """Where to read from: after `Last-Event-ID` (the header wins over `?last_event_id=`), else the start."""
    value = header if header not in (None, "") else query
    if value is None or value.strip() == "":
        return START
    value = value.strip()
    if not EVENT_ID_PATTERN.match(value) or max(parse_id(value)) > MAX_ID_PART:
        raise InvalidRequest(
            f"Last-Event-ID: {value[:80]!r} is not an event id; send back the `id:` of the last event received"
        )
    return value


def sse_response(body: AsyncIterator[str | bytes], release: Callable[[], None] | None = None) -> StreamingResponse:
    """`release` (idempotent) runs once the stream is over: when the body ends or fails, and after the response
    (a client gone before the body started)."""
    if release is None:
        return StreamingResponse(body, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
    return StreamingResponse(
        _released_after(body, release), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS,
        background=BackgroundTask(release),
    )


async def _released_after(body: AsyncIterator[str | bytes], release: Callable[[], None]) -> AsyncIterator[str | bytes]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        release()


async def _ended(aio: aioredis.Redis, job_id: str) -> bool:
    """The job is terminal (its `done` entry is written in the same script) or its record is gone; False when
    Redis cannot say (an outage is ridden out by the event hub, which raises once it has lasted too long)."""
    try:
        status = await aio.hget(keys.job(job_id), "status")
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        return False
    return status is None or JobStatus(status.decode()).is_terminal()


async def has_entries_after(aio: aioredis.Redis, job_id: str, after: str) -> bool:
    return bool(await aio.xread({keys.events(job_id): after}, count=1))


async def read_batches(
    hub: EventHub, job_id: str, after: str = START, heartbeat_s: float = HEARTBEAT_S
) -> AsyncIterator[list[StreamEntry] | None]:
    """The job's entries after `after`, through its `done`, in batches of those come together (from the process's
    event hub, without a Redis connection of its own); `None` for each `heartbeat_s` of silence.

    Ends early only when the job is over and nothing is left after `after` (the reader had `done` already,
    or the stream expired with the result).
    """
    events_key = keys.events(job_id)
    # Past this id only: set once entries were read around the hub (below), which may hand them over again.
    seen: tuple[int, int] | None = None
    with await hub.subscribe(events_key, after) as subscription:
        while True:
            batch = await subscription.next_batch(heartbeat_s)
            if not batch:
                if not await _ended(hub.commands, job_id):
                    yield None
                    continue
                # Status and `done` change together: read once more, so an entry the hub has not handed over yet
                # is not lost.
                reply = await hub.commands.xread({events_key: subscription.last_id}, count=READ_COUNT)
                batch = entries_of(reply[0][1]) if reply else []
                if not batch:
                    return
                seen = parse_id(batch[-1].id)
            elif seen is not None:
                batch = [entry for entry in batch if parse_id(entry.id) > seen]
                if not batch:
                    continue
            for end, entry in enumerate(batch):
                if entry.ends:
                    yield batch[: end + 1]
                    return
            yield batch


async def read_events(
    hub: EventHub, job_id: str, after: str = START, heartbeat_s: float = HEARTBEAT_S
) -> AsyncIterator[StreamEntry | None]:
    """`read_batches` one entry at a time."""
    async for batch in read_batches(hub, job_id, after, heartbeat_s):
        if batch is None:
            yield None
        else:
            for entry in batch:
                yield entry


async def job_event_stream(
    jobs: JobService, job_id: str, owner: str, after: str = START, heartbeat_s: float = HEARTBEAT_S
) -> AsyncIterator[bytes]:
    """`GET /v1/jobs/{id}/events`: entries as SSE events, the `done` one carrying the public job object; the
    entries come together are sent together. A client too slow for the stream gets an end after the last event it
    was sent (an SSE client reconnects with its id as Last-Event-ID)."""
    try:
        async for batch in read_batches(jobs.hub, job_id, after, heartbeat_s):
            if batch is None:
                yield PING_BYTES
                continue
            chunks = []
            for entry in batch:
                if entry.ends:
                    job = await jobs.ended(job_id, owner)
                    chunks.append(sse_event(json.dumps(job.public(), ensure_ascii=False), EVENT_DONE,
                                            entry.id).encode())
                else:
                    chunks.append(entry.sse)
            yield b"".join(chunks)
    except (redis.exceptions.RedisError, JobNotFound, SubscriberTooSlow) as exc:
        # The headers are sent: end the stream; the client reconnects with its Last-Event-ID.
        logger.warning("event stream of job %s ended early: %s", job_id, exc)
