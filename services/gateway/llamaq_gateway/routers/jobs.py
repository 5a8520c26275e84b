"""`/v1/jobs`: submit, poll (optionally waiting), cancel."""

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from llamaq_protocol import GenerationParams, Job

from ..deps import JobsDep, OwnerDep, RequestIdDep, SettingsDep
from ..schemas import JobId, error_responses

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
    params: GenerationParams,
    response: Response,
    jobs: JobsDep,
    owner: OwnerDep,
    request_id: RequestIdDep,
    # `str` with a None default, so the schema says "a string, or leave it out" (not "null").
    idempotency_key: Annotated[str, Header(max_length=256)] = None,
) -> dict:
    job = await jobs.submit(params, owner, request_id, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job.public()


@router.get("/{job_id}", response_model=None, responses={200: {"model": Job}, **error_responses(404, 422, 503)})
async def get_job(
    job_id: JobId,
    jobs: JobsDep,
    owner: OwnerDep,
    settings: SettingsDep,
    wait: Annotated[float, Query(ge=0, le=60, description="seconds to hold until the job is terminal")] = 0,
) -> dict:
    if wait > 0:
        return (await jobs.wait(job_id, owner, min(wait, settings.max_poll_wait_s))).public()
    return (await jobs.get(job_id, owner)).public()


@router.delete("/{job_id}", response_model=None, responses={200: {"model": Job}, **error_responses(404, 422, 503)})
async def cancel_job(job_id: JobId, jobs: JobsDep, owner: OwnerDep) -> dict:
    return (await jobs.cancel(job_id, owner)).public()
