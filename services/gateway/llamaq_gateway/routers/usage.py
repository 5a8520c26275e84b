"""`GET /v1/usage`: the caller's own usage, limits and share of the queue (its API key's; with the API open, its
address's)."""

from fastapi import APIRouter

from ..deps import CallerDep, JobsDep
from ..errors import error_responses

router = APIRouter(tags=["usage"])


@router.get("/v1/usage", response_model=None, responses=error_responses(401, 503))
async def own_usage(caller: CallerDep, jobs: JobsDep) -> dict:
    """Requests admitted, prompt tokens processed and tokens generated so far under the caller's key, its jobs
    running and waiting now, its fair-share weight and its limits (0: none), and what is left of its rate limits."""
    return await jobs.usage(caller)
