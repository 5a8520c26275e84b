"""`GET /metrics`: Prometheus text for the gateway and the queue (each worker serves its own on METRICS_PORT)."""

from fastapi import APIRouter, Request, Response

from ..callers import OPEN_ACCOUNT
from ..deps import JobsDep
from ..metrics import CONTENT_TYPE_LATEST, ClusterState, render

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request, jobs: JobsDep) -> Response:
    """Prometheus exposition; names start with `llamaq_`."""
    keyring = request.app.state.keyring
    state = await ClusterState.read(jobs, sorted(keyring.names) if not keyring.open else [OPEN_ACCOUNT])
    return Response(render(state), media_type=CONTENT_TYPE_LATEST)
