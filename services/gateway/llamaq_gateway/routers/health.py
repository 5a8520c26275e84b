from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..deps import JobsDep
from ..errors import error_response, error_responses
from ..jobs import JobService

router = APIRouter(tags=["health"])


@router.get("/healthz", responses=error_responses(auth=False))
async def healthz() -> dict:
    """200 while this gateway process serves."""
    return {"status": "ok"}


async def _ready_workers(jobs: JobService) -> list[str] | JSONResponse:
    """The ready workers (at least one), or the 503 to answer while Redis is away or no worker is ready."""
    try:
        await jobs.aio.ping()
    except Exception as exc:  # any failure to reach Redis means not ready, with the reason
        return error_response(503, "unavailable", f"redis unreachable: {exc}", 2)
    workers = await jobs.ready_workers()
    if not workers:
        return error_response(503, "no_ready_worker", "no worker has a model loaded and a fresh heartbeat", 5)
    return workers


@router.get("/readyz", responses=error_responses(503, auth=False))
async def readyz(jobs: JobsDep) -> JSONResponse:
    """200 when Redis answers and a worker has its model loaded with a fresh heartbeat."""
    workers = await _ready_workers(jobs)
    if isinstance(workers, JSONResponse):
        return workers
    return JSONResponse({"status": "ready", "workers": len(workers)})


@router.get(
    "/health",
    response_class=Response,
    responses={200: {"description": "ready (empty body)", "content": None}, **error_responses(503, auth=False)},
)
async def health(jobs: JobsDep) -> Response:
    """vLLM's and TGI's health check: 200 with an empty body when ready (as /readyz decides), else 503."""
    workers = await _ready_workers(jobs)
    return workers if isinstance(workers, JSONResponse) else Response(status_code=200)
