"""The OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`); jobs use the same queue."""

from fastapi import APIRouter, Request, Response

from ..deps import (CallerDep, DeadlineDep, IdempotencyKeyDep, JobsDep, OwnerDep, RequestIdDep, SettingsDep,
                    StreamSlotsDep)
from ..errors import OpenAIRoute, error_responses
from ..openai import (
    CHAT, TEXT, ChatCompletionRequest, CompletionRequest, check_model, model_object, models_list, respond,
)

# OpenAIRoute: these routes' errors carry OpenAI's `param` and type.
router = APIRouter(tags=["openai"], route_class=OpenAIRoute)

_STREAM = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}},
    **error_responses(400, 404, 413, 422, 503, 504),
}


@router.get("/v1/models", responses=error_responses(422, 503))
async def list_models(jobs: JobsDep, owner: OwnerDep) -> dict:
    """The served model; 503 while no worker is ready."""
    return models_list(await jobs.served_model())


@router.get("/v1/models/{model_id:path}", responses=error_responses(404, 422, 503))
async def retrieve_model(model_id: str, jobs: JobsDep, owner: OwnerDep) -> dict:
    card = await jobs.served_model()
    check_model(model_id, card)
    return model_object(card)


@router.post("/v1/chat/completions", response_class=Response, responses=_STREAM)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    jobs: JobsDep,
    caller: CallerDep,
    request_id: RequestIdDep,
    settings: SettingsDep,
    slots: StreamSlotsDep,
    cancel_after: DeadlineDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> Response:
    return await respond(CHAT, body, jobs, caller.owner, request_id, settings, slots, idempotency_key, request,
                         caller, cancel_after)


@router.post("/v1/completions", response_class=Response, responses=_STREAM)
async def completions(
    body: CompletionRequest,
    request: Request,
    jobs: JobsDep,
    caller: CallerDep,
    request_id: RequestIdDep,
    settings: SettingsDep,
    slots: StreamSlotsDep,
    cancel_after: DeadlineDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> Response:
    """A string `prompt` becomes one user message under the chat template; token ids, or `echo`, continue as raw
    text."""
    return await respond(TEXT, body, jobs, caller.owner, request_id, settings, slots, idempotency_key, request,
                         caller, cancel_after)
