"""The one error shape, `{"error": {"type", "message", "code"}}`, mapped in one place from domain exceptions, and
the error responses each route documents in its OpenAPI schema (`error_responses`).

On the OpenAI-compatible routes (those of class OpenAIRoute) the same body also carries OpenAI's `param` (the
offending field or null), and a request OpenAI would call invalid (bad or unsupported field, malformed JSON) has
OpenAI's type `invalid_request_error`, so the body reads right to both API.md clients and OpenAI SDKs.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from llamaq_protocol import ErrorBody, ErrorDetail, Job

logger = logging.getLogger(__name__)


OPENAI_INVALID_REQUEST = "invalid_request_error"
# Our generic request-error types, as OpenAI names them on its routes; the specific ones (prompt_too_long...) stay.
_OPENAI_TYPES = {"invalid_json": OPENAI_INVALID_REQUEST, "invalid_request": OPENAI_INVALID_REQUEST}


class OpenAIRoute(APIRoute):
    """A route whose errors take OpenAI's shape: routers/openai.py makes all its routes of this class."""


def is_openai_route(request: Request) -> bool:
    return is_openai_scope(request.scope)


def is_openai_scope(scope: Scope) -> bool:
    # Starlette sets the route on a method mismatch (405) too; only a path no route serves (404) has none.
    return isinstance(scope.get("route"), OpenAIRoute)


class LlamaqError(Exception):
    status_code = 500
    error_type = "internal_error"
    retry_after_s: int | None = None
    # `X-Should-Retry: false` stops the OpenAI SDKs from retrying a request whose retry would queue a duplicate.
    retryable: bool | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(LlamaqError):
    status_code = 400
    error_type = "invalid_request"


class PromptTooLong(InvalidRequest):
    error_type = "prompt_too_long"


class IdempotencyConflict(InvalidRequest):
    error_type = "idempotency_key_reused"


class InvalidParameter(InvalidRequest):
    """An OpenAI-compatible request OpenAI would refuse, or one using an option llamaq does not offer."""

    error_type = OPENAI_INVALID_REQUEST


class Unauthorized(LlamaqError):
    status_code = 401
    error_type = "unauthorized"


class NotFound(LlamaqError):
    status_code = 404
    error_type = "not_found"


class JobNotFound(NotFound):
    pass


class PayloadTooLarge(LlamaqError):
    status_code = 413
    error_type = "payload_too_large"


class StorageQuotaExceeded(LlamaqError):
    """An upload past the client's MAX_FILE_STORAGE_BYTES."""

    status_code = 413
    error_type = "storage_quota_exceeded"


class ModelNotFound(LlamaqError):
    status_code = 404
    error_type = "model_not_found"


class QueueFull(LlamaqError):
    status_code = 429
    error_type = "queue_full"
    retry_after_s = 2


class RateLimited(LlamaqError):
    """The caller's key is over its requests or tokens per minute (API_KEYS_FILE)."""

    status_code = 429
    error_type = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyStreams(LlamaqError):
    """The client already holds MAX_STREAMS_PER_CLIENT open streams and waits on this gateway process."""

    status_code = 429
    error_type = "too_many_streams"
    retry_after_s = 5


class ServiceUnavailable(LlamaqError):
    status_code = 503
    error_type = "unavailable"
    retry_after_s = 2


class NoReadyWorker(ServiceUnavailable):
    error_type = "no_ready_worker"
    retry_after_s = 5


class WaitTimeout(LlamaqError):
    """The job is still queued or running: a retry would queue it a second time."""

    status_code = 504
    error_type = "timeout"
    retryable = False


class JobFailed(LlamaqError):
    """A job the client waited on ended failed; the job's own error type is passed through."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        if error_type == "invalid_request":  # the worker refused what the gateway could not check (a grammar)
            self.status_code = 400

    @classmethod
    def of(cls, job: Job) -> JobFailed:
        """The failed job's error, as every answer that waited on it reports it."""
        error = job.error
        return cls(error.type if error else "internal_error",
                   f"job {job.id} failed: {error.message if error else 'unknown error'}")


def error_body(
    status_code: int, error_type: str, message: str, *, openai: bool = False, param: str | None = None
) -> dict:
    """The error body every response and every in-stream error uses; `openai`: OpenAI's shape and type names."""
    if openai:
        error_type = _OPENAI_TYPES.get(error_type, error_type)
    body = ErrorBody(error=ErrorDetail(type=error_type, message=message, code=status_code)).model_dump()
    if openai:
        body["error"]["param"] = param
    return body


def error_response(
    status_code: int,
    error_type: str,
    message: str,
    retry_after_s: int | None = None,
    *,
    openai: bool = False,
    param: str | None = None,
    retryable: bool | None = None,
) -> JSONResponse:
    headers = {}
    if retry_after_s:
        headers["Retry-After"] = str(retry_after_s)
    if retryable is not None:
        headers["X-Should-Retry"] = "true" if retryable else "false"
    body = error_body(status_code, error_type, message, openai=openai, param=param)
    return JSONResponse(body, status_code=status_code, headers=headers or None)


def _describe_validation(exc: RequestValidationError) -> tuple[int, str, str, str | None]:
    """(status, type, message, param): param is the first offending field, dotted (`messages.0.content`)."""
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return 400, "invalid_json", "request body is not valid JSON", None
    parts = []
    params = []
    for err in errors:
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{location or 'body'}: {err.get('msg')}")
        params.append(location or None)
    return 422, "invalid_request", "; ".join(parts) or "invalid request", params[0] if params else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LlamaqError)
    async def _domain(request: Request, exc: LlamaqError) -> JSONResponse:
        return error_response(
            exc.status_code, exc.error_type, exc.message, exc.retry_after_s,
            openai=is_openai_route(request), param=exc.param, retryable=exc.retryable,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status_code, error_type, message, param = _describe_validation(exc)
        return error_response(status_code, error_type, message, openai=is_openai_route(request), param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 400 is a body it could not parse (bad UTF-8, nesting too deep, an int too long...).
        error_type = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return error_response(exc.status_code, error_type, str(exc.detail), openai=is_openai_route(request))

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        logger.warning("redis unavailable: %s", exc)
        return error_response(
            503, "unavailable", "the job store (Redis) is unreachable; retry shortly", 2,
            openai=is_openai_route(request),
        )

    @app.exception_handler(redis.exceptions.OutOfMemoryError)
    async def _redis_full(request: Request, exc: Exception) -> JSONResponse:
        # Redis at its maxmemory (noeviction: it refuses writes rather than drop jobs); results and files expire.
        logger.error("redis refused a write, at its maxmemory: %s", exc)
        return error_response(
            503, "store_full", "the job store (Redis) is full; nothing was written; retry later", 30,
            openai=is_openai_route(request),
        )

    # Any other exception is logged and answered with a 500 by app.RequestContext, while the request id is set.


# ---- the error responses routes document (OpenAPI) ---------------------------------------------------------------

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_ERRORS: dict[int, str] = {
    400: "malformed JSON, or a request the model cannot run (prompt too long for its context, ...)",
    401: "API_KEYS is set and the `Authorization: Bearer` key is missing or wrong",
    404: "no such job, or one another key created",
    413: "body over 1 MiB (answered by nginx)",
    414: "request line (path and query) over nginx's 8 KiB header buffer (answered by nginx)",
    422: "unknown field, wrong type or out-of-range value",
    429: "queue full (MAX_QUEUE), this client over its request rate (nginx) or holding MAX_STREAMS_PER_CLIENT "
         "open streams and waits already; nothing was queued",
    503: "Redis unreachable, or no worker with its model loaded",
    504: "the job is still queued or running; poll GET /v1/jobs/{id}",
}
# Every route behind nginx: its request-line limit and its rate limit.
COMMON_ERRORS = (414, 429)


def error_responses(*codes: int, auth: bool = True) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses (plus COMMON_ERRORS, and 401 when the route takes keys), all in
    the one error shape. Giving 422 here also replaces FastAPI's default 422 schema, which is not ours."""
    wanted = sorted({*codes, *COMMON_ERRORS, *((401,) if auth else ())})
    responses: dict[int | str, dict[str, Any]] = {}
    for code in wanted:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _ERRORS[code]}
        if code in (429, 503):
            entry["headers"] = _RETRY_AFTER
        responses[code] = entry
    return responses
