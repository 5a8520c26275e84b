"""One Responses API call end to end: a response created (refused before anything is queued, or queued as a job
that carries its request, input and conversation), answered at once (`background`), streamed, or waited for; and
a stored response retrieved, streamed again from a sequence number, cancelled, deleted, or its input listed."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .. import disconnect, streams
from ..callers import Caller
from ..errors import InvalidParameter, InvalidRequest, WaitTimeout
from ..jobs import JobService
from ..limits import StreamSlots
from ..openai.params import check_model
from ..settings import GatewaySettings
from ..webhooks import check_submission
from . import render, store
from .params import input_items, item_id, to_params
from .requests import ResponsesRequest
from .streaming import response_events

# The job fields the refusals before queueing name by this API's own.
PARAM_NAMES = {"structured_outputs": "text.format", "json": "text.format.schema", "n": "n"}
# The request fields a response object echoes (render.ECHOED).
ECHOED = tuple(render.ECHOED)


async def create(req: ResponsesRequest, jobs: JobService, owner: str, request_id: str | None,
                 settings: GatewaySettings, slots: StreamSlots, idempotency_key: str | None = None,
                 http_request: Request | None = None, caller: Caller | None = None,
                 deadline: float | None = None) -> Response:
    """A retry under the same `idempotency_key` (and body) gets the response its first try created: streamed from
    its start, answered as it is now, or waited on. With `http_request`, a client that disconnects
    before a response without `background` is complete has its job canceled (disconnect.py); a background one is
    meant to outlive its connection."""
    await check_submission(settings, req.webhook)
    card = await jobs.served_model()
    check_model(req.model, card)
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        previous = await store.load(jobs, req.previous_response_id, owner, param="previous_response_id")
        if not previous.job.status.is_terminal():
            raise InvalidParameter(f"previous_response_id: {previous.id} is still {previous.job.status.value}; "
                                   "continue it once it has ended", param="previous_response_id")
        history = store.conversation_after(previous)
    items = input_items(req)
    params, priority = to_params(req, history, items, settings.max_new_tokens_limit)
    prompt_tokens = await jobs.check_params(params, card, PARAM_NAMES)
    request = {name: getattr(req, name) for name in ECHOED if getattr(req, name, None) is not None}
    request["model"] = card.name
    if req.text is not None:
        request["text"] = req.text.model_dump(exclude_none=True)
    response_id = item_id(store.ID_PREFIX.rstrip("_"))
    extra = store.record_fields(request, items, history, req.store is not False)
    webhook = req.webhook_record()

    async def enqueue() -> bytes | None:
        """The response's job queued (or the one a retry's key names: its id becomes the response's); the id of its
        `queued` event, or None for a job queued before."""
        nonlocal response_id
        response_id, queued = await jobs.enqueue(
            params, owner, request_id, idempotency_key, priority, webhook, job_id=response_id, record_extra=extra,
            body=req.model_dump_json(), caller=caller, prompt_tokens=prompt_tokens, deadline=deadline)
        return queued

    cancel_on_disconnect = (http_request is not None and not req.background
                            and disconnect.applies(settings, idempotency_key))
    if req.stream:
        release = slots.take()
        try:
            await enqueue()
            stored = await store.load(jobs, response_id, owner, include_unstored=True)
        except BaseException:
            release()
            raise
        body = response_events(jobs, stored, owner)
        if cancel_on_disconnect:
            body, release = disconnect.guard_stream(body, release, jobs, response_id, owner)
        return streams.sse_response(body, release=release)
    if req.background:
        await enqueue()
        return JSONResponse(render.response_object(await store.load(jobs, response_id, owner)))
    with slots.hold():
        queued = await enqueue()  # (first: a retry's key may name another response)
        waiting = jobs.wait(response_id, owner, settings.max_generate_wait_s, since=queued)
        if cancel_on_disconnect:
            job = await disconnect.wait_or_cancel(http_request, waiting, jobs, response_id, owner)
            if job is None:
                return Response(status_code=499)  # nginx's "client closed request"; no one reads it
        else:
            job = await waiting
    if not job.status.is_terminal():
        raise WaitTimeout(f"response {response_id} is still {job.status.value} after "
                          f"{settings.max_generate_wait_s:g} s; it runs on: GET /v1/responses/{response_id} (or "
                          "create it with background: true)")
    return JSONResponse(render.response_object(await store.load(jobs, response_id, owner, include_unstored=True)))


async def retrieve(response_id: str, jobs: JobService, owner: str, stream: bool, starting_after: int | None,
                   slots: StreamSlots) -> Response:
    stored = await store.load(jobs, response_id, owner)
    if not stream:
        if starting_after is not None:
            raise InvalidRequest("starting_after: goes with stream=true", param="starting_after")
        return JSONResponse(render.response_object(stored))
    release = slots.take()
    return streams.sse_response(response_events(jobs, stored, owner, -1 if starting_after is None else starting_after),
                                release=release)


async def cancel(response_id: str, jobs: JobService, owner: str) -> dict[str, Any]:
    stored = await store.load(jobs, response_id, owner)
    if not stored.job.status.is_terminal():
        await jobs.cancel(response_id, owner)
        stored = await store.load(jobs, response_id, owner)
    return render.response_object(stored)


async def delete(response_id: str, jobs: JobService, owner: str) -> dict[str, Any]:
    stored = await store.load(jobs, response_id, owner)
    if not stored.job.status.is_terminal():
        await jobs.cancel(response_id, owner)
    await store.mark_deleted(jobs, response_id)
    return render.deleted_object(response_id)


async def list_input_items(response_id: str, jobs: JobService, owner: str, limit: int, order: str,
                           after: str | None) -> dict[str, Any]:
    stored = await store.load(jobs, response_id, owner)
    items = stored.input if order == "asc" else list(reversed(stored.input))
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidRequest(f"after: {after!r} is not an input item of {response_id}", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
