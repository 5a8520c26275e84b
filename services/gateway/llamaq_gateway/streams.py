"""A job's token stream for Server-Sent Events, read from its Redis Stream (`keys.events(job_id)`).

The gateway writes `status: queued` at submit, the worker `status: running`, every text delta
(`token`, `{"index", "text"}`), the terminal status and `done`. Each entry's Redis id is the SSE `id:`, so a
client that reconnects with `Last-Event-ID` resumes exactly after what it saw: nothing lost, nothing twice.
Reading blocks in XREAD (no polling); a silence of `HEARTBEAT_S` yields a ping so proxies and clients keep
the connection. A client that goes away only stops its reader: the job itself runs on.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.exceptions
from fastapi.responses import StreamingResponse

from llamaq_protocol import JobStatus, keys
from llamaq_protocol.records import EVENT_DONE, event_data

from .errors import InvalidRequest, JobNotFound

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .jobs import JobService

logger = logging.getLogger(__name__)

START = "0-0"
HEARTBEAT_S = 15.0
# Stream ids are `<ms>-<seq>`; Redis also takes a bare `<ms>`.
EVENT_ID_PATTERN = re.compile(r"^\d{1,20}(-\d{1,20})?$")
READ_COUNT = 256

PING = ": ping\n\n"
SSE_MEDIA_TYPE = "text/event-stream"
# X-Accel-Buffering: any nginx in front flushes each event (ours also has proxy_buffering off for these paths).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class StreamEntry:
    id: str
    event: str
    data: str  # JSON text as stored

    def payload(self) -> dict[str, Any]:
        return json.loads(self.data) if self.data else {}


def resume_point(header: str | None, query: str | None) -> str:
    """Where to read from: after `Last-Event-ID` (the header wins over `?last_event_id=`), else the start."""
    value = header if header not in (None, "") else query
    if value is None or value.strip() == "":
        return START
    value = value.strip()
    if not EVENT_ID_PATTERN.match(value):
        raise InvalidRequest(
            f"Last-Event-ID: {value[:80]!r} is not an event id; send back the `id:` of the last event received"
        )
    return value


def sse_event(data: str, event: str | None = None, event_id: str | None = None) -> str:
    """One SSE event; `data` may span lines (each becomes its own `data:` line)."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        lines.append(f"data: {line}")
    return "\n".join(lines) + "\n\n"


def sse_data(payload: dict[str, Any] | str) -> str:
    """An unnamed `data:` event, as the OpenAI streaming format uses."""
    text = payload if isinstance(payload, str) else event_data(payload)
    return sse_event(text)


def sse_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(reply) -> list[StreamEntry]:
    if not reply:
        return []
    return [
        StreamEntry(id=_text(raw_id), event=_text(fields.get(b"event", b"")), data=_text(fields.get(b"data", b"")))
        for raw_id, fields in reply[0][1]
    ]


async def _ended(aio: aioredis.Redis, job_id: str) -> bool:
    """The job is terminal (its `done` entry is written in the same script) or its record is gone."""
    status = await aio.hget(keys.job(job_id), "status")
    return status is None or JobStatus(_text(status)).is_terminal()


async def has_entries_after(aio: aioredis.Redis, job_id: str, after: str) -> bool:
    return bool(_entries(await aio.xread({keys.events(job_id): after}, count=1)))


async def read_events(
    aio: aioredis.Redis, job_id: str, after: str = START, heartbeat_s: float = HEARTBEAT_S
) -> AsyncIterator[StreamEntry | None]:
    """The job's entries after `after`, through its `done`; `None` for each `heartbeat_s` of silence.

    Ends early only when the job is over and nothing is left after `after` (the reader had `done` already,
    or the stream expired with the result).
    """
    events_key = keys.events(job_id)
    last = after
    while True:
        entries = _entries(await aio.xread({events_key: last}, block=max(1, int(heartbeat_s * 1000)), count=READ_COUNT))
        if not entries:
            if await _ended(aio, job_id):
                # Status and `done` change together: re-read once so an entry written meanwhile is not lost.
                entries = _entries(await aio.xread({events_key: last}, count=READ_COUNT))
                if not entries:
                    return
            else:
                yield None
                continue
        for entry in entries:
            last = entry.id
            yield entry
            if entry.event == EVENT_DONE:
                return


async def job_event_stream(
    jobs: JobService, job_id: str, owner: str, after: str = START, heartbeat_s: float = HEARTBEAT_S
) -> AsyncIterator[str]:
    """`GET /v1/jobs/{id}/events`: entries as SSE events, the `done` one carrying the public job object."""
    try:
        async for entry in read_events(jobs.aio, job_id, after, heartbeat_s):
            if entry is None:
                yield PING
            elif entry.event == EVENT_DONE:
                job = await jobs.get(job_id, owner)
                yield sse_event(json.dumps(job.public(), ensure_ascii=False), EVENT_DONE, entry.id)
            else:
                yield sse_event(entry.data, entry.event, entry.id)
    except (redis.exceptions.RedisError, JobNotFound) as exc:
        # The headers are sent: end the stream; the client reconnects with its Last-Event-ID.
        logger.warning("event stream of job %s ended early: %s", job_id, exc)
