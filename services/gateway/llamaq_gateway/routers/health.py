from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import JobsDep
from ..errors import error_response
from ..schemas import error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", responses=error_responses(auth=False))
async def healthz() -> dict:
    """200 while this gateway process serves."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses(503, auth=False))
async def readyz(jobs: JobsDep) -> JSONResponse:
    """200 when Redis answers and a worker has its model loaded with a fresh heartbeat."""
    try:
        await jobs.aio.ping()
    except Exception as exc:  # any failure to reach Redis means not ready, with the reason
        return error_response(503, "unavailable", f"redis unreachable: {exc}", 2)
    workers = await jobs.ready_workers()
    if not workers:
        return error_response(503, "no_ready_worker", "no worker has a model loaded and a fresh heartbeat", 5)
    return JSONResponse({"status": "ready", "workers": len(workers)})
