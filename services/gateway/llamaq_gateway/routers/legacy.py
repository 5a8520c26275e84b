"""`POST /`: the original tutorial server's contract, unchanged for old clients."""

from datetime import datetime

from fastapi import APIRouter

from llamaq_protocol import GenerationParams, JobStatus

from ..deps import CallerDep, DeadlineDep, IdempotencyKeyDep, JobsDep, RequestIdDep, SettingsDep, StreamSlotsDep
from ..errors import JobFailed, WaitTimeout, error_responses
from ..job_api import LegacyResponse

router = APIRouter(tags=["original"])


@router.post("/", response_model=LegacyResponse, responses=error_responses(400, 413, 422, 503, 504))
async def original_generate(
    params: GenerationParams,
    jobs: JobsDep,
    caller: CallerDep,
    request_id: RequestIdDep,
    settings: SettingsDep,
    slots: StreamSlotsDep,
    cancel_after: DeadlineDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> LegacyResponse:
    with slots.hold():
        job = await jobs.submit_and_wait(params, caller.owner, request_id, settings.legacy_wait_s,
                                         idempotency_key=idempotency_key, caller=caller, deadline=cancel_after)
    if job.status is JobStatus.failed:
        raise JobFailed.of(job)
    if not job.status.is_terminal():
        raise WaitTimeout(f"job {job.id} is still {job.status.value}; poll GET /v1/jobs/{job.id}")
    text = job.output.text if job.output else ""
    # Local wall-clock time in the original's format.
    return LegacyResponse(response=text, time=datetime.now().strftime("%Y-%m-%d %H:%M:%S"), id=job.id)
