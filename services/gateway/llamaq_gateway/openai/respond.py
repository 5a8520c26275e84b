"""One OpenAI request end to end: checked and queued before anything else (`prepare`, shared with the Batch API),
then answered as a stream or as the completion object once the job ends (`respond`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from llamaq_protocol import GenerationParams, JobStatus, ModelCard

from .. import disconnect, streams
from ..errors import JobFailed, WaitTimeout
from ..constraints import check_constraints
from ..event_hub import START
from ..callers import Caller
from ..jobs import JobService, check_capabilities, check_token_ids
from .params import OPENAI_PARAM_NAMES, check_model, param_names, to_params
from .render import Rendering, completion
from .requests import ChatCompletionRequest, CompletionRequest, Kind
from .streaming import stream_completion

if TYPE_CHECKING:
    from ..limits import StreamSlots
    from ..settings import GatewaySettings


async def respond(
    kind: Kind,
    req: ChatCompletionRequest | CompletionRequest,
    jobs: JobService,
    owner: str,
    request_id: str | None,
    settings: GatewaySettings,
    slots: StreamSlots,
    idempotency_key: str | None = None,
    request: Request | None = None,
    caller: Caller | None = None,
    deadline: float | None = None,
) -> Response:
    """Submit through the queue; then stream the job, or wait for it and answer the completion object. Either
    counts against the client's cap on open streams and waits (checked before anything is queued). A retry under
    the same `idempotency_key` gets the job its first try queued: streamed from its start, or waited on.

    With `request` (the HTTP request), a client that disconnects first has its job canceled (disconnect.py).
    `caller`: who is asking (its key's fair share and limits); `deadline`: its Cancel-After (JobService.enqueue)."""
    params, card, rendering = await prepare(req, jobs, settings)
    cancel_on_disconnect = request is not None and disconnect.applies(settings, idempotency_key)
    if req.stream:
        release = slots.take()
        try:
            job = await jobs.submit(params, owner, request_id, idempotency_key, card=card, caller=caller,
                                    deadline=deadline)
        except BaseException:
            release()
            raise
        body = stream_completion(kind, jobs, job, owner, card.name, req.include_usage(), rendering=rendering)
        if cancel_on_disconnect:
            body, release = disconnect.guard_stream(body, release, jobs, job.id, owner)
        return streams.sse_response(body, release=release)
    with slots.hold():
        if cancel_on_disconnect:
            # submit_and_wait in two steps, the job's id being needed while it is waited on. Its events are read from
            # the stream's start (START: no later than the state `submit` read), as the one just queued has few.
            job = await jobs.submit(params, owner, request_id, idempotency_key, card=card, caller=caller,
                                    deadline=deadline)
            waiting = jobs.wait(job.id, owner, settings.max_generate_wait_s, since=START.encode())
            job = await disconnect.wait_or_cancel(request, waiting, jobs, job.id, owner)
            if job is None:
                return Response(status_code=499)  # nginx's "client closed request"; no one reads it
        else:
            job = await jobs.submit_and_wait(params, owner, request_id, settings.max_generate_wait_s, card=card,
                                             idempotency_key=idempotency_key, caller=caller, deadline=deadline)
    if job.status is JobStatus.failed:
        raise JobFailed.of(job)
    if not job.status.is_terminal():
        raise WaitTimeout(
            f"job {job.id} is still {job.status.value} after {settings.max_generate_wait_s:g} s; it runs on and "
            f"GET /v1/jobs/{job.id} returns its result (use stream: true for long generations)"
        )
    return JSONResponse(completion(kind, job, card.name, rendering))


async def prepare(
    req: ChatCompletionRequest | CompletionRequest, jobs: JobService, settings: GatewaySettings
) -> tuple[GenerationParams, ModelCard, Rendering]:
    """A request's job parameters, the served model's card and how its answer is to be rendered, or the error
    (LlamaqError) that refuses it before anything is queued: what `respond` and each Batch API line share."""
    params = to_params(req, settings.max_new_tokens_limit)
    card = await jobs.served_model()
    check_model(req.model, card)
    check_capabilities(params, card, OPENAI_PARAM_NAMES)
    check_constraints(params, card, param_names(req))
    return params, card, await _rendering(req, params, jobs, card)


async def _rendering(
    req: ChatCompletionRequest | CompletionRequest, params: GenerationParams, jobs: JobService, card: ModelCard
) -> Rendering:
    """What the answer needs besides the job's output: the echoed prompt's text (decoded from its ids for a
    token-id prompt) and its first token, and the prompt's token count for usage on every chunk."""
    rendering = Rendering(logprobs=params.logprobs, continuous_usage=bool(req.stream) and req.continuous_usage(),
                          n=params.n)
    if params.prompt_token_ids is not None:
        check_token_ids(params, (await jobs.prompt_counter(card)).vocab_size, OPENAI_PARAM_NAMES)
    if rendering.continuous_usage:
        rendering.prompt_tokens = await jobs.check_params(params, card)
    if isinstance(req, CompletionRequest) and req.echo:
        counter = await jobs.prompt_counter(card)
        ids = params.prompt_token_ids or counter.encode(params.prompt or "", True)
        rendering.echo = params.prompt if params.prompt is not None else counter.decode(ids)
        rendering.first_prompt_token = counter.decode(ids[:1])
        rendering.echo_only = req.max_tokens == 0
    return rendering
