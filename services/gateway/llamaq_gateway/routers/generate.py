"""`POST /v1/generate`: submit and wait up to `wait_s`; 202 with the job to poll if it is not done by then."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from llamaq_protocol import GenerationParams

from ..deps import JobsDep, OwnerDep, RequestIdDep
from ..schemas import GenerateRequest

router = APIRouter(tags=["jobs"])


@router.post("/v1/generate", responses={202: {"description": "still running: poll the job"}})
async def generate(body: GenerateRequest, jobs: JobsDep, owner: OwnerDep, request_id: RequestIdDep) -> JSONResponse:
    params = GenerationParams.model_validate(body.model_dump(exclude={"wait_s"}, exclude_unset=True))
    job = await jobs.submit(params, owner, request_id)
    job = await jobs.wait(job.id, owner, body.wait_s)
    if job.status.is_terminal():
        return JSONResponse(job.public())
    return JSONResponse(job.public(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
