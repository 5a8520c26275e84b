"""`POST /v1/generate`: submit and wait up to `wait_s`; 202 with the job to poll if it is not done by then."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from llamaq_protocol import Job

from ..deps import CallerDep, DeadlineDep, IdempotencyKeyDep, JobsDep, RequestIdDep, StreamSlotsDep
from ..errors import error_responses
from ..job_api import GenerateRequest
from ..webhooks import check_submission

router = APIRouter(tags=["jobs"])


@router.post(
    "/v1/generate",
    response_model=None,
    responses={
        200: {"model": Job, "description": "the job, terminal"},
        202: {"model": Job, "description": "still running: poll the job"},
        **error_responses(400, 413, 422, 503),
    },
)
async def generate(
    body: GenerateRequest, jobs: JobsDep, caller: CallerDep, request_id: RequestIdDep, slots: StreamSlotsDep,
    cancel_after: DeadlineDep, idempotency_key: IdempotencyKeyDep = None,
) -> JSONResponse:
    await check_submission(jobs.settings, body.webhook)
    with slots.hold():
        job = await jobs.submit_and_wait(body.generation_params(), caller.owner, request_id, body.wait_s,
                                         priority=body.priority, webhook=body.webhook_record(),
                                         idempotency_key=idempotency_key, caller=caller,
                                         deadline=body.deadline_with(cancel_after))
    if job.status.is_terminal():
        return JSONResponse(job.public())
    return JSONResponse(job.public(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
