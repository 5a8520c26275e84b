"""`GET /v1/jobs/{id}/events`: the job's token stream as Server-Sent Events, resumable with Last-Event-ID."""

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from .. import streams
from ..deps import JobsDep, OwnerDep, StreamSlotsDep
from ..errors import error_responses
from ..job_api import JobId

# Documented, not enforced by FastAPI: a malformed id gets the API's own 400 (streams.resume_point).
_EVENT_ID = {"pattern": streams.EVENT_ID_PATTERN.pattern}

router = APIRouter(tags=["jobs"])


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=Response,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "status, token and done events"},
        204: {"description": "the job is over and the client already has its `done` event"},
        **error_responses(400, 404, 422, 503),
    },
)
async def job_events(
    job_id: JobId,
    jobs: JobsDep,
    owner: OwnerDep,
    slots: StreamSlotsDep,
    # Typed `str` with a None default (not `str | None`), so the schema says "a string, or leave it out".
    last_event_id_header: Annotated[str, Header(alias="last-event-id", json_schema_extra=_EVENT_ID)] = None,
    last_event_id: Annotated[
        str, Query(description="for clients that cannot set the Last-Event-ID header", json_schema_extra=_EVENT_ID)
    ] = None,
) -> Response:
    after = streams.resume_point(last_event_id_header, last_event_id)
    job = await jobs.get(job_id, owner)  # 404 before anything streams
    if after != streams.START and job.status.is_terminal() and not await streams.has_entries_after(
        jobs.aio, job_id, after
    ):
        # EventSource reconnects after a stream ends, but not after a 204.
        return Response(status_code=204)
    # Counted while it streams (429 over the client's cap); the slot is freed when the stream ends.
    return streams.sse_response(streams.job_event_stream(jobs, job_id, owner, after), release=slots.take())
