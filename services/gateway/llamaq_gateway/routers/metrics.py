"""`GET /metrics`: Prometheus text for the gateway, the queue and every live worker."""

from fastapi import APIRouter, Response

from ..deps import JobsDep
from ..metrics import CONTENT_TYPE_LATEST, ClusterState, render

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(jobs: JobsDep) -> Response:
    """Prometheus exposition; names start with `llamaq_`."""
    state = await ClusterState.read(jobs)
    return Response(render(state), media_type=CONTENT_TYPE_LATEST)
