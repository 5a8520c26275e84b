"""The OpenAI Batch API: `/v1/files` (JSONL inputs and the batches' outputs) and `/v1/batches`."""

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, UploadFile
from fastapi.responses import Response

from ..batch_api.files import PURPOSE_BATCH, check_batch_input
from ..batch_api.requests import BatchRequest
from ..deps import BatchesDep, CallerDep, FilesDep, OwnerDep, SettingsDep
from ..errors import InvalidParameter, OpenAIRoute, error_responses

# OpenAIRoute: errors carry OpenAI's `param` and type, as on the other OpenAI routes.
router = APIRouter(tags=["batch"], route_class=OpenAIRoute)

MAX_LIST = 100
FileId = Annotated[str, Path(description="the file's id")]
BatchId = Annotated[str, Path(description="the batch's id")]


@router.post("/v1/files", responses=error_responses(400, 413, 422, 503))
async def upload_file(
    files: FilesDep,
    caller: CallerDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JSONL: one request per line")],
    purpose: Annotated[str, Form(max_length=64, description="`batch`")],
) -> dict:
    """A batch's input: one `{"custom_id", "method": "POST", "url", "body"}` per line, up to MAX_FILE_BYTES and
    MAX_BATCH_REQUESTS lines; kept FILE_TTL_S (`expires_at`)."""
    if purpose != PURPOSE_BATCH:
        raise InvalidParameter(f"purpose: only {PURPOSE_BATCH!r} files are accepted here", param="purpose")
    content = await file.read(settings.max_file_bytes + 1)
    check_batch_input(content, settings.max_file_bytes, settings.max_batch_requests)
    return await files.create(caller.owner, file.filename or "upload.jsonl", purpose, content,
                              list_owner=caller.list_owner, quota=settings.max_file_storage_bytes)


@router.get("/v1/files", responses=error_responses(400, 422, 503))
async def list_files(
    files: FilesDep,
    caller: CallerDep,
    purpose: Annotated[str, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 20,
    after: Annotated[str, Query(max_length=64)] = None,
) -> dict:
    """The caller's files, newest first (with the API open, those uploaded from its address)."""
    return await files.list(caller.owner, purpose, limit, after, caller.list_owner)


@router.get("/v1/files/{file_id}", responses=error_responses(404, 422, 503))
async def retrieve_file(file_id: FileId, files: FilesDep, owner: OwnerDep) -> dict:
    return await files.get(file_id, owner)


@router.get(
    "/v1/files/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/jsonl": {}}}, **error_responses(404, 422, 503)},
)
async def file_content(file_id: FileId, files: FilesDep, owner: OwnerDep) -> Response:
    return Response(await files.content(file_id, owner), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}", responses=error_responses(404, 422, 503))
async def delete_file(file_id: FileId, files: FilesDep, owner: OwnerDep) -> dict:
    return await files.delete(file_id, owner)


@router.post("/v1/batches", responses=error_responses(400, 404, 422, 503))
async def create_batch(body: BatchRequest, batches: BatchesDep, caller: CallerDep) -> dict:
    """Runs each line of `input_file_id` as a batch-priority job: interactive requests are always served first."""
    return await batches.create(caller, body)


@router.get("/v1/batches", responses=error_responses(400, 422, 503))
async def list_batches(
    batches: BatchesDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 20,
    after: Annotated[str, Query(max_length=64)] = None,
) -> dict:
    """The caller's batches, newest first (with the API open, those created from its address)."""
    return await batches.list(caller.owner, limit, after, caller.list_owner)


@router.get("/v1/batches/{batch_id}", responses=error_responses(404, 422, 503))
async def retrieve_batch(batch_id: BatchId, batches: BatchesDep, owner: OwnerDep) -> dict:
    return await batches.get(batch_id, owner)


@router.post("/v1/batches/{batch_id}/cancel", responses=error_responses(400, 404, 422, 503))
async def cancel_batch(batch_id: BatchId, batches: BatchesDep, owner: OwnerDep) -> dict:
    """`cancelling` until the lines still queued or running have stopped, then `cancelled`."""
    return await batches.cancel(batch_id, owner)

