"""`/v1/jobs`: submit, list, poll (optionally waiting), cancel."""

from typing import Annotated

from fastapi import APIRouter, Query, Response

from llamaq_protocol import Job, JobStatus

from ..deps import (CallerDep, DeadlineDep, IdempotencyKeyDep, JobsDep, OwnerDep, RequestIdDep, SettingsDep,
                    StreamSlotsDep)
from ..errors import error_responses
from ..job_api import JobId, JobRequest
from ..job_list import MAX_LIMIT, list_jobs
from ..webhooks import check_submission

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=202,
    response_model=None,
    responses={
        202: {"model": Job, "description": "queued", "headers": {"Location": {"schema": {"type": "string"}}}},
        **error_responses(400, 413, 422, 503),
    },
)
async def submit_job(
    body: JobRequest,
    response: Response,
    jobs: JobsDep,
    caller: CallerDep,
    request_id: RequestIdDep,
    cancel_after: DeadlineDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> dict:
    await check_submission(jobs.settings, body.webhook)
    job = await jobs.submit(body.generation_params(), caller.owner, request_id, idempotency_key, priority=body.priority,
                            webhook=body.webhook_record(), caller=caller, deadline=body.deadline_with(cancel_after))
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job.public()


@router.get("", response_model=None, responses=error_responses(400, 422, 503))
async def list_own_jobs(
    jobs: JobsDep,
    caller: CallerDep,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="jobs per page")] = 20,
    after: Annotated[str, Query(max_length=64, description="the previous page's `last_id`")] = None,
) -> dict:
    """The caller's own jobs (its API key's; with the API open, those submitted from its address), newest first:
    `{"object": "list", "data", "first_id", "last_id", "has_more"}`; pass `last_id` as `after` for the next page."""
    return await list_jobs(jobs, caller.owner, status, limit, after, caller.list_owner)


@router.get("/{job_id}", response_model=None, responses={200: {"model": Job}, **error_responses(404, 422, 503)})
async def get_job(
    job_id: JobId,
    jobs: JobsDep,
    owner: OwnerDep,
    settings: SettingsDep,
    slots: StreamSlotsDep,
    wait: Annotated[float, Query(ge=0, le=60, description="seconds to hold until the job is terminal")] = 0,
) -> dict:
    if wait > 0:
        with slots.hold():
            return (await jobs.wait(job_id, owner, min(wait, settings.max_poll_wait_s))).public()
    return (await jobs.get(job_id, owner)).public()


@router.delete("/{job_id}", response_model=None, responses={200: {"model": Job}, **error_responses(404, 422, 503)})
async def cancel_job(job_id: JobId, jobs: JobsDep, owner: OwnerDep) -> dict:
    return (await jobs.cancel(job_id, owner)).public()
