"""`/v1/jobs`: submit, poll (optionally waiting), cancel."""

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from llamaq_protocol import GenerationParams

from ..deps import JobsDep, OwnerDep, RequestIdDep, SettingsDep

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202)
async def submit_job(
    params: GenerationParams,
    response: Response,
    jobs: JobsDep,
    owner: OwnerDep,
    request_id: RequestIdDep,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> dict:
    job = await jobs.submit(params, owner, request_id, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job.public()


@router.get("/{job_id}")
async def get_job(
    job_id: str,
    jobs: JobsDep,
    owner: OwnerDep,
    settings: SettingsDep,
    wait: Annotated[float, Query(ge=0, le=60, description="seconds to hold until the job is terminal")] = 0,
) -> dict:
    if wait > 0:
        return (await jobs.wait(job_id, owner, min(wait, settings.max_poll_wait_s))).public()
    return (await jobs.get(job_id, owner)).public()


@router.delete("/{job_id}")
async def cancel_job(job_id: str, jobs: JobsDep, owner: OwnerDep) -> dict:
    return (await jobs.cancel(job_id, owner)).public()
