"""Cancel-on-disconnect for the OpenAI routes (`/v1/chat/completions`, `/v1/completions`, and `/v1/responses`
without `background`): a client that goes away before its answer is complete has its job canceled, as vLLM's
OpenAI server aborts such a request. An OpenAI client that gave up retries (the `openai` SDK does) and the same
work would otherwise run twice. A queued job ends `canceled` at once; a running one is stopped by its worker within
one decoding step.

Never on the job API (`/v1/jobs`, `/v1/generate`, `POST /`), whose contract is that a job outlives its connection;
never for a request with an `Idempotency-Key` (see `applies`); never with `CANCEL_ON_DISCONNECT=false`.

How a disconnect is seen (nginx closes the upstream connection when its client leaves: `proxy_ignore_client_abort`
is off, nginx's default; uvicorn then reports `http.disconnect`):
- waiting for a job (no `stream`): `wait_or_cancel` listens for `http.disconnect` on the request's receive channel
  (the body is read already, so the next message is the disconnect) while it waits on the job's events;
- streaming: Starlette's StreamingResponse listens for the disconnect itself and cancels the body it is iterating
  (ASGI spec 2.3, uvicorn's); `guard_stream` cancels the job when the body did not run to its end, including a
  body never started (a client gone before the response began) and one closed on a failed write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from starlette.requests import Request

if TYPE_CHECKING:
    from .jobs import JobService
    from .settings import GatewaySettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The cancels started from a stream's end: kept referenced until done (asyncio holds tasks only weakly).
_cancels: set[asyncio.Task] = set()


def applies(settings: GatewaySettings, idempotency_key: str | None) -> bool:
    """Whether this request's job is canceled when its client disconnects.

    A client that sends `Idempotency-Key` means to retry under it and reattach to the same job (its retry streams it
    from the start or waits on it): its connection going away is no sign that the work is unwanted, so such a job
    is never canceled for a disconnect."""
    return settings.cancel_on_disconnect and not idempotency_key


async def cancel_abandoned(jobs: JobService, job_id: str, owner: str) -> None:
    """Cancel the job of a client that went away, unless it has ended already; logged, never raises."""
    try:
        job = await jobs.get(job_id, owner)
        if job.status.is_terminal():
            return
        job = await jobs.cancel(job_id, owner)
    except Exception as exc:  # Redis away, the job expired: nothing more to do for a client that is gone
        logger.warning("could not cancel job %s after its client disconnected: %s", job_id, exc,
                       extra={"job_id": job_id})
        return
    logger.info("job %s canceled: its client disconnected (now %s)", job_id, job.status.value,
                extra={"job_id": job_id})


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the request's body must have been read already). Should the
    receive channel fail, never: the wait goes on as without cancel-on-disconnect."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception as exc:
        logger.warning("cannot watch for a client's disconnect: %r", exc)
        await asyncio.Event().wait()


async def wait_or_cancel(request: Request, waiting: Awaitable[T], jobs: JobService, job_id: str,
                         owner: str) -> T | None:
    """What `waiting` (a wait on job `job_id`) returns; or, should the client disconnect first, None once the job
    is canceled."""
    wait = asyncio.ensure_future(waiting)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((wait, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not wait.done():
            wait.cancel()
    if wait.done() and not wait.cancelled():
        return wait.result()  # (ended as the client left: the answer goes out, to no one)
    await cancel_abandoned(jobs, job_id, owner)
    return None


def guard_stream(
    body: AsyncIterator[str], release: Callable[[], None], jobs: JobService, job_id: str, owner: str
) -> tuple[AsyncIterator[str], Callable[[], None]]:
    """The body and `release` to give `streams.sse_response` instead of `body` and `release`: the same, except that
    the job is canceled should the stream be over before the body ran to its end. The check is in `release`,
    which sse_response calls once the body is closed and again after the response (idempotent), so it also covers
    a body never started."""
    ended = False
    checked = False

    async def watched() -> AsyncIterator[str]:
        nonlocal ended
        async for chunk in body:
            yield chunk
        ended = True  # (an error event the body sends, and its [DONE], is an end: the job runs on)

    def release_or_cancel() -> None:
        nonlocal checked
        release()
        if checked:
            return
        checked = True
        if not ended:
            # Started as a task: this runs inside the stream's cancelled scope (or a finally), where awaiting fails.
            task = asyncio.get_running_loop().create_task(cancel_abandoned(jobs, job_id, owner))
            _cancels.add(task)
            task.add_done_callback(_cancels.discard)

    return watched(), release_or_cancel
