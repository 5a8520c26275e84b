"""OpenAI's Responses API (`/v1/responses`): a response is a job, so a background one is durable like any job."""

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from ..deps import (CallerDep, DeadlineDep, IdempotencyKeyDep, JobsDep, OwnerDep, RequestIdDep, SettingsDep,
                    StreamSlotsDep)
from ..errors import OpenAIRoute, error_responses
from ..responses import service
from ..responses.requests import ResponsesRequest

# OpenAIRoute: errors in OpenAI's shape, with its `param`.
router = APIRouter(prefix="/v1/responses", tags=["responses"], route_class=OpenAIRoute)

ResponseId = Annotated[str, Path(description="the response's id (resp_...)")]
_STREAM = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}


@router.post("", response_class=Response, responses={**_STREAM, **error_responses(400, 404, 413, 422, 503, 504)})
async def create_response(body: ResponsesRequest, request: Request, jobs: JobsDep, caller: CallerDep,
                          request_id: RequestIdDep, settings: SettingsDep, slots: StreamSlotsDep,
                          cancel_after: DeadlineDep, idempotency_key: IdempotencyKeyDep = None) -> Response:
    return await service.create(body, jobs, caller.owner, request_id, settings, slots, idempotency_key, request,
                                caller, cancel_after)


@router.get("/{response_id}", response_class=Response, responses={**_STREAM, **error_responses(400, 404, 422, 503)})
async def retrieve_response(
    response_id: ResponseId, jobs: JobsDep, owner: OwnerDep, slots: StreamSlotsDep,
    stream: Annotated[bool, Query(description="replay its events as server-sent events")] = False,
    starting_after: Annotated[int, Query(ge=-1, description="with stream: only the events after this "
                                                            "sequence_number")] = None,
) -> Response:
    return await service.retrieve(response_id, jobs, owner, stream, starting_after, slots)


@router.post("/{response_id}/cancel", responses=error_responses(404, 422, 503))
async def cancel_response(response_id: ResponseId, jobs: JobsDep, owner: OwnerDep) -> dict:
    return await service.cancel(response_id, jobs, owner)


@router.delete("/{response_id}", responses=error_responses(404, 422, 503))
async def delete_response(response_id: ResponseId, jobs: JobsDep, owner: OwnerDep) -> dict:
    return await service.delete(response_id, jobs, owner)


@router.get("/{response_id}/input_items", responses=error_responses(400, 404, 422, 503))
async def list_input_items(
    response_id: ResponseId, jobs: JobsDep, owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: Annotated[str, Query(max_length=128)] = None,
) -> dict:
    return await service.list_input_items(response_id, jobs, owner, limit, order, after)
